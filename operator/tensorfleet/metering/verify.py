"""Verification of usage records and checkpoints: from a pod's ledger file or from exported CloudEvents.

Detects an edited record (its hash no longer matches, or its signature does not), a deleted one (a gap
in ``seq`` and a broken ``prevHash`` link), reordered ones (a row whose ``seq`` differs from its
position, a broken link), an inserted one (a broken link, a signature nobody but the key holder can
make) and a truncated tail (a signed checkpoint names a head past the last record present).
Truncation after the last published checkpoint cannot be seen: checkpoints are signed every
``checkpoint_every_records`` records or ``checkpoint_interval_seconds``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tensorfleet.metering import chain
from tensorfleet.metering.ledger import read_ledger
from tensorfleet.metering.records import CHECKPOINT_TYPE, EVENT_TYPES


@dataclasses.dataclass(frozen=True)
class Record:
    body_text: str
    hash: str
    signature: str
    position: int | None = None  # the row's seq in a ledger file; None in an export


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    body_text: str
    signature: str


@dataclasses.dataclass(frozen=True)
class Problem:
    ledger: str
    seq: int | None
    kind: str  # edited, bad-signature, reordered, deleted, inserted, truncated, conflict, unknown-key, malformed
    message: str


@dataclasses.dataclass
class LedgerSummary:
    records: int = 0
    first_seq: int = 0
    head_seq: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int = 0


@dataclasses.dataclass
class Result:
    ledgers: dict[str, LedgerSummary] = dataclasses.field(default_factory=dict)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True)
class Anchor:
    """Where a pruned ledger starts: the last pruned record's seq and hash."""

    seq: int
    hash: str


def verify(records: Iterable[Record], checkpoints: Iterable[Checkpoint], verifier: chain.Verifier,
           anchors: dict[str, Anchor] | None = None) -> Result:
    result = Result()
    by_ledger: dict[str, list[tuple[Record, dict[str, Any]]]] = {}
    for record in records:
        try:
            body = json.loads(record.body_text)
            ledger = str(body["ledger"])
            int(body["seq"])
        except (ValueError, KeyError, TypeError):
            result.problems.append(Problem("?", record.position, "malformed", "record is not a usage record"))
            continue
        by_ledger.setdefault(ledger, []).append((record, body))
    heads: dict[str, dict[int, str]] = {}
    for ledger, items in by_ledger.items():
        heads[ledger] = _verify_chain(ledger, items, verifier, (anchors or {}).get(ledger), result)
    _verify_checkpoints(checkpoints, verifier, heads, result)
    return result


def _verify_chain(ledger: str, items: list[tuple[Record, dict[str, Any]]], verifier: chain.Verifier,
                  anchor: Anchor | None, result: Result) -> dict[int, str]:
    if all(r.position is None for r, _ in items):  # an export: order of arrival means nothing
        items = _dedupe(ledger, items, result)
    hashes: dict[int, str] = {}
    previous_seq = anchor.seq if anchor else 0
    previous_hash = anchor.hash if anchor else chain.genesis_hash(ledger)
    summary = result.ledgers.setdefault(ledger, LedgerSummary())
    for record, body in items:
        seq = int(body["seq"])
        problem = _check_record(record, body, verifier)
        if problem:
            result.problems.append(Problem(ledger, seq, *problem))
        if record.position is not None and record.position != seq:
            result.problems.append(Problem(ledger, record.position, "reordered",
                                           f"row {record.position} holds record seq {seq}"))
        if seq > previous_seq + 1:
            result.problems.append(Problem(ledger, seq, "deleted",
                                           f"records {previous_seq + 1}..{seq - 1} are missing"))
        elif seq <= previous_seq:
            result.problems.append(Problem(ledger, seq, "reordered", f"seq {seq} follows seq {previous_seq}"))
        if body.get("prevHash") != previous_hash:
            result.problems.append(Problem(ledger, seq, "inserted" if seq == previous_seq + 1 else "deleted",
                                           "prevHash does not link to the record before it"))
        hashes[seq] = record.hash
        previous_seq, previous_hash = seq, record.hash
        summary.records += 1
        summary.first_seq = summary.first_seq or seq
        summary.head_seq = max(summary.head_seq, seq)
    return hashes


