"""An event no usage record can be made of is set aside, never retried forever: the rest of the bill goes on.

Before, one such event (a NaN time, a price the record cannot hold) failed its writer cycle, was restored from the
journal and failed every later one; after five failures each cycle's new events were dropped, for every tenant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, events, records, units, verify
from tensorfleet.metering.events import ColdStartEvent, RequestEvent
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.writer import UsageWriter

SIGNER = chain.Signer(chain.generate_key())
CTX = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())


def timing_writer(path: Path) -> UsageWriter:
    writer = UsageWriter(Ledger(path, SIGNER, {"namespace": "team-a", "service": "llama", "pod": "pod-1"}), 1)
    writer.restore()
    writer.start_timing(0.0, 0.1)
    return writer


def overlapping(prefix: str, count: int, tenant: str = "acme") -> list[RequestEvent]:
    """Requests that share the GPU between 0.1 and 0.6 s."""
    return [request(f"{prefix}{i}", admitted=0.1 + 0.01 * i, first_token=0.2 + 0.01 * i, tenant=tenant,
                    chunks=tuple((0.2 + 0.01 * i + 0.05 * k, 1) for k in range(6)), prompt=50 + i)
            for i in range(count)]


def billed(ledger: Ledger) -> dict[str, dict[str, Any]]:
    bodies = [json.loads(row[0]) for row in ledger.conn.execute("SELECT body FROM records ORDER BY seq")]
    return {b["requestId"]: b for b in bodies if b["kind"] == "request"}


def quarantined(ledger: Ledger) -> list[sqlite3.Row]:
    ledger.conn.row_factory = sqlite3.Row
    try:
        return list(ledger.conn.execute("SELECT * FROM quarantine ORDER BY rowid"))
    finally:
        ledger.conn.row_factory = None


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def verifies(ledger: Ledger) -> bool:
    found, points, anchors, _ = verify.from_ledger_file(ledger.path)
    return verify.verify(found, points, chain.Verifier(SIGNER.public_key), anchors).ok


def test_a_request_whose_record_cannot_be_made_is_quarantined_with_its_share_and_the_rest_is_billed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The bad request's context holds a price its record cannot hold (Decimal overflows at 28 digits): building its
    # record raises at settle time, after its share was attributed.
    writer = timing_writer(tmp_path / "usage.db")
    absurd = dataclasses.replace(CTX, prices={**CTX.prices, "pricePerMillionInputTokens": "1e40"})
    good = overlapping("good-", 5, tenant="other-team")
    bad = request("bad", admitted=0.12, first_token=0.25, chunks=((0.3, 2), (0.35, 2)), prompt=80)
    before = sample("tensorfleet_metering_events_quarantined_total")
    first = writer.cycle([(CTX, e) for e in good[:2]] + [(absurd, bad)] + [(CTX, e) for e in good[2:]], [], 0.0,
                         now=0.05)
    last = writer.cycle([], [], math.inf, now=1.0, final=True)
    assert sorted(billed(writer.ledger)) == [f"good-{i}" for i in range(5)]
    [row] = quarantined(writer.ledger)
    assert (row["key"], row["request_id"]) == (records.request_record_id(absurd, "bad"), "bad")
    assert "InvalidOperation" in row["problem"]
    assert records.event_from_json(row["event"]) == bad  # kept as journalled, for the operator
    assert sample("tensorfleet_metering_events_quarantined_total") == before + 1
    assert "usage record of request 'bad' of tenant 'acme' cannot be made" in caplog.text
    assert writer.ledger.conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
    # Conservation: the quarantined request keeps the share the attribution gave it (in its row), so the others
    # pay exactly what they would have paid had its record been made; billed GPU-ms = records + quarantined.
    attributed = first.billed_ms + last.billed_ms
    in_records = sum(b["gpuMs"] for b in billed(writer.ledger).values())
    assert row["gpu_ms"] > 0
    assert in_records + row["gpu_ms"] == pytest.approx(attributed, abs=1e-3 * 6)
    assert verifies(writer.ledger)
    control = timing_writer(tmp_path / "control.db")  # the same traffic, every record made
    control.cycle([(CTX, e) for e in good[:2]] + [(CTX, bad)] + [(CTX, e) for e in good[2:]], [], 0.0, now=0.05)
    control.cycle([], [], math.inf, now=1.0, final=True)
    expected = billed(control.ledger)
    assert {rid: b["gpuMs"] for rid, b in billed(writer.ledger).items()} == {
        rid: b["gpuMs"] for rid, b in expected.items() if rid != "bad"}
    assert row["gpu_ms"] == pytest.approx(expected["bad"]["gpuMs"], abs=1e-3)


def test_a_record_canonical_json_cannot_hold_is_quarantined_and_the_chain_stays_whole(tmp_path: Path) -> None:
    # A context value that encodes as NaN: the record is built, but signing its canonical JSON fails. The cycle's
    # other records are appended one by one, and the chain links them without a gap.
    writer = timing_writer(tmp_path / "usage.db")
    odd = dataclasses.replace(CTX, precision=math.nan)  # type: ignore[arg-type]
    good = overlapping("good-", 4)
    writer.cycle([(CTX, good[0]), (odd, good[1]), (CTX, good[2]), (CTX, good[3])], [], math.inf, now=1.0, final=True)
    assert sorted(billed(writer.ledger)) == ["good-0", "good-2", "good-3"]
    assert [json.loads(b)["seq"] for (b,) in writer.ledger.conn.execute("SELECT body FROM records")] == [1, 2, 3]
    [row] = quarantined(writer.ledger)
    assert row["request_id"] == "good-1"
    assert "ValueError" in row["problem"]
    assert verifies(writer.ledger)


def test_a_journalled_event_no_record_can_be_made_of_is_quarantined_on_restore(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A journal written by a version that checked nothing: a request with a NaN wall-clock time is pending beside
    # good ones. Restoring it no longer brings back an event that fails every cycle (and every restart).
    writer = timing_writer(tmp_path / "usage.db")
    good = overlapping("good-", 3)
    writer.cycle([(CTX, e) for e in good], [], 0.0, now=0.05)
    poisoned = dataclasses.replace(request("poisoned", admitted=0.15, first_token=0.3, chunks=((0.3, 3),)),
                                   received_at=math.nan)
    with writer.ledger.transaction():
        writer.ledger.conn.execute("INSERT INTO pending(key, arrival, event, context, gpu_ms) VALUES (?, ?, ?, ?, ?)",
                                   ("k-poisoned", 99, records.event_to_json(poisoned), CTX.to_json(), 12.5))
        writer.ledger.conn.execute("INSERT INTO pending(key, arrival, event, context) VALUES (?, ?, ?, ?)",
                                   ("k-garbled", 100, "{not json", CTX.to_json()))
    writer.ledger.close()
    again = timing_writer(tmp_path / "usage.db")
    again.cycle([], [], math.inf, now=1.0, final=True)
    assert sorted(billed(again.ledger)) == ["good-0", "good-1", "good-2"]
    rows = {row["key"]: row for row in quarantined(again.ledger)}
    assert rows["k-poisoned"]["gpu_ms"] == 12.5
    assert "received_at=nan" in rows["k-poisoned"]["problem"]
    assert rows["k-garbled"]["event"] == "{not json"
    assert "unreadable" in rows["k-garbled"]["problem"]
    assert "journalled request 'poisoned' of tenant 'acme' cannot be billed (received_at=nan" in caplog.text


def test_a_request_with_a_token_time_that_is_not_finite_never_reaches_the_attribution(tmp_path: Path) -> None:
    # NaN in one request's chunk times would make every share it overlaps NaN; it is refused before the journal.
    writer = timing_writer(tmp_path / "usage.db")
    good = overlapping("good-", 3)
    bad = request("bad", admitted=0.1, first_token=0.2, chunks=((0.2, 1), (math.nan, 1), (0.4, 1)))
    before = sample("tensorfleet_metering_events_rejected_total", {"field": "chunks.at"})
    writer.cycle([(CTX, good[0]), (CTX, bad), (CTX, good[1]), (CTX, good[2])], [], math.inf, now=1.0, final=True)
    found = billed(writer.ledger)
    assert sorted(found) == ["good-0", "good-1", "good-2"]
    assert all(math.isfinite(b["gpuMs"]) and b["gpuMs"] > 0 for b in found.values())
    assert sample("tensorfleet_metering_events_rejected_total", {"field": "chunks.at"}) == before + 1
    [row] = quarantined(writer.ledger)
    assert row["request_id"] == "bad"
    assert row["gpu_ms"] == 0
    assert "chunks.at=nan" in row["problem"]


GOOD = request("r1", admitted=1.0, first_token=1.1, chunks=((1.1, 1), (1.2, 3)), done=1.2)


REQUEST_PROBLEMS = [
    ({"received_at": math.nan}, "received_at", "received_at=nan: must be a wall-clock time within [0, 1e+10]"),
    ({"received_at": -1.0}, "received_at", "within [0, 1e+10]"),
    ({"received": math.inf}, "received", "received=inf: must be a monotonic time within [-1e+12, 1e+12]"),
    ({"admitted": math.nan}, "admitted", "admitted=nan"),
    ({"first_token": -math.inf}, "first_token", "first_token=-inf"),
    ({"done": 1e9}, "done", "done=1000000000.0: must be at most 1e+07 s after received=1.0"),
    ({"prompt_tokens": -1}, "prompt_tokens", "prompt_tokens=-1: must be an integer within [0, 1000000000]"),
    ({"completion_tokens": 10**40}, "completion_tokens", "within [0, 1000000000]"),
    ({"cached_tokens": 2.5}, "cached_tokens", "cached_tokens=2.5: must be an integer"),
    ({"truncated_tokens": True}, "truncated_tokens", "must be an integer"),
    ({"tenant": None}, "tenant", "tenant=None: must be a string"),
    ({"billable": "yes"}, "billable", "billable='yes': must be true or false"),
    ({"status": 1000}, "status", "status=1000: must be an HTTP status code within [0, 999]"),
    ({"error": 3}, "error", "error=3: must be a string or None"),
    ({"chunks": [(1.1, 1)]}, "chunks", "must be a tuple of TokenChunk"),
]
CHUNK_PROBLEMS = [
    ([1.0, math.nan], [1, 1], "chunks.at", "chunks.at=nan"),
    ([1.0, 1e300], [1, 1], "chunks.at", "chunks.at=1e+300: must be a monotonic time within [-1e+12, 1e+12]"),
    ([1.0, 2.0], [1, -3], "chunks.tokens", "chunks.tokens=-3: must be an integer within [0, 1000000000]"),
    ([1.0, 2.0], [1, 0.5], "chunks.tokens", "chunks.tokens=0.5"),
    ([1.0, 2.0], [1, "2"], "chunks", "(monotonic time, token count) pairs"),
]
COLD_START_FIELDS = ("started_at", "total_seconds", "pod", "stages")  # as cold_start_problem names them (below)


@pytest.mark.parametrize(("change", "field", "message"), REQUEST_PROBLEMS)
def test_request_problem_names_the_field_the_value_and_the_limit(change: dict[str, Any], field: str,
                                                                  message: str) -> None:
    assert events.request_problem(GOOD) is None
    problem = events.request_problem(dataclasses.replace(GOOD, **change))
    assert problem is not None
    assert problem[0] == field
    assert message in problem[1]


@pytest.mark.parametrize(("times", "tokens", "field", "message"), CHUNK_PROBLEMS)
def test_chunks_problem_names_the_bad_value(times: list[float], tokens: list[int], field: str, message: str) -> None:
    assert events.chunks_problem([1.0, 1.5, 2.0], [1, 0, 5]) is None
    assert events.chunks_problem([], []) is None
    problem = events.chunks_problem(times, tokens)
    assert problem is not None
    assert problem[0] == field
    assert message in problem[1]


def test_cold_start_problem_names_the_field() -> None:
    good = ColdStartEvent("pod-1", 1_700_000_000.0, (("engine", 30.0), ("warm", 4.0)), 34.0)
    assert events.cold_start_problem(good) is None
    for change, field in (({"started_at": math.nan}, "started_at"), ({"total_seconds": -1.0}, "total_seconds"),
                          ({"pod": None}, "pod")):
        refused = events.cold_start_problem(dataclasses.replace(good, **change))
        assert refused is not None
        assert refused[0] == field
    problem = events.cold_start_problem(dataclasses.replace(good, stages=(("engine", math.inf),)))
    assert problem is not None
    assert problem[0] == "stages"
    assert "('engine', inf)" in problem[1]


def test_every_field_a_problem_names_is_exported_at_zero_from_the_start() -> None:
    """The alert on refused events takes increase() of tensorfleet_metering_events_rejected_total{field}: a series
    that first appears at its first refusal would read as no increase, and the refusal would go unnoticed."""
    from tensorfleet.metering import metrics

    named = {p[-2] for p in REQUEST_PROBLEMS + CHUNK_PROBLEMS} | set(COLD_START_FIELDS)
    assert named <= set(events.PROBLEM_FIELDS)
    exported = {s.labels["field"] for m in metrics.EVENTS_REJECTED.collect() for s in m.samples
                if s.name.endswith("_total")}
    assert exported >= set(events.PROBLEM_FIELDS)
