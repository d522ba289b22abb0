"""The NVML sampler against a test double of pynvml."""

from __future__ import annotations

import itertools
import logging
import re
import threading
from pathlib import Path

import pytest

from nvml_double import UNKNOWN, DeviceDouble, NvmlDouble
from tensorfleet.metering import nvml


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sampler_on(devices: list[DeviceDouble], wanted: list[str] | None) -> tuple[nvml.NvmlSampler, NvmlDouble, Clock]:
    double, clock = NvmlDouble(devices), Clock()
    sampler = nvml.NvmlSampler(double, wanted, clock=clock)
    sampler.open()
    return sampler, double, clock


def test_gpm_activity_over_the_interval_is_the_busy_time_summed_over_the_engines_devices() -> None:
    devices = [DeviceDouble("GPU-a"), DeviceDouble("GPU-b"), DeviceDouble("GPU-other")]
    sampler, _, clock = sampler_on(devices, ["GPU-a", "GPU-b"])
    devices[0].gpm_activity, devices[1].gpm_activity, devices[2].gpm_activity = 50.0, 25.0, 100.0
    devices[0].energy_mj += 30_000
    devices[1].energy_mj += 10_000
    clock.now += 0.1
    interval = sampler.sample()
    assert interval is not None
    assert interval.kind == "gpm"
    assert interval.busy_ms == pytest.approx(100.0 * 0.5 + 100.0 * 0.25)  # the other GPU is not the engine's
    assert interval.energy_mj == 40_000
    assert interval.memory_used == 2 * 10 * 2**30
    assert interval.activity == pytest.approx(0.375)
    assert (interval.start, interval.end) == (100.0, pytest.approx(100.1))
    assert sampler.product == "NVIDIA-H100-80GB-HBM3"


def test_without_gpm_the_utilization_rate_is_used() -> None:
    device = DeviceDouble("GPU-a", name="NVIDIA A100-SXM4-80GB", gpm=False, utilization=80)
    sampler, _, clock = sampler_on([device], ["0"])
    clock.now += 0.2
    interval = sampler.sample()
    assert interval is not None
    assert interval.kind == "utilization"
    assert sampler.kind == "utilization"
    assert interval.busy_ms == pytest.approx(160.0)
    assert sampler.product == "NVIDIA-A100-SXM4-80GB"


def test_an_unreadable_device_yields_no_interval_rather_than_a_guess() -> None:
    device = DeviceDouble("GPU-a", gpm_activity=90.0)
    sampler, _, clock = sampler_on([device], None)
    device.error = UNKNOWN
    clock.now += 0.1
    assert sampler.sample() is None
    device.error = None
    clock.now += 0.1
    assert sampler.sample() is None  # the read after the gap primes the counters again
    clock.now += 0.1
    after = sampler.sample()
    assert after is not None
    assert (after.start, after.end) == (pytest.approx(100.2), pytest.approx(100.3))
    assert after.activity == pytest.approx(0.9)


def test_the_energy_and_activity_of_a_gap_are_not_billed_into_the_interval_after_it() -> None:
    """Steady 100 mJ and full activity per 100 ms; during the unreadable period one device used 500 mJ and
    was idle, the other (read fine) 300 mJ. Every interval after the gap holds only its own readings."""
    devices = [DeviceDouble("GPU-a", gpm_activity=100.0), DeviceDouble("GPU-b", gpm_activity=100.0)]
    sampler, _, clock = sampler_on(devices, None)

    def period(lost: bool = False, energy: tuple[int, int] = (100, 100),
               activity: float = 100.0) -> nvml.GpuInterval | None:
        clock.now += 0.1
        for device, used in zip(devices, energy, strict=True):
            device.energy_mj += used
            device.gpm_activity = activity
        devices[1].error = UNKNOWN if lost else None
        return sampler.sample()

    before = period()
    assert before is not None
    assert (before.energy_mj, before.activity) == (200, pytest.approx(1.0))
    assert period(lost=True, energy=(300, 500), activity=0.0) is None  # GPU-a was read, GPU-b was not
    assert period() is None  # priming again
    after = [i for i in (period() for _ in range(3)) if i is not None]
    assert [i.energy_mj for i in after] == [200, 200, 200]
    assert [i.activity for i in after] == [pytest.approx(1.0)] * 3
    assert [i.busy_ms for i in after] == [pytest.approx(200.0)] * 3
    assert [i.start for i in after] == [pytest.approx(100.3), pytest.approx(100.4), pytest.approx(100.5)]