def verify_appended(ledger: str, rows: Sequence[tuple[int, str, str, str]], verifier: chain.Verifier,
                    anchor: Anchor | None) -> list[Problem]:
    """Consecutive rows of one ledger, as stored ``(seq, body, hash, signature)``, checked as ``verify`` checks a
    ledger file: each record's hash and signature, and its link to the record before it (``anchor``: that
    record's seq and hash; None when it is unknown, then the first row's link is not checked). Kinds: edited,
    bad-signature, malformed, broken-link."""
    problems: list[Problem] = []
    previous = anchor
    for seq, body_text, digest, signature in rows:
        try:
            body = json.loads(body_text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            problems.append(Problem(ledger, seq, "malformed", "the record is not a JSON object"))
        else:
            problem = _check_record(Record(body_text, digest, signature, seq), body, verifier)
            if problem:
                problems.append(Problem(ledger, seq, *problem))
            if previous is not None and (seq != previous.seq + 1 or body.get("seq") != seq
                                         or body.get("prevHash") != previous.hash):
                problems.append(Problem(ledger, seq, "broken-link",
                                        f"record {seq} does not link to record {previous.seq} before it"))
        previous = Anchor(seq, digest)
    return problems


def _check_record(record: Record, body: dict[str, Any], verifier: chain.Verifier) -> tuple[str, str] | None:
    if chain.sha256_hex(record.body_text) != record.hash:
        return "edited", "the record's content does not match its hash"
    if not verifier.record_ok(record.hash, record.signature):
        return "bad-signature", f"signature does not verify with key {verifier.key_id}"
    return None


def _dedupe(ledger: str, items: list[tuple[Record, dict[str, Any]]],
            result: Result) -> list[tuple[Record, dict[str, Any]]]:
    """An export may repeat a record (at-least-once); the same seq with other content is a conflict."""
    unique: dict[int, tuple[Record, dict[str, Any]]] = {}
    for record, body in items:
        seq = int(body["seq"])
        if seq in unique and unique[seq][0].hash != record.hash:
            result.problems.append(Problem(ledger, seq, "conflict", "two different records carry this seq"))
            continue
        unique.setdefault(seq, (record, body))
    return [unique[s] for s in sorted(unique)]


def _verify_checkpoints(checkpoints: Iterable[Checkpoint], verifier: chain.Verifier,
                        heads: dict[str, dict[int, str]], result: Result) -> None:
    for checkpoint in checkpoints:
        try:
            body = json.loads(checkpoint.body_text)
            ledger, seq, head = str(body["ledger"]), int(body["seq"]), str(body["head"])
        except (ValueError, KeyError, TypeError):
            result.problems.append(Problem("?", None, "malformed", "checkpoint is not a usage checkpoint"))
            continue
        if body.get("keyId") != verifier.key_id or not verifier.checkpoint_ok(checkpoint.body_text,
                                                                                checkpoint.signature):
            result.problems.append(Problem(ledger, seq, "bad-signature",
                                           f"checkpoint at seq {seq} does not verify with key {verifier.key_id}"))
            continue
        summary = result.ledgers.setdefault(ledger, LedgerSummary())
        summary.checkpoints += 1
        summary.last_checkpoint_seq = max(summary.last_checkpoint_seq, seq)
        hashes = heads.get(ledger, {})
        if seq > summary.head_seq:
            result.problems.append(Problem(ledger, seq, "truncated", f"a signed checkpoint covers {seq} records, "
                                                                      f"only {summary.head_seq} are present"))
        elif seq in hashes and hashes[seq] != head:
            result.problems.append(Problem(ledger, seq, "edited", f"record {seq} differs from the signed checkpoint"))
    for ledger, summary in result.ledgers.items():
        if summary.head_seq > summary.last_checkpoint_seq:
            result.warnings.append(f"ledger {ledger}: {summary.head_seq - summary.last_checkpoint_seq} records after "
                                   "the last checkpoint (a cut there would not be detected)")


# -- sources -----------------------------------------------------------------------------------
def from_ledger_file(path: str | Path) -> tuple[list[Record], list[Checkpoint], dict[str, Anchor], str]:
    """Records, checkpoints, pruning anchor and embedded public key (base64) of a ledger file."""
    meta, rows, checkpoint_rows = read_ledger(path)
    records = [Record(body, digest, signature, seq) for seq, body, digest, signature in rows]
    checkpoints = [Checkpoint(body, signature) for body, signature in checkpoint_rows]
    anchors = {}
    if "pruned_seq" in meta:
        anchors[meta["ledger_id"]] = Anchor(int(meta["pruned_seq"]), meta["pruned_hash"])
    return records, checkpoints, anchors, meta.get("public_key", "")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """CloudEvents from a JSON array, a JSON object, or JSON lines (each an event or a batch)."""
    text = Path(path).read_text()
    stripped = text.strip()
    if not stripped:
        return []
    try:
        documents = [json.loads(stripped)]
    except ValueError:
        documents = [json.loads(line) for line in stripped.splitlines() if line.strip()]
    events: list[dict[str, Any]] = []
    for document in documents:
        events.extend(document if isinstance(document, list) else [document])
    return events


def from_events(events: Iterable[dict[str, Any]]) -> tuple[list[Record], list[Checkpoint]]:
    records, checkpoints = [], []
    record_types = set(EVENT_TYPES.values())
    for event in events:
        data = dict(event.get("data") or {})
        proof = data.pop("proof", {}) or {}
        if event.get("type") in record_types:
            records.append(Record(chain.canonical(data), str(proof.get("hash", "")), str(proof.get("signature", ""))))
        elif event.get("type") == CHECKPOINT_TYPE:
            checkpoints.append(Checkpoint(chain.canonical(data), str(proof.get("signature", ""))))
    return records, checkpoints
