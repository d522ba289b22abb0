"""The gateway's metering sink: ``open_sink(...)``, ``start``, ``submit`` (never blocks), ``close``.

Three threads do the work, none on the gateway's event loop: the NVML sampler (one interval per
period), the writer (every flush interval: journal events and intervals, settle, append, checkpoint)
and the exporter (ship records to the sink). ``submit`` only appends to an in-memory queue; an event
is durable once the next writer cycle has committed (within ``flush_interval_ms``).

Optional calls the gateway may make: ``admitted(request_id, at)`` when a request is sent to the
engine (intervals are then final as soon as nothing earlier is in flight, instead of after
``settle_after_seconds``; a request in flight longer than that has a share held for it, holds.py),
``reconfigure(config)`` when gateway.json changes (new prices apply to requests submitted afterwards),
``spool_full()`` to turn not-ready while the spool is full.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorfleet import config as settings_config
from tensorfleet.metering import chain, events, metrics, nvml, records, units
from tensorfleet.metering.events import ColdStartEvent, RequestEvent
from tensorfleet.metering.export import Exporter, ExporterThread, publish_spool
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.settings import MeteringSettings
from tensorfleet.metering.writer import Rejected, Submitted, UsageWriter, carry_journal, clear_journal, describe_event

log = logging.getLogger(__name__)
LOCAL_KEY_FILE = "signing-key.pem"
MAX_FAILED_CYCLES = 5
STALE_AFTER_PERIODS = 10  # gpu_utilization() is no signal once the latest interval is this many periods old


def open_sink(config: Mapping[str, Any], usage_dir: str | Path, gpu_product: str | None,
              devices_file: str | Path | None, settings: MeteringSettings | None = None,
              nvml_module: Any = None) -> MeteringSink:
    """The sink for a gateway; settings from TENSORFLEET_METERING_* unless given. ValueError on bad input."""
    settings = settings or settings_config.from_env(MeteringSettings)
    if problems := settings.validate():
        raise ValueError("; ".join(problems))
    if nvml_module is None:
        import pynvml

        nvml_module = pynvml
    devices = Path(devices_file) if devices_file else None
    return MeteringSink(config, Path(usage_dir), gpu_product or "", devices, settings, nvml_module)


def _signer(settings: MeteringSettings, usage_dir: Path) -> tuple[chain.Signer, bool]:
    """The cluster's key from the Secret when mounted, else a key kept on the usage volume."""
    if settings.signing_key_file and Path(settings.signing_key_file).exists():
        return chain.Signer(chain.load_private_key(settings.signing_key_file)), True
    if settings.signing_key_file:
        log.warning("%s does not exist (is the metering Secret missing?): signing with a pod-local key",
                    settings.signing_key_file)
    local = usage_dir / LOCAL_KEY_FILE
    if not local.exists():
        descriptor = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(chain.private_pem(chain.generate_key()))
    return chain.Signer(chain.load_private_key(local)), False


def _open_ledger(path: Path, signer: chain.Signer, labels: dict[str, str]) -> Ledger:
    """The ledger. One signed with another key (the key was changed) is set aside under a name no other file has,
    never appended to again; its journal (requests not settled yet) moves into the new ledger, which bills them.

    Crash-safe: the new ledger is built beside it (``<ledger>.new``) with a copy of the journal, then the old one is
    renamed away and the new one into place. A start that finds only ``<ledger>.new`` finishes the second rename;
    one that finds both, with the old key still in use, drops the copy (the old ledger still has its journal).
    """
    staged = path.with_name(path.name + ".new")
    if staged.exists() and not path.exists():  # a key change stopped between its two renames
        _rename(staged, path)
    while (old_key := _key_of(path)) not in (None, signer.key_id):
        _set_aside(path, staged, old_key, signer, labels)
    _remove_database(staged)
    return Ledger(path, signer, labels)