def test_a_failed_energy_read_is_a_gap_and_energy_comes_back_after_it() -> None:
    """Only a GPU without the counter loses energy for good; one failed read skips its interval."""
    device = DeviceDouble("GPU-a", gpm_activity=100.0)
    sampler, _, clock = sampler_on([device], None)

    def period(error: int | None = None) -> nvml.GpuInterval | None:
        clock.now += 0.1
        device.energy_mj += 100
        device.energy_error = error
        return sampler.sample()

    assert period(error=UNKNOWN) is None
    assert period() is None  # priming again
    assert [i.energy_mj for i in (period(), period()) if i is not None] == [100, 100]


def test_a_lost_gpu_is_reported_at_once_not_sampled_as_gaps_forever() -> None:
    # Before, NVML_ERROR_GPU_IS_LOST (XID 79) was a gap like any failed read, every period for the pod's life: no
    # interval came, no request after it settled, and a warning was logged every 100 ms.
    device = DeviceDouble("GPU-a", gpm_activity=50.0)
    sampler, _, clock = sampler_on([device], None)
    device.lost = True
    clock.now += 0.1
    with pytest.raises(nvml.GpuLost, match="lost"):
        sampler.sample()


def test_reads_failing_past_the_bound_mean_the_gpu_is_lost_and_are_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    device = DeviceDouble("GPU-a", gpm_activity=50.0, error=None)
    sampler, _, clock = sampler_on([device], None)
    device.error = UNKNOWN
    with caplog.at_level(logging.WARNING, logger=nvml.__name__):
        for _ in range(nvml.LOST_AFTER_FAILED_READS + 5):  # many reads, but within the time bound: gaps
            clock.now += 0.1
            assert sampler.sample() is None
        clock.now += nvml.LOST_AFTER_SECONDS
        with pytest.raises(nvml.GpuLost, match=r"reads in a row failed over 5\.\ds"):
            sampler.sample()
    assert len(caplog.records) == 1  # once when the reads began to fail, not once per period


def test_the_latest_activity_is_no_signal_once_older_than_its_bound() -> None:
    device = DeviceDouble("GPU-a", gpm_activity=50.0)
    sampler, _, clock = sampler_on([device], None)
    clock.now += 0.1
    assert sampler.sample() is not None
    assert sampler.activity(max_age=1.0) == pytest.approx(0.5)
    device.error = UNKNOWN
    clock.now += 1.1
    assert sampler.sample() is None
    assert sampler.activity(max_age=1.0) is None  # not the last good reading, indefinitely


def test_the_sampler_thread_reports_a_lost_gpu_and_stops() -> None:
    device = DeviceDouble("GPU-a", gpm_activity=40.0)
    double = NvmlDouble([device])
    sampler = nvml.NvmlSampler(double, None)
    sampler.open()
    device.lost = True
    reasons: list[str] = []
    thread = nvml.SamplerThread(sampler, 0.01, lambda interval: None, reasons.append)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert len(reasons) == 1
    assert "lost" in reasons[0]
    assert not double.initialised


def test_energy_is_absent_where_the_gpu_has_no_counter() -> None:
    sampler, _, clock = sampler_on([DeviceDouble("GPU-a", energy_supported=False)], None)
    clock.now += 0.1
    interval = sampler.sample()
    assert interval is not None
    assert interval.energy_mj is None


def test_no_driver_means_no_gpu_and_nothing_is_sampled() -> None:
    sampler = nvml.NvmlSampler(NvmlDouble([], driver_loaded=False), None)
    with pytest.raises(nvml.NoGpu, match="NVML unavailable"):
        sampler.open()


