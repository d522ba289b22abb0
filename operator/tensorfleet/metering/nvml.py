"""NVML sampling of the engine's GPUs: activity, memory used and energy, one interval per period.

Activity of a device over an interval is, where the GPU offers GPM (Hopper and later), the
graphics-engine activity between two GPM samples (exactly that interval); otherwise NVML's
utilization rate, the share of the driver's own last sample period (1/6 s to 1 s by product) in which
a kernel ran. Busy time is ``interval x activity`` summed over the devices. A device that cannot be
read yields no interval: the attribution sees a gap and bills nothing for it, never a made-up value.
The read after a gap only primes the counters again (energy, GPM samples), so the gap's energy and
activity are never billed into the interval after it. A GPU that NVML reports lost, or reads that keep
failing (``LOST_AFTER_FAILED_READS`` in a row over ``LOST_AFTER_SECONDS``), raise ``GpuLost``: the sink then
meters by timing only (docs/metering.md, "A GPU that cannot be read").

The ``nvml`` argument is the ``pynvml`` module (nvidia-ml-py); tests pass a test double.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)
LOST_AFTER_FAILED_READS = 3  # reads in a row that failed, and
LOST_AFTER_SECONDS = 5.0  # how long they kept failing, before the GPU counts as lost (GPU_IS_LOST: at once)


@dataclasses.dataclass(frozen=True)
class GpuInterval:
    start: float  # monotonic seconds
    end: float
    busy_ms: float  # sum over devices of (end - start) x activity, in ms
    energy_mj: float | None  # energy the devices used in the interval; None where unsupported
    memory_used: int  # bytes, all devices, at the end of the interval
    activity: float  # mean activity of the devices, 0..1
    kind: Literal["gpm", "utilization"]


class NoGpu(Exception):
    """NVML is absent, or the engine has no GPU: metering falls back to timing only."""


class DevicesFileUnreadable(NoGpu):
    """The engine's devices file exists but cannot be read (permissions, I/O, not text): a misconfiguration."""


class GpuLost(Exception):
    """The engine's GPUs cannot be read any more: metering falls back to timing only for the pod's life."""


def parse_devices(text: str) -> list[str] | None:
    """NVIDIA_VISIBLE_DEVICES as the engine saw it: None for all GPUs, [] for none, else UUIDs/indices."""
    value = text.strip()
    if value.lower() == "all":
        return None
    if value.lower() in ("", "void", "none"):
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def gfd_product(name: str) -> str:
    """The nvidia.com/gpu.product label GPU feature discovery gives a device name ("NVIDIA H100 80GB HBM3")."""
    return "-".join(name.split())


def read_devices_file(path: str | Path, wait_seconds: float, stop: threading.Event,
                      gpus: int | None = None) -> list[str]:
    """Wait for the engine container to record its GPUs; NoGpu when it has none, never says, or says something that
    does not name its own GPUs: ``all`` (the gateway sees every GPU of the node) or not ``gpus`` of them."""
    deadline = time.monotonic() + wait_seconds
    file = Path(path)
    while True:
        try:
            text = file.read_text() if file.exists() else None
        except (OSError, UnicodeDecodeError) as exc:  # EACCES on a 0600 file of another uid, EIO, not UTF-8
            raise DevicesFileUnreadable(f"{path}: cannot read it: {exc}") from None
        if text is not None:
            devices = parse_devices(text)
            if devices == []:
                raise NoGpu(f"{path}: the engine has no GPU")
            if devices is None:
                raise NoGpu(f"{path}: the engine's NVIDIA_VISIBLE_DEVICES is 'all', which does not say which of "
                            "the node's GPUs are its own")
            if gpus is not None and len(devices) != gpus:
                raise NoGpu(f"{path}: the engine recorded {len(devices)} GPUs ({','.join(devices)}), not the "
                            f"{gpus} of gpusPerReplica")
            return devices
        if time.monotonic() >= deadline or stop.wait(0.5):
            raise NoGpu(f"{path}: the engine did not record its GPUs within {wait_seconds:g}s")


