"""Verification of usage records and checkpoints: from a pod's ledger file or from exported CloudEvents.

Detects an edited record (its hash no longer matches, or its signature does not), a deleted one (a gap
in ``seq`` and a broken ``prevHash`` link), reordered ones (a row whose ``seq`` differs from its
position, a broken link), an inserted one (a broken link, a signature nobody but the key holder can
make) and a truncated tail (a signed checkpoint names a head past the last record present).
Truncation after the last published checkpoint cannot be seen: checkpoints are signed every
``checkpoint_every_records`` records or ``checkpoint_interval_seconds``.

* **Keys.** Several public keys may be trusted (a ledger set aside at a key change, an export spanning
  one): each record is checked with the key its proof names (``keyId``; in a ledger file, the ledger's
  key), each checkpoint with its ``keyId``. A key that is not trusted is reported as ``unknown-key``.
* **Sources.** A ledger file and exports of it are one body of evidence per ledger: a record present in
  both counts once when its hash is the same and is a ``conflict`` when it is not.
* **Pruning.** A pruned ledger starts after its anchor (``pruned_seq``/``pruned_hash`` in ``meta``,
  which is not signed). Pruning always cuts at a signed checkpoint and keeps it, so the anchor is
  accepted only when a signed checkpoint at exactly that seq names that head; otherwise the records up
  to it are reported ``deleted``. Whether pruned records reached the sink is a question for the export.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
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
    key_id: str | None = None  # the key it names (proof.keyId; a ledger file's key); None: any trusted key

    def signed_by(self, key: chain.Verifier) -> bool:
        return key.record_ok(self.hash, self.signature)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    body_text: str
    signature: str

    def signed_by(self, key: chain.Verifier) -> bool:
        return key.checkpoint_ok(self.body_text, self.signature)


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
    pruned_seq: int = 0  # records up to this seq were pruned from the ledger file (its anchor)


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


class TrustedKeys:
    """The public keys records and checkpoints may be signed with, by key id."""

    def __init__(self, verifiers: chain.Verifier | Iterable[chain.Verifier]) -> None:
        listed = [verifiers] if isinstance(verifiers, chain.Verifier) else list(verifiers)
        self.by_id = {verifier.key_id: verifier for verifier in listed}

    def names(self) -> str:
        return ", ".join(sorted(self.by_id)) or "none"

    def check(self, key_id: str | None, signed: Callable[[chain.Verifier], bool], what: str) -> tuple[str, str] | None:
        """None when ``signed`` holds for the key ``key_id`` names (any trusted key when None), else (kind, message)."""
        if key_id is None:
            if any(signed(verifier) for verifier in self.by_id.values()):
                return None
            return "bad-signature", f"{what} does not verify with any trusted key ({self.names()})"
        verifier = self.by_id.get(key_id)
        if verifier is None:
            return "unknown-key", (f"{what} is signed with key {key_id}, which is not trusted (trusted: "
                                   f"{self.names()}); give its public key if it is yours")
        if not signed(verifier):
            return "bad-signature", f"{what} does not verify with key {key_id}"
        return None


Item = tuple[Record, dict[str, Any]]


def verify(records: Iterable[Record], checkpoints: Iterable[Checkpoint],
           keys: chain.Verifier | Iterable[chain.Verifier] | TrustedKeys,
           anchors: dict[str, Anchor] | None = None) -> Result:
    """Records from ledger files (with a position) and exports (without) are merged per ledger; ``anchors``
    are the pruning anchors of ledger files."""
    trusted = keys if isinstance(keys, TrustedKeys) else TrustedKeys(keys)
    result = Result()
    by_ledger: dict[str, list[Item]] = {}
    for record in records:
        try:
            body = chain.parse(record.body_text)
            ledger = str(body["ledger"])
            int(body["seq"])
        except (ValueError, KeyError, TypeError):
            result.problems.append(Problem("?", record.position, "malformed", "record is not a usage record"))
            continue
        by_ledger.setdefault(ledger, []).append((record, body))
    signed = _signed_heads(checkpoints, trusted, result)
    anchors = anchors or {}
    heads: dict[str, dict[int, str]] = {}
    for ledger in [*by_ledger, *(name for name in anchors if name not in by_ledger)]:
        heads[ledger] = _verify_chain(ledger, by_ledger.get(ledger, []), trusted, anchors.get(ledger),
                                      signed.get(ledger, {}), result)
    _compare_checkpoints(signed, heads, result)
    return result


def _verify_chain(ledger: str, items: list[Item], trusted: TrustedKeys, anchor: Anchor | None,
                  signed: dict[int, str], result: Result) -> dict[int, str]:
    walk = _merge_sources(ledger, items, result)
    hashes: dict[int, str] = {}
    previous_seq, previous_hash = 0, chain.genesis_hash(ledger)
    summary = result.ledgers.setdefault(ledger, LedgerSummary())
    if anchor is not None:
        summary.pruned_seq = summary.head_seq = anchor.seq
        if any(int(body["seq"]) == anchor.seq for _, body in walk):  # an export holds the anchor's record
            _check_anchor_against_record(ledger, anchor, walk, result)
            anchor = None
    for record, body in walk:
        seq = int(body["seq"])
        if anchor is not None and _order(record, body) > anchor.seq:  # the records before it were pruned
            previous_seq, previous_hash = _take_anchor(ledger, anchor, previous_seq, signed, result)
            hashes[anchor.seq], anchor = anchor.hash, None
        problem = _check_record(record, body, trusted)
        if problem:
            result.problems.append(Problem(ledger, seq, *problem))
        _check_place(ledger, record, seq, body.get("prevHash"), (previous_seq, previous_hash), result)
        hashes[seq] = record.hash
        previous_seq, previous_hash = seq, record.hash
        summary.records += 1
        summary.first_seq = summary.first_seq or seq
        summary.head_seq = max(summary.head_seq, seq)
    if anchor is not None:  # every record is pruned, or all present ones come before the anchor
        _take_anchor(ledger, anchor, previous_seq, signed, result)
        hashes[anchor.seq] = anchor.hash
    return hashes


def _check_place(ledger: str, record: Record, seq: int, prev_hash: Any, previous: tuple[int, str],
                 result: Result) -> None:
    """The record's row, its seq after the one before it, and its link to that record."""
    previous_seq, previous_hash = previous
    if record.position is not None and record.position != seq:
        result.problems.append(Problem(ledger, record.position, "reordered",
                                       f"row {record.position} holds record seq {seq}"))
    if seq > previous_seq + 1:
        result.problems.append(Problem(ledger, seq, "deleted", f"records {previous_seq + 1}..{seq - 1} are missing"))
    elif seq <= previous_seq:
        result.problems.append(Problem(ledger, seq, "reordered", f"seq {seq} follows seq {previous_seq}"))
    if prev_hash != previous_hash:
        result.problems.append(Problem(ledger, seq, "inserted" if seq == previous_seq + 1 else "deleted",
                                       "prevHash does not link to the record before it"))


