"""Real-GPU check of the metering path: concurrent GPU work of known duration through the real NVML sampler.

Each simulated request runs matrix multiplications on its own CUDA stream for a set time, reporting one
"token" per kernel as it completes (like a decode loop). CUDA events time each request's kernels (the
ground truth of its GPU time). The real ``NvmlSampler`` samples the device at 100 ms; the attribution splits
the measured busy time; the report compares the attributed sum with NVML's busy time (conservation) and
each request's share with its CUDA-event time.

Needs a GPU, NVML and PyTorch with CUDA; without them it prints why and exits 0 (skipped), so it can sit in
``make bench`` on machines without a GPU. Run: ``python -m bench.metering_gpu [--requests N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from tensorfleet.metering import nvml
from tensorfleet.metering.attribution import Attributor, work_spans
from tensorfleet.metering.events import RequestEvent, TokenChunk


def _skip(reason: str) -> dict[str, Any]:
    print(f"SKIPPED: {reason}")
    return {"skipped": reason}


def _request_worker(torch: Any, seconds: float, size: int, out: dict[str, Any]) -> None:
    stream = torch.cuda.Stream()
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    chunks, gpu_ms = [], 0.0
    admitted = time.monotonic()
    with torch.cuda.stream(stream):
        while time.monotonic() - admitted < seconds:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            torch.mm(a, b)
            end.record(stream)
            end.synchronize()
            gpu_ms += start.elapsed_time(end)
            chunks.append(TokenChunk(time.monotonic(), 1))
    out.update(admitted=admitted, done=time.monotonic(), chunks=tuple(chunks), gpu_ms=gpu_ms)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "metering_gpu.json"))
    args = parser.parse_args(argv)
    try:
        import pynvml
        import torch
    except ImportError as exc:
        return _skip(f"needs pynvml and torch ({exc})")
    if not torch.cuda.is_available():
        return _skip("no CUDA device")
    sampler = nvml.NvmlSampler(pynvml, [str(torch.cuda.current_device())])
    try:
        sampler.open()
    except nvml.NoGpu as exc:
        return _skip(str(exc))
    intervals: list[nvml.GpuInterval] = []
    thread = nvml.SamplerThread(sampler, 0.1, intervals.append)
    thread.start()
    time.sleep(0.5)  # idle before: must be billed to nobody
    results: list[dict[str, Any]] = [{} for _ in range(args.requests)]
    workers = [threading.Thread(target=_request_worker, args=(torch, args.seconds * (1 + i / 2), args.size, r))
               for i, r in enumerate(results)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    time.sleep(0.5)
    thread.stop()
    thread.join()
    attributor = Attributor(1)
    for interval in intervals:
        attributor.add_interval(interval.start, interval.end, interval.busy_ms, interval.energy_mj, interval.kind)
    for i, result in enumerate(results):
        event = RequestEvent(f"gpu-{i}", "bench", "mm", "-", time.time(), result["admitted"], result["admitted"],
                             None, result["done"], result["chunks"], 0, len(result["chunks"]), 0, 200, True, True)
        attributor.add_request(event.request_id, work_spans(event), True)
    attributor.place_all()
    finalised = attributor.finalise(math.inf)
    shares = {s.key: s.share.gpu_ms for s in attributor.settle()}
    measured = sum(f.busy_ms for f in finalised)
    billed = sum(f.billed_ms for f in finalised)
    truth = {f"gpu-{i}": r["gpu_ms"] for i, r in enumerate(results)}
    report = {
        "device": sampler.product, "kind": intervals[0].kind if intervals else None, "requests": args.requests,
        "nvml_busy_ms": round(measured, 1), "attributed_ms": round(billed, 1),
        "unattributed_ms": round(sum(f.unattributed_ms for f in finalised), 1),
        "conservation_pct": round(abs(billed + sum(f.unattributed_ms for f in finalised) - measured)
                                  / max(measured, 1e-9) * 100, 6),
        "cuda_event_total_ms": round(sum(truth.values()), 1),
        "per_request": {k: {"attributed_ms": round(shares[k], 1), "cuda_event_ms": round(v, 1),
                            "error_pct": round(abs(shares[k] - v) / v * 100, 2) if v else None}
                        for k, v in truth.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