class _Device:
    def __init__(self, nvml: Any, handle: Any, gpm: bool) -> None:
        self.nvml, self.handle, self.gpm = nvml, handle, gpm
        self.energy_ok = True
        self.previous_energy: int | None = None
        self.samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()] if gpm else []
        self.primed = False

    def gpm_activity(self) -> float | None:
        nvml = self.nvml
        nvml.nvmlGpmSampleGet(self.handle, self.samples[1])
        primed, self.primed = self.primed, True
        self.samples.reverse()  # samples[0] is now the newest
        if not primed:
            return None
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 1
        request.sample1, request.sample2 = self.samples[1], self.samples[0]
        request.metrics[0].metricId = nvml.NVML_GPM_METRIC_GRAPHICS_UTIL
        nvml.nvmlGpmMetricsGet(request)
        if request.metrics[0].nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(request.metrics[0].nvmlReturn)
        return min(1.0, max(0.0, float(request.metrics[0].value) / 100.0))

    def energy_delta(self) -> int | None:
        if not self.energy_ok:
            return None
        try:
            total = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError as exc:
            if getattr(exc, "value", None) != self.nvml.NVML_ERROR_NOT_SUPPORTED:
                raise  # a failed read (a gap), not a GPU without the counter: energy comes back after it
            self.energy_ok = False
            return None
        previous, self.previous_energy = self.previous_energy, total
        return None if previous is None else max(0, total - previous)

    @property
    def unprimed(self) -> bool:
        """The next read only sets a baseline: no GPM sample, or no energy reading, to measure from."""
        return (self.gpm and not self.primed) or (self.energy_ok and self.previous_energy is None)

    def forget_readings(self) -> None:
        """After a gap: the next read is a baseline again, not the end of an interval spanning the gap."""
        self.previous_energy = None
        self.primed = False

    def close(self) -> None:
        for sample in self.samples:
            self.nvml.nvmlGpmSampleFree(sample)