def _order(record: Record, body: dict[str, Any]) -> int:
    """Where an item stands: a ledger file row at its position (so a moved row shows), an exported one at its seq."""
    return record.position if record.position is not None else int(body["seq"])


def _merge_sources(ledger: str, items: list[Item], result: Result) -> list[Item]:
    """A ledger file's rows in file order, with the exported records the file does not hold put in by seq. An export
    may repeat a record (at-least-once); the same seq with another hash, in exports or the file, is a conflict."""
    rows: dict[int, Item] = {}  # by position: the same ledger file may be given twice (a copy and the live one)
    for record, body in items:
        if record.position is None:
            continue
        if rows.setdefault(record.position, (record, body))[0].hash != record.hash:
            result.problems.append(Problem(ledger, record.position, "conflict",
                                           f"two ledger files hold different records in row {record.position}"))
    file_hashes: dict[int, set[str]] = {}
    for record, body in rows.values():
        file_hashes.setdefault(int(body["seq"]), set()).add(record.hash)
    merged = list(rows.values())
    for record, body in _dedupe(ledger, [item for item in items if item[0].position is None], result):
        seq = int(body["seq"])
        if seq not in file_hashes:
            merged.append((record, body))
        elif record.hash not in file_hashes[seq]:
            result.problems.append(Problem(ledger, seq, "conflict",
                                           "the export and the ledger file hold different records with this seq"))
    return sorted(merged, key=lambda item: _order(*item))  # stable: file rows keep their order


def _check_anchor_against_record(ledger: str, anchor: Anchor, walk: list[Item], result: Result) -> None:
    """The record the anchor names is present (from an export): it is the evidence, and the anchor must agree."""
    if not any(int(body["seq"]) == anchor.seq and record.hash == anchor.hash for record, body in walk):
        result.problems.append(Problem(ledger, anchor.seq, "conflict", f"the pruning anchor names hash {anchor.hash} "
                                                                       f"for record {anchor.seq}, the record differs"))


