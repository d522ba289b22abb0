"""The exporter thread survives every failure, not only the sink's: it counts it, backs off and retries."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, export, metrics, records, units
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.settings import MAX_RETENTION_SECONDS, MeteringSettings

SIGNER = chain.Signer(chain.generate_key())
CTX = records.context_from_config(CONFIG, "pod-1", "NVIDIA-L4", units.load_table())
SETTINGS = MeteringSettings(sink_url="http://sink.test/events", export_interval_seconds=0.01,
                            retry_initial_seconds=0.01, retry_max_seconds=0.02, retention_seconds=0)


def make_ledger(path: Path, count: int = 3) -> None:
    ledger = Ledger(path, SIGNER)
    with ledger.transaction():
        ledger.append([records.request_record(request(f"r{i}", chunks=((0.1, 1),)), CTX,
                                              Settled(f"k{i}", Share(gpu_ms=2.0), 1, True), "gpm")
                       for i in range(count)])
        ledger.checkpoint()
    ledger.close()


class FailingConnection:
    """Stands in for the exporter's SQLite connection; the first statement starting with ``prefix`` fails
    like a full disk, without running (a failed COMMIT leaves the transaction open, as SQLite can)."""

    def __init__(self, conn: sqlite3.Connection, prefix: str) -> None:
        self._conn, self.prefix, self.left = conn, prefix, 1

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.left and sql.startswith(self.prefix):
            self.left -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class Sink:
    """The sink's side of httpx.MockTransport: records each batch; ``fail_with`` is raised once."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail_with = fail_with
        self.second_batch = threading.Event()

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        self.batches.append(json.loads(req.content))
        if len(self.batches) >= 2:
            self.second_batch.set()
        return httpx.Response(200)


def exporter_thread(path: Path, sink: Sink, fail_sql: str | None = None) -> export.ExporterThread:
    ledger = Ledger(path, SIGNER)
    if fail_sql:
        ledger.conn = FailingConnection(ledger.conn, fail_sql)  # type: ignore[assignment]
    return export.ExporterThread(export.Exporter(ledger, SETTINGS, transport=httpx.MockTransport(sink)), SETTINGS)


def exported_seq(path: Path) -> int:
    ledger = Ledger(path, SIGNER)
    try:
        return int(ledger.get_meta("exported_seq") or 0)
    finally:
        ledger.close()


@pytest.mark.parametrize("fail_sql", ["INSERT INTO meta", "COMMIT"])
def test_a_disk_full_while_marking_a_batch_exported_is_retried_until_it_is_marked(
        tmp_path: Path, fail_sql: str, caplog: pytest.LogCaptureFixture) -> None:
    make_ledger(tmp_path / "usage.db")
    sink = Sink()
    thread = exporter_thread(tmp_path / "usage.db", sink, fail_sql)
    failures_before = metrics.EXPORT_FAILURES._value.get()
    wait = thread.step()  # the batch is sent, marking it exported fails
    assert 0 < wait <= SETTINGS.retry_max_seconds
    assert thread.failures == 1
    assert metrics.EXPORT_FAILURES._value.get() == failures_before + 1
    assert "database or disk is full" in caplog.text
    assert exported_seq(tmp_path / "usage.db") == 0
    assert thread.step() == SETTINGS.export_interval_seconds  # retried: sent again, marked this time
    assert thread.failures == 0
    assert exported_seq(tmp_path / "usage.db") == 3
    assert [len([e for e in batch if e["type"] != export.CHECKPOINT_TYPE]) for batch in sink.batches] == [3, 3]
    thread.exporter.close()
    thread.exporter.ledger.close()


@pytest.mark.parametrize("error", [httpx.InvalidURL("Invalid port: ':1'"), RuntimeError("a bug")],
                         ids=["httpx-invalid-url", "unexpected"])
def test_any_error_of_a_step_is_counted_and_retried_with_backoff(tmp_path: Path, error: Exception) -> None:
    make_ledger(tmp_path / "usage.db")
    sink = Sink(fail_with=error)
    thread = exporter_thread(tmp_path / "usage.db", sink)
    assert 0 < thread.step() <= SETTINGS.retry_max_seconds
    assert thread.failures == 1
    thread.step()
    assert thread.failures == 0
    assert exported_seq(tmp_path / "usage.db") == 3
    thread.exporter.close()
    thread.exporter.ledger.close()


def test_the_exporter_thread_outlives_a_failure_and_exports_what_it_could_not_mark(tmp_path: Path) -> None:
    make_ledger(tmp_path / "usage.db")
    sink = Sink()
    thread = exporter_thread(tmp_path / "usage.db", sink, "INSERT INTO meta")
    thread.start()
    try:
        assert sink.second_batch.wait(10), "the exporter did not retry the batch it could not mark exported"
        assert thread.is_alive()
    finally:
        thread.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert exported_seq(tmp_path / "usage.db") == 3


@pytest.mark.parametrize("value", [math.inf, math.nan, 1e11, -1.0, MAX_RETENTION_SECONDS + 1])
def test_retention_must_be_finite_and_at_most_a_year(value: float) -> None:
    problems = MeteringSettings(retention_seconds=value).validate()
    assert problems == [f"TENSORFLEET_METERING_RETENTION_SECONDS={value!r}: must be between 0 (keep all) "
                        f"and {MAX_RETENTION_SECONDS} (365 days)"]


def test_the_longest_retention_prunes_without_overflow(tmp_path: Path) -> None:
    assert MeteringSettings(retention_seconds=MAX_RETENTION_SECONDS).validate() == []
    make_ledger(tmp_path / "usage.db")
    ledger = Ledger(tmp_path / "usage.db", SIGNER)
    assert ledger.prune(MAX_RETENTION_SECONDS, now=1.0) == 0  # even a clock at the epoch: no OverflowError
    ledger.close()


@pytest.mark.parametrize(("name", "value"), [("export_interval_seconds", math.inf), ("retry_max_seconds", math.inf),
                                             ("retry_initial_seconds", math.inf), ("sink_timeout_seconds", 0.0)])
def test_the_exporters_waits_must_be_finite(name: str, value: float) -> None:
    problems = MeteringSettings(**{name: value}).validate()
    assert any(p.startswith(f"TENSORFLEET_METERING_{name.upper()}={value!r}: must be") and "at most 86400" in p
               for p in problems), problems


@pytest.mark.parametrize("url", ["http://", "http://[::1", "http://host:99999/events", "ftp://host/x"])
def test_a_sink_url_without_a_valid_host_is_rejected_at_start(url: str) -> None:
    assert MeteringSettings(sink_url=url).validate() == [
        f"TENSORFLEET_METERING_SINK_URL={url!r}: must be an http:// or https:// URL with a host"]


@pytest.mark.parametrize(("name", "value", "limit"), [
    ("checkpoint_interval_seconds", math.inf, "positive, at most 86400"),
    ("settle_after_seconds", math.inf, "between 0 and 86400"),
    ("prefill_token_weight", math.inf, "between 0 and 1000"),
    ("prefill_token_weight", math.nan, "between 0 and 1000")])
def test_the_writers_settings_must_be_finite(name: str, value: float, limit: str) -> None:
    assert MeteringSettings(**{name: value}).validate() == [
        f"TENSORFLEET_METERING_{name.upper()}={value!r}: must be {limit}"]
