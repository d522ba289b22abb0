"""Figures of a run (GPU-hours, SLO attainment, TTFT percentiles, scale events), as text, JSON and a PNG."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from tensorfleet.autoscale.simulator.runs import RunResult
from tensorfleet.autoscale.simulator.trace import Trace


@dataclasses.dataclass(frozen=True)
class Summary:
    name: str
    gpu_hours: float
    slo_attainment: float  # share of requests admitted within the queue-wait SLO
    queue_wait_p99: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    scale_events: int
    mean_replicas: float
    max_replicas: int
    rejected: int

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; inf when a share of values is inf."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    if ordered[high] == math.inf:
        return math.inf
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(run: RunResult, trace: Trace, slo: float) -> Summary:
    waits, ttfts = [], []
    for request, arrival in enumerate(trace.arrivals):
        admit, first = run.log.admit[request], run.log.first[request]
        waits.append(math.inf if math.isnan(admit) else admit - arrival)
        ttfts.append(math.inf if math.isnan(first) else first - arrival)
    within = sum(1 for w in waits if w <= slo + 1e-9)
    span = [s for s in run.timeline if s.time <= trace.duration + 1.0]
    return Summary(
        name=run.name, gpu_hours=run.gpu_hours, slo_attainment=within / len(waits) if waits else 1.0,
        queue_wait_p99=percentile(waits, 99), ttft_p50=percentile(ttfts, 50), ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99), scale_events=len(run.events),
        mean_replicas=statistics.fmean(s.billed for s in span) if span else 0.0,
        max_replicas=max((s.billed for s in span), default=0), rejected=len(run.log.rejects))


def table(summaries: Sequence[Summary], slo: float) -> str:
    oracle = next((s for s in summaries if s.name == "oracle"), None)
    header = (f"{'policy':<14}{'GPU-hours':>10}{'x oracle':>9}{f'wait<={slo:g}s':>11}{'TTFT p50':>10}"
              f"{'p90':>8}{'p99':>8}{'events':>8}{'mean rep':>9}{'max':>5}")
    lines = [header, "-" * len(header)]
    for s in summaries:
        ratio = f"{s.gpu_hours / oracle.gpu_hours:.3f}" if oracle and oracle.gpu_hours else "-"
        lines.append(f"{s.name:<14}{s.gpu_hours:>10.2f}{ratio:>9}{s.slo_attainment:>11.2%}{s.ttft_p50:>9.2f}s"
                     f"{s.ttft_p90:>7.2f}s{s.ttft_p99:>7.2f}s{s.scale_events:>8}{s.mean_replicas:>9.2f}"
                     f"{s.max_replicas:>5}")
    return "\n".join(lines)


def plot(runs: Sequence[RunResult], trace: Trace, path: str | pathlib.Path, title: str) -> None:
    """Load, replicas and queue over time, one row per quantity, one line per run (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install 'tensorfleet[plots]'") from None
    figure, (load, replicas, queue) = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    first = runs[0].timeline
    minutes = [s.time / 60 for s in first]
    load.plot(minutes, [s.arrivals for s in first], color="0.4", linewidth=0.6)
    load.set_ylabel("requests / s")
    for rank, run in reversed(list(enumerate(runs))):  # the first run (tensorfleet's) is drawn last, on top
        span = [s for s in run.timeline if s.time <= trace.duration + 1]
        color = f"C{rank}"
        replicas.step([s.time / 60 for s in span], [s.billed for s in span], where="post", label=run.name,
                      linewidth=1.0, color=color)
        queue.plot([s.time / 60 for s in span], [s.queue for s in span], label=run.name, linewidth=0.7,
                   color=color, alpha=1.0 if rank == 0 else 0.6)
    replicas.set_ylabel("replicas (billed)")
    replicas.legend(*[list(reversed(x)) for x in replicas.get_legend_handles_labels()], loc="upper left")
    queue.set_ylabel("queued requests")
    queue.set_xlabel("minutes")
    queue.legend(*[list(reversed(x)) for x in queue.get_legend_handles_labels()], loc="upper left")
    load.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