def _take_anchor(ledger: str, anchor: Anchor, previous_seq: int, signed: dict[int, str],
                 result: Result) -> tuple[int, str]:
    """The anchor stands for the pruned records, if a signed checkpoint at its seq names its hash."""
    if signed.get(anchor.seq) != anchor.hash:
        first = min(previous_seq + 1, anchor.seq)
        result.problems.append(Problem(
            ledger, anchor.seq, "deleted",
            f"records {first}..{anchor.seq} are missing and the pruning anchor (pruned_seq {anchor.seq}, pruned_hash "
            f"{anchor.hash}) is not confirmed by a signed checkpoint at seq {anchor.seq} with that head"))
    return anchor.seq, anchor.hash


def verify_appended(ledger: str, rows: Sequence[tuple[int, str, str, str]], verifier: chain.Verifier,
                    anchor: Anchor | None) -> list[Problem]:
    """Consecutive rows of one ledger, as stored ``(seq, body, hash, signature)``, checked as ``verify`` checks a
    ledger file: each record's hash and signature, and its link to the record before it (``anchor``: that
    record's seq and hash; None when it is unknown, then the first row's link is not checked). Kinds: edited,
    bad-signature, malformed, broken-link."""
    problems: list[Problem] = []
    trusted = TrustedKeys(verifier)
    previous = anchor
    for seq, body_text, digest, signature in rows:
        try:
            body = chain.parse(body_text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            problems.append(Problem(ledger, seq, "malformed", "the record is not a JSON object"))
        else:
            problem = _check_record(Record(body_text, digest, signature, seq), body, trusted)
            if problem:
                problems.append(Problem(ledger, seq, *problem))
            if previous is not None and (seq != previous.seq + 1 or body.get("seq") != seq
                                         or body.get("prevHash") != previous.hash):
                problems.append(Problem(ledger, seq, "broken-link",
                                        f"record {seq} does not link to record {previous.seq} before it"))
        previous = Anchor(seq, digest)
    return problems


def _check_record(record: Record, body: dict[str, Any], trusted: TrustedKeys) -> tuple[str, str] | None:
    if chain.sha256_hex(record.body_text) != record.hash:
        return "edited", "the record's content does not match its hash"
    return trusted.check(record.key_id, record.signed_by, "the signature")


def _dedupe(ledger: str, items: list[Item], result: Result) -> list[Item]:
    """An export may repeat a record (at-least-once); the same seq with other content is a conflict."""
    unique: dict[int, Item] = {}
    for record, body in items:
        seq = int(body["seq"])
        if seq in unique and unique[seq][0].hash != record.hash:
            result.problems.append(Problem(ledger, seq, "conflict", "two different records carry this seq"))
            continue
        unique.setdefault(seq, (record, body))
    return [unique[s] for s in sorted(unique)]


def _signed_heads(checkpoints: Iterable[Checkpoint], trusted: TrustedKeys,
                  result: Result) -> dict[str, dict[int, str]]:
    """The heads that verified checkpoints sign, per ledger and seq (a checkpoint given twice counts once)."""
    signed: dict[str, dict[int, str]] = {}
    for checkpoint in checkpoints:
        try:
            body = chain.parse(checkpoint.body_text)
            ledger, seq, head = str(body["ledger"]), int(body["seq"]), str(body["head"])
        except (ValueError, KeyError, TypeError):
            result.problems.append(Problem("?", None, "malformed", "checkpoint is not a usage checkpoint"))
            continue
        key_id = None if body.get("keyId") is None else str(body["keyId"])
        problem = trusted.check(key_id, checkpoint.signed_by, f"the checkpoint at seq {seq}")
        if problem:
            result.problems.append(Problem(ledger, seq, *problem))
        elif signed.setdefault(ledger, {}).setdefault(seq, head) != head:
            result.problems.append(Problem(ledger, seq, "conflict",
                                           f"two signed checkpoints at seq {seq} name different heads"))
    return signed


def _compare_checkpoints(signed: dict[str, dict[int, str]], heads: dict[str, dict[int, str]], result: Result) -> None:
    for ledger, points in signed.items():
        summary = result.ledgers.setdefault(ledger, LedgerSummary())
        summary.checkpoints = len(points)
        summary.last_checkpoint_seq = max(points)
        hashes = heads.get(ledger, {})
        for seq, head in sorted(points.items()):
            if seq > summary.head_seq:
                result.problems.append(Problem(ledger, seq, "truncated", f"a signed checkpoint covers records "
                                                                          f"up to {seq}, the ledger ends at "
                                                                          f"{summary.head_seq}"))
            elif seq in hashes and hashes[seq] != head:
                result.problems.append(Problem(ledger, seq, "edited",
                                               f"record {seq} differs from the signed checkpoint"))
    for ledger, summary in result.ledgers.items():
        if summary.head_seq > summary.last_checkpoint_seq:
            result.warnings.append(f"ledger {ledger}: {summary.head_seq - summary.last_checkpoint_seq} records after "
                                   "the last checkpoint (a cut there would not be detected)")


# -- sources -----------------------------------------------------------------------------------
def from_ledger_file(path: str | Path) -> tuple[list[Record], list[Checkpoint], dict[str, Anchor], str]:
    """Records, checkpoints, pruning anchor and embedded public key (base64) of a ledger file. The anchor comes from
    ``meta``, which is not signed: ``verify`` accepts it only with a signed checkpoint at its seq and hash."""
    meta, rows, checkpoint_rows = read_ledger(path)
    key_id = meta.get("key_id")
    records = [Record(body, digest, signature, seq, key_id) for seq, body, digest, signature in rows]
    checkpoints = [Checkpoint(body, signature) for body, signature in checkpoint_rows]
    anchors = {}
    if "pruned_seq" in meta:
        try:
            pruned_seq = int(meta["pruned_seq"])
        except ValueError:
            raise ValueError(f"meta pruned_seq={meta['pruned_seq']!r} is not a sequence number") from None
        anchors[meta.get("ledger_id", "?")] = Anchor(pruned_seq, meta.get("pruned_hash", ""))
    return records, checkpoints, anchors, meta.get("public_key", "")


def parse_events(text: str) -> list[Any]:
    """CloudEvents from a JSON array, a JSON object, or JSON lines (each an event or a batch). ValueError names
    the line (from 1) of JSON lines that is not JSON."""
    stripped = text.strip()
    if not stripped:
        return []
    try:
        documents = [chain.parse(stripped)]
    except ValueError:
        documents = _json_lines(text)
    events: list[Any] = []
    for document in documents:
        events.extend(document if isinstance(document, list) else [document])
    return events


def _json_lines(text: str) -> list[Any]:
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                documents.append(chain.parse(line))
            except json.JSONDecodeError as exc:  # its position is within the line alone
                raise ValueError(f"line {number}: not JSON ({exc.msg}: column {exc.colno})") from None
            except ValueError as exc:
                raise ValueError(f"line {number}: not JSON ({exc})") from None
    return documents


def from_events(events: Iterable[Any]) -> tuple[list[Record], list[Checkpoint]]:
    """Records and checkpoints of exported CloudEvents (other types are skipped). ValueError names the event (its
    number, from 1, and id) and the field when an event is not shaped as the exporter writes it."""
    records, checkpoints = [], []
    record_types = set(EVENT_TYPES.values())
    for number, event in enumerate(events, 1):
        if not isinstance(event, dict):
            raise ValueError(f"event {number}: expected a CloudEvent (a JSON object), got {_json_type(event)}")
        if event.get("type") not in record_types and event.get("type") != CHECKPOINT_TYPE:
            continue
        data, proof = _event_data(number, event)
        if event.get("type") == CHECKPOINT_TYPE:
            checkpoints.append(Checkpoint(data, str(proof.get("signature", ""))))
        else:
            key_id = proof.get("keyId")
            records.append(Record(data, str(proof.get("hash", "")), str(proof.get("signature", "")),
                                  key_id=None if key_id is None else str(key_id)))
    return records, checkpoints


def _event_data(number: int, event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An event's data as canonical JSON without its proof, and the proof."""
    where = f"event {number} (id {event.get('id')!r})"
    data = event.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{where}: 'data' must be a JSON object, got {_json_type(data)}")
    data = dict(data)
    proof = data.pop("proof", None)
    proof = {} if proof is None else proof
    if not isinstance(proof, dict):
        raise ValueError(f"{where}: 'data.proof' must be a JSON object, got {_json_type(proof)}")
    try:
        return chain.canonical(data), proof
    except ValueError as exc:  # NaN or an infinite number: no record ever holds one
        raise ValueError(f"{where}: 'data' is not a usage record ({exc})") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
