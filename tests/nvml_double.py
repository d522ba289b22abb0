"""A test double of the pynvml module: the NVML calls the sampler makes, on scripted devices (tests only)."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import pynvml


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


NOT_SUPPORTED, GPU_IS_LOST, LIBRARY_NOT_FOUND, UNKNOWN = 3, 15, 12, 999


@dataclasses.dataclass
class DeviceDouble:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    utilization: int = 0  # percent, as nvmlDeviceGetUtilizationRates().gpu
    gpm: bool = True
    gpm_activity: float = 0.0  # percent between the last two GPM samples
    memory_used: int = 10 * 2**30
    energy_mj: int = 1_000_000
    energy_supported: bool = True
    energy_error: int | None = None  # an NVML error the energy counter's next reads raise
    error: int | None = None  # an NVML error every read of the device raises (a failed read, a gap)
    lost: bool = False  # every read raises NVML_ERROR_GPU_IS_LOST (XID 79: the GPU fell off the bus)


class NvmlDouble:
    """Stands in for ``pynvml``; attribute names are NVML's."""

    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_ERROR_GPU_IS_LOST = GPU_IS_LOST
    NVML_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION
    NVML_GPM_METRIC_GRAPHICS_UTIL = pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL
    NVMLError = NVMLError

    class c_nvmlGpmMetricsGet_t:
        def __init__(self) -> None:
            self.version = self.numMetrics = 0
            self.sample1: dict[str, Any] | None = None
            self.sample2: dict[str, Any] | None = None
            self.metrics = [types.SimpleNamespace(metricId=0, nvmlReturn=-1, value=0.0) for _ in range(4)]

    def __init__(self, devices: list[DeviceDouble], driver_loaded: bool = True) -> None:
        self.devices = devices
        self.driver_loaded = driver_loaded
        self.initialised = False
        self.samples_alive = 0
        self.calls: list[str] = []
        self._activity: list[tuple[int, DeviceDouble, float]] = []  # (attempt, device, activity) per GPM sample

    def _device(self, handle: DeviceDouble) -> DeviceDouble:
        if handle.lost:
            raise NVMLError(GPU_IS_LOST)
        if handle.error is not None:
            raise NVMLError(handle.error)
        return handle

    def nvmlInit(self) -> None:
        if not self.driver_loaded:
            raise NVMLError(LIBRARY_NOT_FOUND)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> DeviceDouble:
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> DeviceDouble:
        self.calls.append(f"uuid:{uuid}")
        for device in self.devices:
            if device.uuid == uuid:
                return device
        raise NVMLError(13)  # NVML_ERROR_NOT_FOUND

    def nvmlDeviceGetName(self, handle: DeviceDouble) -> str:
        return handle.name

    def nvmlDeviceGetUtilizationRates(self, handle: DeviceDouble) -> Any:
        return types.SimpleNamespace(gpu=self._device(handle).utilization, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: DeviceDouble) -> Any:
        return types.SimpleNamespace(used=self._device(handle).memory_used, total=80 * 2**30)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: DeviceDouble) -> int:
        if not handle.energy_supported:
            raise NVMLError(NOT_SUPPORTED)
        if handle.energy_error is not None:
            raise NVMLError(handle.energy_error)
        return self._device(handle).energy_mj

    def nvmlGpmQueryDeviceSupport(self, handle: DeviceDouble) -> Any:
        return types.SimpleNamespace(isSupportedDevice=1 if handle.gpm else 0)

    def nvmlGpmSampleAlloc(self) -> dict[str, Any]:
        self.samples_alive += 1
        return {"device": None}

    def nvmlGpmSampleFree(self, sample: dict[str, Any]) -> None:
        self.samples_alive -= 1

    def nvmlGpmSampleGet(self, handle: DeviceDouble, sample: dict[str, Any]) -> dict[str, Any]:
        self._taken += 1
        # The device worked through the period whether or not it could be read: a failed attempt still
        # counts towards the activity GPM reports over a span that includes it.
        self._activity.append((self._taken, handle, handle.gpm_activity))
        sample.update(device=self._device(handle), taken=self._taken)
        return sample

    _taken = 0

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        # The real call compares two opaque samples: the activity over the whole span between them. Here it
        # is the mean of the activity scripted at each sample attempt after the older sample, up to the newer.
        assert request.version == self.NVML_GPM_METRICS_GET_VERSION
        assert request.numMetrics == 1
        device = request.sample2["device"]
        assert request.sample1["device"] is device, "samples of two devices"
        first, last = request.sample1["taken"], request.sample2["taken"]
        assert first < last, "sample2 must be the newer sample"
        assert request.metrics[0].metricId == self.NVML_GPM_METRIC_GRAPHICS_UTIL
        span = [activity for taken, d, activity in self._activity if d is device and first < taken <= last]
        request.metrics[0].nvmlReturn = self.NVML_SUCCESS
        request.metrics[0].value = sum(span) / len(span)
        return request