def _set_aside(path: Path, staged: Path, old_key: str, signer: chain.Signer, labels: dict[str, str]) -> None:
    _remove_database(staged)  # an earlier try's copy: the old ledger still holds its journal
    new = Ledger(staged, signer, labels)
    try:
        carried, new_id = carry_journal(path, new), new.ledger_id
    finally:
        new.close()
    _checkpoint(path)
    aside = _free_name(path, old_key)
    _rename(path, aside)
    _rename(staged, path)
    clear_journal(aside, new_id)
    log.error("the signing key changed: %s set aside as %s, never appended to (verify and report still read it); "
              "its %d requests not settled yet moved to the new ledger, which bills them", path, aside, carried)


def _key_of(path: Path) -> str | None:
    """The key id a ledger file is signed with; None when there is no ledger there yet."""
    if not path.exists():
        return None
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'key_id'").fetchone()
    except sqlite3.OperationalError:  # an empty file: Ledger makes it one
        return None
    finally:
        conn.close()
    return None if row is None else str(row[0])


def _checkpoint(path: Path) -> None:
    """Move everything in the ledger's write-ahead log into the file, so renaming the file takes all of it."""
    conn = sqlite3.connect(str(path), timeout=30)
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        conn.close()
    wal = Path(f"{path}-wal")
    if busy or (wal.exists() and wal.stat().st_size > 0):
        raise RuntimeError(f"{path} is in use by another process: cannot set it aside after the signing key changed")


