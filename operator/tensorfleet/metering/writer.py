"""One writer cycle: journal what came in, finalise GPU intervals, settle requests into signed records.

Everything a cycle does is one SQLite transaction, so ``kill -9`` at any point leaves either the cycle
done or not started. After a restart ``restore`` rebuilds the attribution from the journal (``pending``
events with their shares so far, and the ``intervals`` not final yet), and settling goes on where it
stopped: no record twice, none lost once its event was journalled.

An event no record can be made of never fails a cycle: it is refused before the journal (the sink's ``submit``
and ``_take_events`` check it), or, when its record still cannot be built, moved with its GPU share to the
``quarantine`` table while the rest of the cycle settles. A signing-key change carries the journal into the new
ledger (``carry_journal``), which bills what the old one had not settled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorfleet.metering import events, metrics, records
from tensorfleet.metering.attribution import Attributor, Finalised, Placement, Settled, Share, work_spans
from tensorfleet.metering.events import ColdStartEvent, Problem, RequestEvent
from tensorfleet.metering.holds import Hold
from tensorfleet.metering.ledger import Ledger, boot_id, pending_energy, utc_now
from tensorfleet.metering.nvml import GpuInterval
from tensorfleet.metering.records import Measurement, RecordContext

log = logging.getLogger(__name__)
Submitted = tuple[RecordContext, RequestEvent | ColdStartEvent]
Rejected = tuple[RecordContext, RequestEvent | ColdStartEvent, Problem]  # refused on entry, with why

# Events no record can be made of, kept beside the journal for an operator (never settled, never exported):
# refused on entry (``problem`` names the field), or whose record could not be built (``problem`` is the error).
QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    key TEXT NOT NULL, request_id TEXT, event TEXT NOT NULL, context TEXT NOT NULL,
    gpu_ms REAL, energy_mj REAL, covered REAL, problem TEXT NOT NULL, quarantined_at TEXT NOT NULL);
"""
# The journal: what a restart (or a ledger replacing this one) needs to go on settling where this one stopped.
JOURNAL_TABLES = {"pending": "key, arrival, event, context, gpu_ms, energy_mj, covered",
                  "intervals": "k, start, end, busy_ms, energy_mj, kind",
                  "quarantine": "key, request_id, event, context, gpu_ms, energy_mj, covered, problem, quarantined_at"}
JOURNAL_META = ("boot_id", "frontier", "last_end", "step_model", "measurement", "holds")
MEASUREMENTS: tuple[Measurement, ...] = ("gpm", "utilization", "timing")


@dataclasses.dataclass
class CycleResult:
    records: int = 0
    billed_ms: float = 0.0
    excluded_ms: float = 0.0
    unattributed_ms: float = 0.0
    measured_ms: float = 0.0
    finalised: list[Finalised] = dataclasses.field(default_factory=list)


