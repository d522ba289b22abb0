"""Export of ledger records as CloudEvents 1.0 batches (OpenMeter-compatible) over HTTP.

At least once: a batch is marked exported only after the sink answered 2xx; anything else is retried
with exponential backoff and jitter, forever, so an outage of hours loses nothing (the ledger is the
spool). Event ids are the records' deterministic ids, so a sink that deduplicates by id (OpenMeter
does) counts a re-sent record once. Signed checkpoints travel in the same batches, after the records
they cover.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from tensorfleet.metering import chain, metrics, verify
from tensorfleet.metering.ledger import Ledger
from tensorfleet.metering.records import CHECKPOINT_TYPE, EVENT_TYPES, ID_NAMESPACE
from tensorfleet.metering.settings import MeteringSettings

log = logging.getLogger(__name__)
CONTENT_TYPE = "application/cloudevents-batch+json"


def source(namespace: str | None, service: str | None) -> str:
    return f"//tensorfleet.io/namespaces/{namespace or '-'}/inferenceservices/{service or '-'}"


def record_event(body_text: str, record_hash: str, signature: str, key_id: str) -> dict[str, Any]:
    body = json.loads(body_text)
    subject = body.get("tenant") or f"{body.get('namespace')}/{body.get('service')}"
    return {
        "specversion": "1.0", "type": EVENT_TYPES[body["kind"]], "id": body["id"],
        "source": source(body.get("namespace"), body.get("service")), "subject": subject, "time": body["time"],
        "datacontenttype": "application/json",
        "data": {**body, "proof": {"hash": record_hash, "signature": signature, "keyId": key_id}},
    }


def checkpoint_event(body_text: str, signature: str) -> dict[str, Any]:
    body = json.loads(body_text)
    return {
        "specversion": "1.0", "type": CHECKPOINT_TYPE,
        "id": str(uuid.uuid5(ID_NAMESPACE, f"checkpoint/{body['ledger']}/{body['seq']}")),
        "source": source(body.get("namespace"), body.get("service")), "subject": f"ledger/{body['ledger']}",
        "time": body["time"], "datacontenttype": "application/json",
        "data": {**body, "proof": {"signature": signature}},
    }


class ExportFailed(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def backoff_delays(initial: float, maximum: float, rng: random.Random | None = None) -> Callable[[int], float]:
    """Delay before retry ``attempt`` (1, 2, ...): exponential, capped, with jitter in [50%, 100%]."""
    rng = rng or random.Random()

    def delay(attempt: int) -> float:
        base = min(maximum, initial * (2 ** min(attempt - 1, 32)))
        return base * (0.5 + rng.random() / 2)

    return delay


class Exporter:
    """Moves records from the ledger to the sink; ``export_once`` is one batch."""

    def __init__(self, ledger: Ledger, settings: MeteringSettings, token: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        assert settings.sink_url, "Exporter needs TENSORFLEET_METERING_SINK_URL"
        self.ledger, self.settings = ledger, settings
        headers = {"Content-Type": CONTENT_TYPE, "User-Agent": "tensorfleet-metering"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(timeout=settings.sink_timeout_seconds, headers=headers, transport=transport)
        self.sink_url = settings.sink_url
        self.verifier = chain.Verifier(chain.public_key_from_b64(ledger.signer.public_key_b64))
        self._verified: verify.Anchor | None = None  # the last record checked (seq and hash)

    def verify_before_export(self, rows: list[tuple[int, str, str, str]]) -> list[verify.Problem]:
        """Check each record once, before it leaves the pod: its hash, its signature and its link to the record
        before it. Failures are counted (tensorfleet_metering_ledger_verification_failures_total) and logged;
        the records are exported all the same (the ledger is evidence, the sink and `tensorfleet usage verify`
        see the same problem), so billing never stalls silently."""
        fresh = [row for row in rows if self._verified is None or row[0] > self._verified.seq]
        if not fresh:
            return []
        before = fresh[0][0] - 1
        if self._verified is not None and self._verified.seq == before:
            anchor: verify.Anchor | None = self._verified
        else:
            link = self.ledger.link_before(before + 1)
            anchor = verify.Anchor(before, link) if link is not None else None
        problems = verify.verify_appended(self.ledger.ledger_id, fresh, self.verifier, anchor)
        for problem in problems:
            metrics.LEDGER_VERIFICATION_FAILURES.labels(problem.kind).inc()
            log.error("usage ledger %s, record %s fails verification (%s): %s", problem.ledger, problem.seq,
                      problem.kind, problem.message)
        self._verified = verify.Anchor(fresh[-1][0], fresh[-1][2])
        return problems

    def export_once(self) -> int:
        """Send the next batch; the number of records the sink accepted (0: nothing to send)."""
        rows, checkpoints = self.ledger.unexported(self.settings.export_batch_size)
        if not rows and not checkpoints:
            return 0
        self.verify_before_export(rows)
        key_id = self.ledger.signer.key_id
        events = [record_event(body, digest, sig, key_id) for _, body, digest, sig in rows]
        events += [checkpoint_event(body, sig) for _, body, sig in checkpoints]
        try:
            response = self.client.post(self.sink_url, content=json.dumps(events, separators=(",", ":")))
        except httpx.HTTPError as exc:
            raise ExportFailed(f"sink unreachable: {exc!r}") from None
        except (httpx.InvalidURL, ValueError) as exc:  # a URL httpx cannot send to: retried, it may be fixed
            raise ExportFailed(f"sink request to {self.sink_url!r} failed: {exc!r}") from None
        if response.status_code // 100 != 2:
            raise ExportFailed(f"sink answered {response.status_code}: {response.text[:200]}",
                               _retry_after(response))
        upto = rows[-1][0] if rows else 0
        self.ledger.mark_exported(upto, [seq for seq, _, _ in checkpoints])
        metrics.EXPORTED.inc(len(rows))
        metrics.EXPORT_LAST_SUCCESS.set(time.time())
        return max(len(rows), 1 if checkpoints else 0)

    def drain(self) -> None:
        """Export until nothing is left (raises ExportFailed on the first failure)."""
        while self.export_once():
            pass

    def close(self) -> None:
        self.client.close()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def update_spool_metrics(ledger: Ledger, settings: MeteringSettings) -> int:
    size = ledger.spool_size()
    publish_spool(size, settings)
    return size


def publish_spool(size: int, settings: MeteringSettings) -> None:
    """The spool gauges for ``size`` records waiting for export (0 without a sink: nothing waits)."""
    metrics.SPOOL.set(size)
    metrics.SPOOL_CAPACITY.set(settings.spool_max_records)
    metrics.SPOOL_ALERT.set(1 if size >= settings.spool_alert_ratio * settings.spool_max_records else 0)
    metrics.SPOOL_FULL.set(1 if size >= settings.spool_max_records else 0)


class ExporterThread(threading.Thread):
    def __init__(self, exporter: Exporter, settings: MeteringSettings) -> None:
        super().__init__(name="tensorfleet-usage-exporter", daemon=True)
        self.exporter, self.settings = exporter, settings
        self.stop_event = threading.Event()
        self.delay = backoff_delays(settings.retry_initial_seconds, settings.retry_max_seconds)
        self.failures = 0

    def run(self) -> None:
        """Export until stopped, then make one last attempt (what fails waits in the ledger for the next start)."""
        try:
            while not self.stop_event.is_set():
                self.stop_event.wait(self.step())
            self.step()
        finally:
            self.exporter.close()
            self.exporter.ledger.close()

    def step(self) -> float:
        """Export what there is, then prune; how long to wait before the next step.

        Any failure (the sink, SQLite's "database or disk is full", a bug) is counted, logged and retried
        with the backoff: the thread lives as long as the sink is open, and what was not marked exported is
        sent again (at least once; the sink deduplicates by id)."""
        try:
            while self.exporter.export_once() and not self.stop_event.is_set():
                self.failures = 0
            self.failures = 0
            self.exporter.ledger.prune(self.settings.retention_seconds)
            update_spool_metrics(self.exporter.ledger, self.settings)
            return self.settings.export_interval_seconds
        except Exception as exc:
            return self._failed(exc)

    def _failed(self, exc: Exception) -> float:
        self.failures += 1
        metrics.EXPORT_FAILURES.inc()
        self._end_open_transaction()
        retry_after = exc.retry_after if isinstance(exc, ExportFailed) else None
        wait = min(retry_after if retry_after is not None else self.delay(self.failures),
                   self.settings.retry_max_seconds)
        if isinstance(exc, ExportFailed):
            log.warning("usage export failed (attempt %d, retry in %.1fs): %s", self.failures, wait, exc)
        else:
            log.warning("usage export failed (attempt %d, retry in %.1fs): %r", self.failures, wait, exc,
                        exc_info=exc)
        try:
            update_spool_metrics(self.exporter.ledger, self.settings)
        except Exception as metrics_exc:  # the ledger may be what failed; the next step tries again
            log.warning("usage spool metrics not updated: %r", metrics_exc)
        return wait

    def _end_open_transaction(self) -> None:
        """A failed COMMIT can leave the exporter's connection inside a transaction; every later BEGIN would
        fail. Roll it back (nothing in it was acknowledged: the export cursor moves only on commit)."""
        conn = self.exporter.ledger.conn
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def stop(self) -> None:
        self.stop_event.set()