def _free_name(path: Path, old_key: str) -> Path:
    """``usage.<keyid>.db``, or ``usage.<keyid>.<n>.db`` with the least n >= 2 that no file (or its WAL) has."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", old_key)[:64] or "unknown"
    for n in itertools.count(1):
        candidate = path.with_name(f"{path.stem}.{key}{'' if n == 1 else f'.{n}'}{path.suffix}")
        if not any(Path(f"{candidate}{tail}").exists() for tail in ("", "-wal", "-shm", "-journal")):
            return candidate
    raise AssertionError("unreachable")


def _rename(source: Path, target: Path) -> None:
    """Rename, never onto an existing file, and make the rename durable (fsync of the directory)."""
    if target.exists():
        raise FileExistsError(f"{target} exists: not replacing it with {source}")
    os.rename(source, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_database(path: Path) -> None:
    for tail in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{tail}").unlink(missing_ok=True)


class MeteringSink:
    def __init__(self, config: Mapping[str, Any], usage_dir: Path, gpu_product: str, devices_file: Path | None,
                 settings: MeteringSettings, nvml_module: Any) -> None:
        self.settings, self.usage_dir, self.devices_file = settings, usage_dir, devices_file
        self.pod = os.environ.get("POD_NAME") or socket.gethostname()
        self._nvml = nvml_module
        self._gpu_product = gpu_product
        self._config = dict(config)
        self._table = units.load_table((config.get("metering") or {}).get("resourceUnits"), settings.ru_table_file)
        self._ctx = records.context_from_config(config, self.pod, gpu_product, self._table)
        self._queue: collections.deque[Submitted] = collections.deque()
        self._rejected: collections.deque[Rejected] = collections.deque()  # for the quarantine table
        self._intervals: collections.deque[nvml.GpuInterval] = collections.deque()
        self._lock = threading.Lock()
        self._journal_progress = threading.Condition()
        self._admissions: dict[str, float] = {}
        self._hints = False
        self._submitted = self._journalled = 0
        self._stop = threading.Event()
        self._stop_measuring = threading.Event()
        self._opener: threading.Thread | None = None
        self._sampler: nvml.SamplerThread | None = None
        self._timing_from: float | None = None  # set (under _lock) once metering is by timing: never unset
        self._writer: UsageWriter | None = None
        self._threads: list[threading.Thread] = []
        self._exporter: ExporterThread | None = None
        self._started = time.monotonic()
        self._spool_full = False

    # -- the gateway's side ----------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        self.usage_dir.mkdir(parents=True, exist_ok=True)
        signer, from_secret = _signer(self.settings, self.usage_dir)
        metrics.SIGNING_KEY.set(1 if from_secret else 0)
        labels = {"namespace": self._ctx.namespace, "service": self._ctx.service, "pod": self.pod}
        ledger = _open_ledger(self.usage_dir / self.settings.ledger_file, signer, labels)
        writer = UsageWriter(ledger, self._ctx.gpus, self.settings.prefill_token_weight,
                             self.settings.checkpoint_every_records, self.settings.checkpoint_interval_seconds,
                             self.settings.max_tenant_labels,
                             "admission" if self.settings.prompt_placement == "admission" else "steps",
                             self.settings.engine_step_tokens or None)
        restored = writer.restore()
        if restored:
            log.info("restored %d journalled requests", restored)
        self._writer = writer
        self._opener = threading.Thread(target=self._start_measurement, name="tensorfleet-nvml-open", daemon=True)
        self._threads = [threading.Thread(target=self._write_loop, name="tensorfleet-usage-writer", daemon=True),
                         self._opener]
        if self.settings.sink_url:
            token = Path(self.settings.sink_token_file).read_text().strip() if self.settings.sink_token_file \
                and Path(self.settings.sink_token_file).exists() else None
            exporter = Exporter(Ledger(ledger.path, signer), self.settings, token)
            self._exporter = ExporterThread(exporter, self.settings)
            self._threads.append(self._exporter)
        else:  # no export: no record waits for one (the exporter publishes the spool gauges otherwise)
            publish_spool(0, self.settings)
        for thread in self._threads:
            thread.start()

    def submit(self, event: RequestEvent | ColdStartEvent) -> None:
        """Queue the event; never blocks, never raises. An event no record can be made of (a time that is not
        finite, a negative token count, ...) is refused: logged, counted, and kept in the quarantine table only."""
        try:
            if len(self._queue) + len(self._rejected) >= self.settings.max_queued_events:
                metrics.EVENTS_DROPPED.inc()
                self._ended_without_event(event)
                return
            problem = (events.request_problem(event) if isinstance(event, RequestEvent)
                       else events.cold_start_problem(event))
            if problem is not None:
                log.warning("metering: %s refused, not billed (kept in the quarantine table): %s",
                            describe_event(event), problem[1])
                metrics.EVENTS_REJECTED.labels(problem[0]).inc()
                self._rejected.append((self._ctx, event, problem))
                self._ended_without_event(event)
            else:
                self._queue.append((self._ctx, event))
            self._submitted += 1
        except Exception:  # the response path must never see metering fail
            log.exception("metering could not take an event")

    def admitted(self, request_id: str, at: float) -> None:
        """The gateway sent ``request_id`` to the engine at monotonic time ``at`` (optional hint). The request is
        in flight until its event is journalled; the gateway submits an event for every request it admitted."""
        with self._lock:
            self._hints = True
            if len(self._admissions) >= self.settings.max_queued_events:  # a bound on memory, never reached by
                oldest = min(self._admissions, key=self._admissions.__getitem__)  # a gateway that submits them all
                del self._admissions[oldest]
                log.warning("metering: over %d requests in flight; no longer waiting for %s",
                            self.settings.max_queued_events, oldest)
            self._admissions[request_id] = at

    def _ended_without_event(self, event: RequestEvent | ColdStartEvent) -> None:
        """An event that will not be attributed (refused or dropped): its request is no longer in flight."""
        if isinstance(event, RequestEvent) and isinstance(event.request_id, str):
            with self._lock:
                self._admissions.pop(event.request_id, None)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """gateway.json changed: prices and RU overrides apply to requests submitted from now on."""
        table = units.load_table((config.get("metering") or {}).get("resourceUnits"), self.settings.ru_table_file)
        self._table, self._config = table, dict(config)
        self._ctx = records.context_from_config(config, self.pod, self._ctx.gpu_product, table)

    def gpu_utilization(self) -> float | None:
        """Latest mean activity of the engine's GPUs (0..1); None without a GPU, once metering is by timing, and
        while no reading is younger than ``STALE_AFTER_PERIODS`` sample periods (the autoscaler sees no signal)."""
        sampler = self._sampler
        if sampler is None or self._timing_from is not None:
            return None
        return sampler.sampler.activity(STALE_AFTER_PERIODS * self.settings.sample_period_ms / 1000.0)

    def spool_full(self) -> bool:
        return self._spool_full

    async def drain(self) -> None:
        """Wait until everything submitted so far is journalled (durable); bound it with asyncio.timeout."""
        target = self._submitted

        def wait() -> None:
            with self._journal_progress:
                self._journal_progress.wait_for(lambda: self._journalled >= target or self._stop.is_set())

        await asyncio.to_thread(wait)

    async def close(self) -> None:
        """Stop sampling, settle and sign everything, try a last export."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._stop_measurement()
        self._stop.set()
        with self._journal_progress:  # a drain() still waiting (its caller's timeout passed) sees the stop
            self._journal_progress.notify_all()
        for thread in self._threads:
            if thread is not self._exporter and thread is not self._opener:
                thread.join()
        if self._exporter is not None:  # stopped after the writer's last cycle, so it ships the final records
            self._exporter.stop()
            self._exporter.join()
        if self._writer is not None:
            self._writer.ledger.close()

    # -- measurement -----------------------------------------------------------------------------
    def _start_measurement(self) -> None:
        try:
            sampler = self._open_sampler()
        except nvml.NoGpu as exc:
            unreadable = isinstance(exc, nvml.DevicesFileUnreadable)
            self._fall_back_to_timing(str(exc), logging.WARNING if unreadable else logging.INFO)
            return
        except Exception as exc:  # not foreseen: still meter, by timing, rather than not at all
            log.exception("metering could not start NVML sampling")
            self._fall_back_to_timing(f"NVML sampling could not start: {exc!r}")
            return
        if not self._gpu_product and sampler.product:
            self._gpu_product = sampler.product
            self._ctx = records.context_from_config(self._config, self.pod, sampler.product, self._table)
        thread = nvml.SamplerThread(sampler, self.settings.sample_period_ms / 1000.0, self._take_interval,
                                    self._sampler_lost)
        with self._lock:  # against _stop_measurement: a sampler is either started and stopped there, or not started
            started = not self._stop_measuring.is_set() and self._timing_from is None
            if started:
                self._sampler = thread
                metrics.SAMPLER_UP.set(1)
        if started:
            thread.start()
        else:
            sampler.close()

    def _open_sampler(self) -> nvml.NvmlSampler:
        # Without a devices file (the gateway outside a pod) every visible GPU is the engine's.
        devices = (nvml.read_devices_file(self.devices_file, self.settings.devices_wait_seconds, self._stop_measuring,
                                          self._ctx.gpus)
                   if self.devices_file is not None else None)
        sampler = nvml.NvmlSampler(self._nvml, devices)
        sampler.open()
        return sampler

    def _fall_back_to_timing(self, reason: str, level: int = logging.WARNING) -> None:
        """Meter by timing from now on, for the pod's life: the writer estimates every interval from the last one
        delivered (or from the sink's start) and marks the records estimated. Logged once, with the reason."""
        with self._lock:
            if self._timing_from is not None:
                return
            self._timing_from = self._started  # where timing starts when no interval was ever delivered
            metrics.SAMPLER_UP.set(0)
        log.log(level, "metering by timing only (records are marked estimated): %s", reason)

    def _sampler_lost(self, reason: str) -> None:
        self._fall_back_to_timing(f"the engine's GPUs cannot be read any more ({reason}); NVML is not read again "
                                  "until the gateway restarts")

    def _stop_measurement(self) -> None:
        """Stop opening and sampling NVML, waiting a bounded time: an NVML call that does not return (a GPU falling
        off the bus) must not hold the final settle. A thread still in NVML is abandoned (a daemon) and what it did
        not measure is estimated by timing."""
        bound = 2 * self.settings.sample_period_ms / 1000.0 + 1.0
        self._stop_measuring.set()
        if self._opener is not None and self._opener.is_alive():
            self._opener.join(bound)
            if self._opener.is_alive():
                self._fall_back_to_timing(f"NVML did not open the engine's GPUs within {bound:g}s of shutting down")
        sampler = self._sampler
        if sampler is not None:
            sampler.stop()
            sampler.join(bound)
            if sampler.is_alive():
                self._fall_back_to_timing(f"an NVML call did not return within {bound:g}s of shutting down: the "
                                          "time since the last interval is estimated")

    def _take_interval(self, interval: nvml.GpuInterval) -> None:
        with self._lock:
            if self._timing_from is not None:  # from a sampler abandoned in a hung call: timing covers its time
                return
            self._intervals.append(interval)
        metrics.GPU_MEMORY_USED.set(interval.memory_used)

    # -- the writer thread -----------------------------------------------------------------------
    def _write_loop(self) -> None:
        period = self.settings.flush_interval_ms / 1000.0
        failures = 0
        while not self._stop.wait(period):
            failures = self._cycle(final=False, failures=failures)
        # The last cycle settles everything; when it fails it is retried like any other (a failed last cycle
        # used to end the thread, losing the events it had taken from the queue).
        failures = self._cycle(final=True, failures=0)
        while 0 < failures < MAX_FAILED_CYCLES:
            time.sleep(period)
            failures = self._cycle(final=True, failures=failures)

    def _watermark(self, now: float) -> tuple[float, dict[str, float] | None]:
        """Where intervals are final, and the requests in flight (None without admission hints). With hints,
        an interval is final once everything admitted before its end was reported, but never later than the
        settle horizon: a request still in flight there has a share held for it (holds.py), not dropped."""
        lag = 2 * (self.settings.flush_interval_ms + self.settings.sample_period_ms) / 1000.0
        horizon = now - self.settings.settle_after_seconds
        with self._lock:
            if not self._hints:
                return horizon, None
            in_flight = dict(self._admissions)
        return min(now - lag, max(horizon, min(in_flight.values(), default=math.inf))), in_flight

    def _cycle(self, final: bool, failures: int) -> int:
        writer = self._writer
        assert writer is not None
        if self._timing_from is not None and writer.measurement != "timing":  # no GPU, or no longer readable
            writer.start_timing(self._timing_from, self.settings.sample_period_ms / 1000.0)
        if self._sampler is not None and writer.measurement is None:
            writer.measurement = self._sampler.sampler.kind
        taken = [self._queue.popleft() for _ in range(len(self._queue))]
        rejected = [self._rejected.popleft() for _ in range(len(self._rejected))]
        intervals = [self._intervals.popleft() for _ in range(len(self._intervals))]
        with self._lock:
            for _, event in taken:
                if isinstance(event, RequestEvent):
                    self._admissions.pop(event.request_id, None)
        watermark, in_flight = self._watermark(time.monotonic())
        try:
            writer.cycle(taken, intervals, math.inf if final else watermark, time.monotonic(), final=final,
                         rejected=rejected, open_requests=in_flight)
        except Exception:
            if failures == 0:
                log.exception("metering writer cycle failed; will retry")
            _reload(writer, report=failures == 0)
            if failures + 1 >= MAX_FAILED_CYCLES and (taken or rejected):
                metrics.EVENTS_DROPPED.inc(len(taken) + len(rejected))
                log.error("dropping %d events that failed %d cycles", len(taken) + len(rejected), MAX_FAILED_CYCLES)
                self._intervals.extendleft(reversed(intervals))
                return failures + 1
            self._queue.extendleft(reversed(taken))
            self._rejected.extendleft(reversed(rejected))
            self._intervals.extendleft(reversed(intervals))
            return failures + 1
        with self._journal_progress:
            self._journalled += len(taken) + len(rejected)
            self._journal_progress.notify_all()
        if taken and self.settings.sink_url:
            self._spool_full = writer.ledger.spool_size() >= self.settings.spool_max_records
        return 0


def _reload(writer: UsageWriter, report: bool) -> None:
    """A failed cycle rolled the journal back, but not the writer's memory (attribution, pending events):
    rebuild that from the journal, so the retry neither counts an interval twice nor skips an event."""
    try:
        writer.restore()
    except Exception:
        if report:  # once per run of failures, like the cycle's own error
            log.exception("metering writer could not reload its journal after a failed cycle")
