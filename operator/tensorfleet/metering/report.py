"""Usage reports: totals per tenant, model, tier and time window, as a table, CSV or JSON, and a chart.

Only billable records count; cold starts are listed apart. Costs add up as decimals per currency.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

GROUP_KEYS = ("tenant", "model", "tier", "window", "service", "namespace", "gpuProduct", "currency")
COLUMNS = ("requests", "inputTokens", "outputTokens", "cachedTokens", "gpuMs", "resourceUnits", "cost")
COUNTS = ("estimatedRequests", "truncatedRequests", "truncatedTokens", "runawayStopped")  # numeric, after COLUMNS


@dataclasses.dataclass
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    gpu_ms: float = 0.0
    resource_units: float = 0.0
    cost: Decimal = Decimal(0)
    estimated: int = 0
    truncated: int = 0  # requests whose oldest turns the gateway dropped (tokenPolicy.contextStrategy)
    truncated_tokens: int = 0
    runaway_stopped: int = 0  # generations stopped by runaway control

    def add(self, body: dict[str, Any]) -> None:
        self.requests += 1
        self.input_tokens += int(body.get("inputTokens") or 0)
        self.output_tokens += int(body.get("outputTokens") or 0)
        self.cached_tokens += int(body.get("cachedTokens") or 0)
        self.gpu_ms += float(body.get("gpuMs") or 0.0)
        self.resource_units += float(body.get("resourceUnits") or 0.0)
        self.cost += Decimal(str(body.get("price") or "0"))
        self.estimated += 1 if body.get("estimated") else 0
        self.truncated += 1 if body.get("truncated") else 0
        self.truncated_tokens += int(body.get("truncatedTokens") or 0)
        self.runaway_stopped += 1 if body.get("runawayStopped") else 0

    def row(self) -> dict[str, Any]:
        return {"requests": self.requests, "inputTokens": self.input_tokens, "outputTokens": self.output_tokens,
                "cachedTokens": self.cached_tokens, "gpuMs": round(self.gpu_ms, 3),
                "resourceUnits": round(self.resource_units, 3), "cost": format(self.cost.normalize(), "f"),
                "estimatedRequests": self.estimated, "truncatedRequests": self.truncated,
                "truncatedTokens": self.truncated_tokens, "runawayStopped": self.runaway_stopped}


def parse_time(value: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def parse_window(value: str) -> datetime.timedelta:
    """``30s``, ``15m``, ``1h``, ``1d``; ValueError names the option."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(value[:-1]) * units[value[-1]]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"--window={value!r}: expected a number and a unit s, m, h or d (e.g. 1h)") from None
    if seconds <= 0:
        raise ValueError(f"--window={value!r}: must be positive")
    return datetime.timedelta(seconds=seconds)


def window_start(moment: datetime.datetime, window: datetime.timedelta) -> datetime.datetime:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return epoch + ((moment - epoch) // window) * window


def billable(bodies: Iterable[dict[str, Any]], since: datetime.datetime | None,
             until: datetime.datetime | None) -> list[dict[str, Any]]:
    out = []
    for body in bodies:
        if body.get("kind") != "request" or not body.get("billable"):
            continue
        moment = parse_time(body["time"])
        if (since and moment < since) or (until and moment >= until):
            continue
        out.append(body)
    return out


def aggregate(bodies: Iterable[dict[str, Any]], by: Sequence[str],
              window: datetime.timedelta | None) -> list[dict[str, Any]]:
    """One row per group (sorted), with the totals."""
    for key in by:
        if key not in GROUP_KEYS:
            raise ValueError(f"--by {key}: unknown; expected some of {', '.join(GROUP_KEYS)}")
    groups: dict[tuple[str, ...], Totals] = {}
    for body in bodies:
        values = []
        for key in by:
            if key == "window":
                start = window_start(parse_time(body["time"]), window or datetime.timedelta(hours=1))
                values.append(start.isoformat().replace("+00:00", "Z"))
            else:
                values.append(str(body.get(key) or "-"))
        groups.setdefault(tuple(values), Totals()).add(body)
    return [{**dict(zip(by, key, strict=True)), **groups[key].row()} for key in sorted(groups)]


def render(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps(rows, indent=2)
    if not rows:
        return "" if output == "csv" else "no billable usage in the selection\n"
    headers = list(rows[0])
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=headers, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = {h for h in headers if h in COLUMNS or h in COUNTS}
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row_cells in cells:
        lines.append("  ".join(c.rjust(w) if h in numeric else c.ljust(w)
                               for c, h, w in zip(row_cells, headers, widths, strict=True)))
    return "\n".join(lines) + "\n"


def chart(bodies: Sequence[dict[str, Any]], window: datetime.timedelta, path: str | Path) -> None:
    """A PNG of resource units per window, one line per tenant (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[datetime.datetime, float]] = {}
    for body in bodies:
        start = window_start(parse_time(body["time"]), window)
        tenant = str(body.get("tenant") or "-")
        series.setdefault(tenant, {})
        series[tenant][start] = series[tenant].get(start, 0.0) + float(body.get("resourceUnits") or 0.0)
    figure, axes = plt.subplots(figsize=(10, 5), dpi=100)
    windows = sorted({w for points in series.values() for w in points})
    for tenant in sorted(series, key=lambda t: -sum(series[t].values())):
        values = [series[tenant].get(w, 0.0) for w in windows]
        axes.plot(windows, values, marker="o", markersize=3, label=tenant)  # type: ignore[arg-type]
    axes.set_title(f"Resource units per {_describe(window)} by tenant")
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel("resource units (1 RU = 1 ms reference GPU at fp16)")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(loc="upper left", fontsize="small", ncols=2)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _describe(window: datetime.timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