def test_unknown_device_of_the_engine_means_no_gpu() -> None:
    double = NvmlDouble([DeviceDouble("GPU-a")])
    with pytest.raises(nvml.NoGpu, match="cannot read"):
        nvml.NvmlSampler(double, ["GPU-missing"]).open()
    assert not double.initialised
    assert double.samples_alive == 0


def test_close_frees_gpm_samples_and_shuts_nvml_down() -> None:
    sampler, double, _ = sampler_on([DeviceDouble("GPU-a"), DeviceDouble("GPU-b")], None)
    assert double.samples_alive == 4
    sampler.close()
    assert double.samples_alive == 0
    assert not double.initialised


@pytest.mark.parametrize(("text", "expected"), [("all", None), ("", []), ("void", []), ("none", []),
                                                ("GPU-1,GPU-2", ["GPU-1", "GPU-2"]), ("0, 3", ["0", "3"])])
def test_parse_devices(text: str, expected: list[str] | None) -> None:
    assert nvml.parse_devices(text) == expected


def test_gfd_product_label_from_the_device_name() -> None:
    assert nvml.gfd_product("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert nvml.gfd_product("Tesla T4") == "Tesla-T4"


def test_devices_file_missing_or_empty_means_timing_only(tmp_path: Path) -> None:
    with pytest.raises(nvml.NoGpu, match="did not record"):
        nvml.read_devices_file(tmp_path / "absent", 0.0, threading.Event())
    (tmp_path / "empty").write_text("")
    with pytest.raises(nvml.NoGpu, match="has no GPU"):
        nvml.read_devices_file(tmp_path / "empty", 0.0, threading.Event())
    (tmp_path / "two").write_text("GPU-1,GPU-2")
    assert nvml.read_devices_file(tmp_path / "two", 0.0, threading.Event()) == ["GPU-1", "GPU-2"]


@pytest.mark.parametrize(("error", "problem"), [
    (PermissionError(13, "Permission denied"), "Permission denied"),
    (OSError(5, "Input/output error"), "Input/output error"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "invalid start byte"),
])
def test_a_devices_file_that_cannot_be_read_means_timing_only_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, problem: str) -> None:
    # Before, the error escaped (an engine running as root with umask 077 writes the file 0600; the gateway runs as
    # uid 65532) and killed the thread that starts metering: neither NVML nor timing-only metering ran.
    devices = tmp_path / "visible-devices"
    devices.write_text("GPU-1")

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        raise error

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(nvml.NoGpu, match=f"{re.escape(str(devices))}: cannot read it: .*{problem}"):
        nvml.read_devices_file(devices, 0.0, threading.Event(), gpus=1)


@pytest.mark.parametrize(("text", "problem"), [
    ("all", "NVIDIA_VISIBLE_DEVICES is 'all'"), ("GPU-1,GPU-2", "recorded 2 GPUs (GPU-1,GPU-2), not the 1 of"),
])
def test_devices_that_are_not_the_engines_own_mean_timing_only(tmp_path: Path, text: str, problem: str) -> None:
    # Before, "all" made the gateway (which sees every GPU of the node) meter all of them: a 1-GPU service was billed
    # its neighbours' busy time (710 GPU-ms for 100 ms on an 8-GPU node).
    (tmp_path / "visible-devices").write_text(text)
    with pytest.raises(nvml.NoGpu, match=re.escape(problem)):
        nvml.read_devices_file(tmp_path / "visible-devices", 0.0, threading.Event(), gpus=1)


def test_sampler_thread_samples_on_its_period_and_stops() -> None:
    device = DeviceDouble("GPU-a", gpm_activity=40.0)
    double = NvmlDouble([device])
    sampler = nvml.NvmlSampler(double, None)
    sampler.open()
    got: list[nvml.GpuInterval] = []
    done = threading.Event()

    def deliver(interval: nvml.GpuInterval) -> None:
        got.append(interval)
        if len(got) >= 3:
            done.set()

    thread = nvml.SamplerThread(sampler, 0.01, deliver, lambda reason: None)
    thread.start()
    assert done.wait(5)
    thread.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert not double.initialised
    assert all(g.kind == "gpm" and g.activity == pytest.approx(0.4) for g in got)
    assert all(a.end == pytest.approx(b.start) for a, b in itertools.pairwise(got))