class NvmlSampler:
    """Reads the devices; ``sample()`` returns the interval since the previous call (None the first time)."""

    def __init__(self, nvml: Any, devices: list[str] | None, clock: Callable[[], float] = time.monotonic,
                 lost_after_seconds: float = LOST_AFTER_SECONDS) -> None:
        self.nvml, self.clock = nvml, clock
        self.lost_after_seconds = lost_after_seconds
        self._wanted = devices
        self._failed_reads = 0  # in a row, since _failing_since
        self._failing_since = 0.0
        self._devices: list[_Device] = []
        self._last: float | None = None
        self.latest: GpuInterval | None = None
        self.product = ""

    def open(self) -> None:
        nvml = self.nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
            raise NoGpu(f"NVML unavailable: {exc}") from None
        try:
            handles = self._handles()
            if not handles:
                raise NoGpu("NVML reports no GPU")
            self._devices = [_Device(nvml, h, self._gpm_supported(h)) for h in handles]
            name = nvml.nvmlDeviceGetName(handles[0])
            self.product = gfd_product(name.decode() if isinstance(name, bytes) else str(name))
            self._read_all()  # prime GPM and energy counters; fails early on an unreadable device
        except Exception as exc:
            self.close()
            if isinstance(exc, nvml.NVMLError):
                raise NoGpu(f"NVML cannot read the engine's GPUs: {exc}") from None
            raise
        self._last = self.clock()

    @property
    def kind(self) -> Literal["gpm", "utilization"]:
        """gpm when every device offers GPM, else utilization."""
        return "gpm" if self._devices and all(d.gpm for d in self._devices) else "utilization"

    def _handles(self) -> list[Any]:
        nvml = self.nvml
        if self._wanted is None:
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for device in self._wanted:
            if device.isdigit():
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(device)))
            else:
                handles.append(nvml.nvmlDeviceGetHandleByUUID(device))
        return handles

    def _gpm_supported(self, handle: Any) -> bool:
        try:
            return bool(self.nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
        except (self.nvml.NVMLError, AttributeError):
            return False

    def _read_all(self) -> tuple[list[float | None], list[float], list[int | None], int]:
        gpm, util, energy, memory = [], [], [], 0
        for device in self._devices:
            gpm.append(device.gpm_activity() if device.gpm else None)
            util.append(float(self.nvml.nvmlDeviceGetUtilizationRates(device.handle).gpu) / 100.0)
            memory += int(self.nvml.nvmlDeviceGetMemoryInfo(device.handle).used)
            energy.append(device.energy_delta())
        return gpm, util, energy, memory

    def sample(self) -> GpuInterval | None:
        """The interval since the last call; None when a device could not be read (a gap, not a guess), and
        for the read after a gap, which only primes the energy counters and GPM samples again. GpuLost when the
        GPU is lost or the reads have kept failing (``_read_failed``)."""
        if self._last is None:
            raise RuntimeError("NvmlSampler.sample() before open()")
        priming = any(device.unprimed for device in self._devices)
        try:
            gpm, util, energy, memory = self._read_all()
        except self.nvml.NVMLError as exc:
            self._read_failed(exc)
            return None
        if self._failed_reads:
            log.info("NVML reads the engine's GPUs again, after %d failed reads", self._failed_reads)
            self._failed_reads = 0
        if priming:
            self._last = self.clock()
            return None
        now, start = self.clock(), self._last
        self._last = now
        activities = [g if g is not None else u for g, u in zip(gpm, util, strict=True)]
        kind: Literal["gpm", "utilization"] = "gpm" if all(g is not None for g in gpm) else "utilization"
        joules = None if any(e is None for e in energy) else float(sum(e or 0 for e in energy))
        interval = GpuInterval(start, now, (now - start) * 1000.0 * sum(activities), joules, memory,
                               sum(activities) / len(activities), kind)
        self.latest = interval
        return interval

    def _read_failed(self, exc: Exception) -> None:
        """A gap; logged when the reads begin to fail (not every period). GpuLost when NVML says the GPU is lost,
        or ``LOST_AFTER_FAILED_READS`` reads in a row failed over at least ``lost_after_seconds``."""
        for device in self._devices:  # some may have been read: their baselines would span the gap
            device.forget_readings()
        now = self._last = self.clock()
        if self._failed_reads == 0:
            self._failing_since = now
        self._failed_reads += 1
        if getattr(exc, "value", None) == self.nvml.NVML_ERROR_GPU_IS_LOST:
            raise GpuLost(f"NVML reports the GPU lost ({exc})")
        failing = now - self._failing_since
        if self._failed_reads >= LOST_AFTER_FAILED_READS and failing >= self.lost_after_seconds:
            raise GpuLost(f"{self._failed_reads} NVML reads in a row failed over {failing:.1f}s, the last: {exc}")
        if self._failed_reads == 1:
            log.warning("NVML read failed: intervals are skipped (gaps, billed to nobody) until it reads again, or "
                        "metering falls back to timing after %gs of failed reads: %s", self.lost_after_seconds, exc)

    def activity(self, max_age: float) -> float | None:
        """The latest mean activity (0..1); None when no interval ended in the last ``max_age`` seconds (reads
        failing or hung): no signal rather than a stale one."""
        latest = self.latest
        if latest is None or self.clock() - latest.end > max_age:
            return None
        return latest.activity

    def close(self) -> None:
        for device in self._devices:
            with contextlib.suppress(self.nvml.NVMLError):
                device.close()
        self._devices = []
        with contextlib.suppress(Exception):  # shutting down after a failed init raises; nothing to do
            self.nvml.nvmlShutdown()


class SamplerThread(threading.Thread):
    """Calls ``sampler.sample()`` every period on the period's grid and hands intervals on; when the GPU is lost
    (or sampling fails in a way NVML's errors do not cover) calls ``lost(reason)`` once and stops.

    A daemon thread: one stuck in an NVML call that does not return can be abandoned (the sink's ``close``)."""

    def __init__(self, sampler: NvmlSampler, period: float, deliver: Callable[[GpuInterval], None],
                 lost: Callable[[str], None]) -> None:
        super().__init__(name="tensorfleet-nvml-sampler", daemon=True)
        self.sampler, self.period, self.deliver, self.lost = sampler, period, deliver, lost
        self.stop_event = threading.Event()

    def run(self) -> None:
        origin = time.monotonic()
        ticks = 0
        while True:
            ticks += 1
            delay = origin + ticks * self.period - time.monotonic()
            if delay < 0:  # fell behind (a stall): skip to the next tick rather than sampling in a burst
                ticks += int(-delay // self.period) + 1
                delay = origin + ticks * self.period - time.monotonic()
            if self.stop_event.wait(max(0.0, delay)) or not self._sample():
                break
        self.sampler.close()

    def _sample(self) -> bool:
        """One sample handed on; False once the GPU is lost."""
        try:
            interval = self.sampler.sample()
        except GpuLost as exc:
            self.lost(str(exc))
            return False
        except Exception as exc:  # not an NVML error (a bug, a broken binding): sampling cannot go on
            log.exception("NVML sampling failed")
            self.lost(f"NVML sampling failed: {exc!r}")
            return False
        if interval is not None:
            self.deliver(interval)
        return True

    def stop(self) -> None:
        self.stop_event.set()