class UsageWriter:
    """Owns the ledger and the attribution; the sink's writer thread calls ``cycle`` periodically."""

    def __init__(self, ledger: Ledger, gpus: int, prefill_token_weight: float = 1.0,
                 checkpoint_every_records: int = 1000, checkpoint_interval_seconds: float = 30.0,
                 max_tenant_labels: int = 100, placement: Placement = "steps", step_tokens: int | None = None) -> None:
        self.ledger = ledger
        ledger.conn.executescript(QUARANTINE_SCHEMA)
        self.tenant_label = metrics.TenantLabels(max_tenant_labels)
        self.gpus = gpus
        self.prefill_token_weight = prefill_token_weight
        self.placement: Placement = placement
        self.step_tokens = step_tokens
        self.checkpoint_every = checkpoint_every_records
        self.checkpoint_interval = checkpoint_interval_seconds
        self.measurement: Measurement | None = None  # None until the sampler has started or failed
        # What measured the journalled shares (meta ``measurement``): restored requests are settled with it.
        self._journalled_measurement: Measurement | None = None
        self.timing_period = 0.1
        self._timing_start: float | None = None
        self.attributor = self._new_attributor()
        self._arrival = 0
        # The journal's pending events, as objects: settling reads them from here, not back from SQLite. It
        # matches the committed journal after every cycle; after a failed one, ``restore`` rebuilds it.
        self._pending: dict[str, Submitted] = {}
        self._last_checkpoint = time.monotonic()
        self._placements_counted: dict[str, int] = {}
        self._dropped_ms = 0.0  # held for requests that ended without an event, since the last count

    def _new_attributor(self, first_k: int = 0) -> Attributor:
        return Attributor(self.gpus, first_k=first_k, placement=self.placement, step_tokens=self.step_tokens)

    # -- start-up --------------------------------------------------------------------------------
    def restore(self) -> int:
        """Rebuild the attribution from the journal; the number of pending requests restored."""
        conn = self.ledger.conn
        same_boot = self.ledger.get_meta("boot_id") == boot_id()
        frontier = int(self.ledger.get_meta("frontier") or 0)
        journalled = self.ledger.get_meta("measurement")
        self._journalled_measurement = next((m for m in MEASUREMENTS if m == journalled), None)
        self.attributor = self._new_attributor(frontier)
        self._placements_counted = {}
        self._pending = {}
        self._dropped_ms = 0.0
        self._restore_step_model()
        self._restore_holds()
        rows = conn.execute("SELECT k, start, end, busy_ms, energy_mj, kind FROM intervals ORDER BY k").fetchall()
        for k, start, end, busy, energy, kind in rows:
            added = self.attributor.add_interval(start, end, busy, energy, kind)
            if added != [k]:
                raise RuntimeError(f"{self.ledger.path}: interval journal is not contiguous at k={k}")
        if not rows and (last_end := self.ledger.get_meta("last_end")) is not None:
            self.attributor.set_last_end(float(last_end))
        if self.attributor.last_end is None and self._timing_start is not None:
            self.attributor.set_last_end(self._timing_start)  # reloaded before any timing interval was committed
        count = self._restore_pending()
        if not same_boot and (rows or count):
            log.warning("usage journal from an earlier boot: settling %d pending requests with what was measured "
                        "(%s)", count, self._journalled_measurement or "timing")
            self.cycle([], [], math.inf, final=True)
            learned = self.attributor.learned()
            self.attributor = self._new_attributor(self.attributor.frontier)
            self.attributor.restore_learned(learned)  # the engine is the same: keep what was learned
            self._placements_counted = {}
        with self.ledger.transaction():
            self.ledger.set_meta("boot_id", boot_id())
        return count

    def _restore_pending(self) -> int:
        """The journal's pending events back into the attribution; one that is unreadable, or that an earlier
        version journalled without checking it, is quarantined (it would fail every cycle)."""
        rows = self.ledger.conn.execute("SELECT key, arrival, event, context, gpu_ms, energy_mj, covered "
                                        "FROM pending ORDER BY arrival").fetchall()
        set_aside: list[QuarantineEntry] = []
        for key, arrival, text, context, gpu_ms, energy, covered in rows:
            self._arrival = max(self._arrival, int(arrival))
            share = Share(gpu_ms, energy, covered)
            try:
                ctx, event = RecordContext.from_json(context), records.event_from_json(text)
                problem = _problem(event)
            except Exception as exc:  # any damage to the row: keep it as it is, for the operator
                set_aside.append((key, context, text, share, f"unreadable journal entry: {exc!r}"))
                log.error("metering: journalled event %s is unreadable (%r); moved to the quarantine table of %s",
                          key, exc, self.ledger.path)
                continue
            if problem is not None:
                set_aside.append((key, ctx, event, share, problem[1]))
                log.error("metering: journalled %s cannot be billed (%s); moved to the quarantine table of %s",
                          describe_event(event), problem[1], self.ledger.path)
                continue
            self._pending[key] = (ctx, event)
            if isinstance(event, RequestEvent):
                self.attributor.add_request(key, work_spans(event, self.prefill_token_weight), event.billable, share)
        if set_aside:
            metrics.EVENTS_QUARANTINED.inc(len(set_aside))
            with self.ledger.transaction():
                self._quarantine(set_aside)
                self.ledger.conn.executemany("DELETE FROM pending WHERE key = ?", [(e[0],) for e in set_aside])
        return len(self._pending)

    def _restore_step_model(self) -> None:
        """What the step model learned before the restart; an unreadable journal entry is learned again."""
        stored = self.ledger.get_meta("step_model")
        if not stored:
            return
        try:
            learned = {str(name): float(value) for name, value in json.loads(stored).items()}
            if not all(math.isfinite(v) and v >= 0 for v in learned.values()) or learned.get("budget", 1.0) <= 0:
                raise ValueError("values must be finite, not negative, and the budget positive")
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("journalled step model %.200r is unreadable (%s): learning it again", stored, exc)
            return
        self.attributor.restore_learned(learned)

    def _restore_holds(self) -> None:
        """The shares held for requests in flight (holds.py); an unreadable entry holds nothing (never billed)."""
        stored = self.ledger.get_meta("holds")
        if not stored:
            return
        try:
            self.attributor.holds.held = {str(r): Hold.from_list(v) for r, v in json.loads(stored).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("journalled holds %.200r are unreadable (%s): their requests are not billed for the time "
                        "they were held", stored, exc)

    def start_timing(self, start: float, period: float) -> None:
        """No GPU: busy time is estimated from request timing on a grid of ``period`` seconds."""
        self.measurement = "timing"
        self.timing_period = period
        self._timing_start = start
        if self.attributor.last_end is None:
            self.attributor.set_last_end(start)

    # -- the cycle -------------------------------------------------------------------------------
    def cycle(self, submitted: Sequence[Submitted], intervals: Sequence[GpuInterval], watermark: float,
              now: float | None = None, final: bool = False, rejected: Sequence[Rejected] = (),
              open_requests: Mapping[str, float] | None = None) -> CycleResult:
        """Journal, finalise up to ``watermark`` (monotonic), settle and append, in one transaction.

        ``final``: closing down; every request is placed and a checkpoint is signed. ``rejected``: events the
        sink refused on entry (already logged and counted), quarantined here. ``open_requests``: the requests
        in flight whose events have not come (request id -> admission), when the gateway tells them: intervals
        finalised before they end hold a share for them (holds.py).
        """
        now = time.monotonic() if now is None else now
        result = CycleResult()
        with self.ledger.transaction():
            if self.measurement is not None and self.measurement != self._journalled_measurement:
                self.ledger.set_meta("measurement", self.measurement)  # a restart after a reboot settles with it
                self._journalled_measurement = self.measurement
            set_aside: list[QuarantineEntry] = [(_quarantine_key(ctx, event), ctx, event, None, problem[1])
                                                for ctx, event, problem in rejected]
            self._take_intervals(intervals, now, final)
            cold = self._take_events(submitted, set_aside)
            self._track_open({} if final else open_requests)
            if final:
                self.attributor.place_all()
            finalised = self.attributor.finalise(watermark)
            self._store_progress(finalised)
            settled = self.attributor.settle()
            bodies = self._append(cold + self._settle(settled, set_aside), settled, set_aside)
            self._quarantine(set_aside)
            self._maybe_checkpoint(final)
        result.records = len(bodies)
        result.finalised = finalised
        self._count(finalised, result, bodies)
        return result

    def _track_open(self, open_requests: Mapping[str, float] | None) -> None:
        """The requests in flight now; the holds of those that ended without an event go to nobody."""
        if open_requests is None:
            return
        holds = self.attributor.holds
        holds.set_open(open_requests)
        for request_id, hold in holds.drop_closed():
            log.warning("request %s ended without a metering event: the %.3f GPU-ms held for it while it was in "
                        "flight are billed to nobody", request_id, hold.gpu_ms)
            self._dropped_ms += hold.gpu_ms

    def _take_intervals(self, intervals: Sequence[GpuInterval], now: float, final: bool) -> None:
        new: list[int] = []
        for interval in intervals:
            new += self.attributor.add_interval(interval.start, interval.end, interval.busy_ms, interval.energy_mj,
                                                interval.kind)
        if self.measurement == "timing" and (last := self.attributor.last_end) is not None:
            while last + self.timing_period <= now:
                new += self.attributor.add_interval(last, last + self.timing_period, None, None, "timing")
                last += self.timing_period
            if final and now > last:
                new += self.attributor.add_interval(last, now, None, None, "timing")
        rows = [(k, *self.attributor.interval(k)) for k in new]
        self.ledger.conn.executemany("INSERT INTO intervals(k, start, end, busy_ms, energy_mj, kind) "
                                     "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def _take_events(self, submitted: Sequence[Submitted], set_aside: list[QuarantineEntry]) -> list[dict[str, Any]]:
        cold: list[dict[str, Any]] = []
        requests: list[tuple[str, RecordContext, RequestEvent, Columns]] = []
        for ctx, event in submitted:
            # Checked again here (a few µs): the token chunks only here, and events not from the sink's submit.
            columns, problem = _checked(event)
            if problem is not None:
                log.warning("metering: %s refused, not billed (kept in the quarantine table): %s",
                            describe_event(event), problem[1])
                metrics.EVENTS_REJECTED.labels(problem[0]).inc()
                set_aside.append((_quarantine_key(ctx, event), ctx, event, None, problem[1]))
            elif isinstance(event, ColdStartEvent):
                cold.append(records.cold_start_record(event, ctx))
            else:
                requests.append((records.request_record_id(ctx, event.request_id), ctx, event, columns))
        # One lookup and one insert statement per cycle, not per request: with the record inserts and the summed
        # metrics, 9 % less writer CPU for short requests at 2,000/s (bench.metering_writer --short-rate).
        recorded = self.ledger.recorded([body["id"] for body in cold] + [key for key, _, _, _ in requests])
        new_cold = []
        for body in cold:  # a pod's start is recorded once, however often it was submitted
            if body["id"] not in recorded:
                recorded.add(body["id"])
                new_cold.append(body)
        rows = []
        for key, ctx, event, columns in requests:
            if key in recorded or key in self._pending:
                log.warning("request %s submitted twice; the second is ignored", event.request_id)
                continue
            self._arrival += 1
            rows.append((key, self._arrival, records.event_to_json(event, columns), ctx.to_json()))
            self._pending[key] = (ctx, event)
            self.attributor.add_request(key, work_spans(event, self.prefill_token_weight), event.billable,
                                        request_id=event.request_id)
        self.ledger.conn.executemany("INSERT INTO pending(key, arrival, event, context) VALUES (?, ?, ?, ?)", rows)
        return new_cold

    def _store_progress(self, finalised: list[Finalised]) -> None:
        conn = self.ledger.conn
        frontier = self.attributor.frontier
        if finalised:
            conn.execute("DELETE FROM intervals WHERE k < ?", (frontier,))
        touched = self.attributor.shares(self.attributor.touched)
        self.attributor.touched.clear()
        conn.executemany("UPDATE pending SET gpu_ms = ?, energy_mj = ?, covered = ? WHERE key = ?",
                         [(s.gpu_ms, s.energy_mj, s.covered_tokens, k) for k, s in touched.items()])
        self.ledger.set_meta("frontier", str(frontier))
        if finalised and (learned := self.attributor.learned()):
            self.ledger.set_meta("step_model", json.dumps(learned, sort_keys=True))
        if self.attributor.last_end is not None:
            self.ledger.set_meta("last_end", repr(self.attributor.last_end))
        if (holds := self.attributor.holds).changed:
            self.ledger.set_meta("holds", json.dumps({r: h.to_list() for r, h in holds.held.items()}))
            holds.changed = False

    def _settle(self, settled: list[Settled], set_aside: list[QuarantineEntry]) -> list[dict[str, Any]]:
        """The records of settled requests; the events leave ``_pending`` once ``_append`` has them."""
        if not settled:
            return []
        self.ledger.conn.executemany("DELETE FROM pending WHERE key = ?", [(item.key,) for item in settled])
        # What measured the shares: after a reboot the journal's measurement (the sink sets the new one later).
        measurement = self.measurement or self._journalled_measurement or "timing"
        bodies = []
        for item in settled:
            entry = self._pending.get(item.key)
            if entry is None:
                continue
            ctx, event = entry
            if not isinstance(event, RequestEvent) or not event.billable:
                continue  # warm-up: its share is excluded (counted in metrics), never billed
            try:
                bodies.append(records.request_record(event, ctx, item, measurement, item.key))
            except Exception as exc:  # this event's values, not the cycle's: set it aside, settle the rest
                set_aside.append(self._unbuildable(item, exc))
        return bodies

    def _append(self, bodies: list[dict[str, Any]], settled: list[Settled],
                set_aside: list[QuarantineEntry]) -> list[dict[str, Any]]:
        """Append the records; one that canonical JSON cannot hold (NaN, a foreign type) is quarantined instead of
        failing the cycle (found by appending one at a time, only then)."""
        head = self.ledger.head_seq, self.ledger.head_hash
        try:
            self.ledger.append(bodies)
        except (ValueError, TypeError):
            self.ledger.head_seq, self.ledger.head_hash = head
            by_key = {item.key: item for item in settled}
            appended = []
            for body in bodies:
                try:
                    self.ledger.append([body])  # the head moves only once the body is encoded
                    appended.append(body)
                except (ValueError, TypeError) as exc:
                    item = by_key.get(body["id"])
                    set_aside.append(self._unbuildable(item, exc) if item is not None else  # else a cold start
                                     (body["id"], "{}", json.dumps(body, default=repr), None, repr(exc)))
            bodies = appended
        for item in settled:
            self._pending.pop(item.key, None)
        return bodies

    def _unbuildable(self, item: Settled, exc: Exception) -> QuarantineEntry:
        """The quarantine entry of a settled request whose record cannot be made; it keeps the request's share."""
        ctx, event = self._pending[item.key]
        log.error("metering: the usage record of %s cannot be made (%r); its event and share (%r GPU-ms) are "
                  "kept in the quarantine table of %s, not billed", describe_event(event), exc, item.share.gpu_ms,
                  self.ledger.path)
        metrics.EVENTS_QUARANTINED.inc()
        return item.key, ctx, event, item.share, repr(exc)

    def _quarantine(self, entries: list[QuarantineEntry]) -> None:
        """Insert quarantine rows (inside the caller's transaction)."""
        if entries:
            self.ledger.conn.executemany(f"INSERT INTO quarantine({JOURNAL_TABLES['quarantine']}) "
                                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [_quarantine_row(*e) for e in entries])

    def _maybe_checkpoint(self, force: bool) -> None:
        since = self.ledger.head_seq - self.ledger.last_checkpoint_seq()
        elapsed = time.monotonic() - self._last_checkpoint >= self.checkpoint_interval
        no_checkpoint_yet = self.ledger.conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchone() is None
        if since >= self.checkpoint_every or (since > 0 and (elapsed or force)) or (force and no_checkpoint_yet):
            self.ledger.checkpoint()
            self._last_checkpoint = time.monotonic()

    def _count(self, finalised: list[Finalised], result: CycleResult, bodies: list[dict[str, Any]]) -> None:
        for item in finalised:
            result.billed_ms += item.billed_ms
            result.excluded_ms += item.excluded_ms
            result.unattributed_ms += item.unattributed_ms
            result.measured_ms += item.busy_ms
        # A share held for a request in flight counts once its event says whether it is billed (or never comes).
        for billable, hold in self.attributor.claimed:
            result.billed_ms += hold.gpu_ms if billable else 0.0
            result.excluded_ms += 0.0 if billable else hold.gpu_ms
        result.unattributed_ms += self._dropped_ms
        self.attributor.claimed.clear()
        self._dropped_ms = 0.0
        metrics.GPU_MS.labels("billed").inc(result.billed_ms)
        metrics.GPU_MS.labels("excluded").inc(result.excluded_ms)
        metrics.GPU_MS.labels("unattributed").inc(result.unattributed_ms)
        # Summed per label set, then one increment each: a label lookup per record cost more than the sums.
        kinds: dict[str, int] = {}
        tenants: dict[tuple[str, str], list[float]] = {}
        for body in bodies:
            kinds[body["kind"]] = kinds.get(body["kind"], 0) + 1
            if body["kind"] == "request":  # after the commit: what Prometheus shows per tenant is in the ledger
                sums = tenants.setdefault((self.tenant_label(body.get("tenant")), str(body.get("tier") or "")),
                                          [0.0, 0.0])
                sums[0] += float(body.get("gpuMs") or 0.0)
                sums[1] += float(body.get("resourceUnits") or 0.0)
        for kind, count in kinds.items():
            metrics.RECORDS.labels(kind).inc(count)
        for labels, (gpu_ms, ru) in tenants.items():
            metrics.TENANT_GPU_MS.labels(*labels).inc(gpu_ms)
            metrics.TENANT_RESOURCE_UNITS.labels(*labels).inc(ru)
        metrics.PENDING.set(self.attributor.pending())
        self._count_step_model()

    def _count_step_model(self) -> None:
        steps = self.attributor.steps
        if steps is None:
            return
        metrics.STEP_BUDGET.set(steps.budget if math.isfinite(steps.budget) else 0)
        metrics.STEP_IDLE.set(steps.idle_per_step)
        for outcome, count in steps.outcomes.items():
            if (new := count - self._placements_counted.get(outcome, 0)) > 0:
                metrics.PROMPT_PLACEMENTS.labels(outcome).inc(new)
            self._placements_counted[outcome] = count


# -- checking and quarantining events ------------------------------------------------------------------------
Columns = tuple[list[float], list[int]] | None  # a request's chunk times and token counts
QuarantineEntry = tuple[str, RecordContext | str, RequestEvent | ColdStartEvent | str, Share | None, str]


def _checked(event: RequestEvent | ColdStartEvent) -> tuple[Columns, Problem | None]:
    """A request's chunk columns (for the journal) and the first problem of the event, or None."""
    if isinstance(event, ColdStartEvent):
        return None, events.cold_start_problem(event)
    if (problem := events.request_problem(event)) is not None:
        return None, problem
    try:
        columns = records.chunk_columns(event.chunks)
    except AttributeError:
        return None, ("chunks", f"chunks={event.chunks!r:.100}: must be a tuple of TokenChunk")
    return columns, events.chunks_problem(*columns)


def _problem(event: RequestEvent | ColdStartEvent) -> Problem | None:
    return _checked(event)[1]


def describe_event(event: RequestEvent | ColdStartEvent) -> str:
    if isinstance(event, ColdStartEvent):
        return f"the cold start of pod {event.pod!r}"
    return f"request {event.request_id!r} of tenant {event.tenant!r}"


def _quarantine_key(ctx: RecordContext, event: RequestEvent | ColdStartEvent) -> str:
    if isinstance(event, ColdStartEvent):
        return f"coldstart/{event.pod!r}/{event.started_at!r}"
    return records.request_record_id(ctx, event.request_id)


def _quarantine_row(key: str, ctx: RecordContext | str, event: RequestEvent | ColdStartEvent | str,
                    share: Share | None, problem: str) -> tuple[Any, ...]:
    """A quarantine row: the event as the journal keeps it where it can be encoded (NaN included), else its repr."""
    request_id = None if isinstance(event, str | ColdStartEvent) else event.request_id
    if isinstance(event, str):
        text = event
    else:
        try:
            text = records.event_to_json(event)
        except Exception:  # a field JSON cannot hold: the repr still shows the operator every value
            text = repr(event)
    share = share or Share()
    # SQLite keeps a NaN as NULL: the columns allow it, and the problem names the value.
    context = ctx if isinstance(ctx, str) else ctx.to_json()
    return (key, None if request_id is None else str(request_id), text, context, share.gpu_ms, share.energy_mj,
            share.covered_tokens, problem, utc_now())


# -- the journal across a signing-key change ------------------------------------------------------------------
def carry_journal(source: Path, target: Ledger) -> int:
    """Copy the journal of the ledger file ``source`` (its unsettled events with their shares so far, the GPU
    intervals not final yet, the attribution's progress, the quarantine) into ``target``'s, in one transaction of
    ``target``; the number of unsettled events carried. ``source`` is not changed (``clear_journal`` does that)."""
    conn = target.conn
    conn.executescript(QUARANTINE_SCHEMA)
    conn.execute("ATTACH DATABASE ? AS source", (str(source),))
    try:
        tables = {str(row[0]) for row in conn.execute("SELECT name FROM source.sqlite_master WHERE type = 'table'")}
        keys = ",".join("?" * len(JOURNAL_META))
        with target.transaction():
            for table, columns in JOURNAL_TABLES.items():
                if table in tables:  # a ledger from before the quarantine has none
                    read = columns.replace("energy_mj", pending_energy(conn, "source")) if table == "pending" \
                        else columns
                    conn.execute(f"INSERT INTO main.{table}({columns}) SELECT {read} FROM source.{table}")
            for key, value in conn.execute(f"SELECT key, value FROM source.meta WHERE key IN ({keys})", JOURNAL_META):
                target.set_meta(str(key), str(value))
            row = conn.execute("SELECT value FROM source.meta WHERE key = 'ledger_id'").fetchone()
            target.set_meta("journal_carried_from", str(row[0]) if row else "")
        return int(conn.execute("SELECT COUNT(*) FROM main.pending").fetchone()[0])
    finally:
        conn.execute("DETACH DATABASE source")


def clear_journal(path: Path, carried_to: str) -> None:
    """Empty the journal of a ledger file whose journal ``carry_journal`` copied into the ledger ``carried_to``, so
    nobody takes its unsettled events for unbilled ones (meta ``journal_carried_to`` says where they went)."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    try:
        tables = {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.execute("BEGIN IMMEDIATE")
        for table in JOURNAL_TABLES:
            if table in tables:
                conn.execute(f"DELETE FROM {table}")
        conn.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(JOURNAL_META))})", JOURNAL_META)
        conn.execute("INSERT INTO meta(key, value) VALUES ('journal_carried_to', ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (carried_to,))
        conn.execute("COMMIT")
    finally:
        conn.close()
