"""The usage ledger: an append-only, hash-chained, signed SQLite database on the pod's volume.

Durability: WAL journal with ``synchronous=FULL``, so a transaction that has committed survives
``kill -9`` and power loss; one that has not leaves no trace. Everything one writer cycle does (journal
events and GPU intervals, settle requests into records, sign a checkpoint) is one transaction, so a crash
at any moment leaves the chain whole and the journal consistent with it.

Tables: ``records`` (the chain), ``checkpoints`` (signed heads), ``pending`` (events waiting for their
GPU time to be final), ``intervals`` (measured GPU intervals not final yet), ``meta``.
Triggers refuse updates of records, and deletes other than pruning exported, checkpointed records.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tensorfleet.metering import chain

# The journal's unsettled events with their shares so far; ``energy_mj`` NULL while no interval measured energy.
PENDING = """CREATE TABLE IF NOT EXISTS pending (
    key TEXT PRIMARY KEY, arrival INTEGER NOT NULL, event TEXT NOT NULL, context TEXT NOT NULL,
    gpu_ms REAL NOT NULL DEFAULT 0, energy_mj REAL, covered REAL NOT NULL DEFAULT 0)"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, time TEXT NOT NULL,
    body TEXT NOT NULL, hash TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY, body TEXT NOT NULL, signature TEXT NOT NULL, exported INTEGER NOT NULL DEFAULT 0);
{PENDING};
CREATE TABLE IF NOT EXISTS intervals (
    k INTEGER PRIMARY KEY, start REAL NOT NULL, end REAL NOT NULL, busy_ms REAL, energy_mj REAL, kind TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS records_append_only BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'usage records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_prune_only BEFORE DELETE ON records
WHEN OLD.seq > COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'prunable_seq'), 0)
BEGIN SELECT RAISE(ABORT, 'usage records are append-only: only exported, checkpointed records are pruned'); END;
"""


def pending_energy(conn: sqlite3.Connection, schema: str = "main") -> str:
    """The SQL that reads ``pending.energy_mj`` of the database ``schema``. A journal from before "not measured"
    energy (``NOT NULL DEFAULT 0``) has 0 mJ where no interval measured energy (one that measured it while the
    request's work ran gives the request more than 0), so its 0 reads as NULL."""
    notnull = any(row[1] == "energy_mj" and row[3] for row in conn.execute(f"PRAGMA {schema}.table_info(pending)"))
    return "NULLIF(energy_mj, 0)" if notnull else "energy_mj"


def _upgrade_pending(conn: sqlite3.Connection) -> None:
    """A journal from before "not measured" energy rebuilt with ``pending.energy_mj`` nullable (SQLite cannot
    drop a NOT NULL in place); its 0 mJ become NULL (``pending_energy``)."""
    if (energy := pending_energy(conn)) == "energy_mj":
        return
    conn.execute("ALTER TABLE pending RENAME TO pending_before")
    conn.execute(PENDING)
    conn.execute(f"INSERT INTO pending SELECT key, arrival, event, context, gpu_ms, {energy}, covered "
                 "FROM pending_before")
    conn.execute("DROP TABLE pending_before")


def boot_id() -> str:
    """The kernel's boot id: monotonic timestamps from an earlier boot mean nothing now."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: str | Path) -> sqlite3.Connection:
    # Used by one thread at a time (opened by the starting thread, then handed to its worker thread).
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class Ledger:
    """One writer's handle. Not thread-safe: each thread opens its own."""

    def __init__(self, path: str | Path, signer: chain.Signer, labels: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.signer = signer
        self.conn = connect(self.path)
        self.conn.executescript(SCHEMA)
        with self.transaction():
            if self.get_meta("ledger_id") is None:
                self._init_meta(labels or {})
            _upgrade_pending(self.conn)
        self.ledger_id = str(self.get_meta("ledger_id"))
        stored_key = self.get_meta("key_id")
        if stored_key != signer.key_id:
            raise ValueError(f"{self.path}: the ledger is signed with key {stored_key}, this process has "
                             f"{signer.key_id}; keep the signing key of a ledger or start a new usage volume")
        self.head_seq, self.head_hash = self._head()

    def _init_meta(self, labels: dict[str, str]) -> None:
        ledger_id = str(uuid.uuid4())
        values = {"ledger_id": ledger_id, "created": utc_now(), "key_id": self.signer.key_id,
                  "public_key": self.signer.public_key_b64, "exported_seq": "0", **labels}
        for key, value in values.items():
            self.set_meta(key, value)

    def close(self) -> None:
        self.conn.close()

    # -- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.head_seq, self.head_hash = self._head() if hasattr(self, "ledger_id") else (0, "")
            raise
        self.conn.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def _head(self) -> tuple[int, str]:
        row = self.conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        pruned = self.get_meta("pruned_seq")
        if pruned is not None:
            return int(pruned), str(self.get_meta("pruned_hash"))
        return 0, chain.genesis_hash(str(self.get_meta("ledger_id")))

    # -- the chain -----------------------------------------------------------------------------
    def append(self, bodies: Sequence[dict[str, Any]]) -> list[int]:
        """Chain, sign and insert records (inside the caller's transaction); their sequence numbers."""
        rows = []
        for body in bodies:
            seq = self.head_seq + 1
            full = {**body, "ledger": self.ledger_id, "seq": seq, "prevHash": self.head_hash}
            text = chain.canonical(full)
            digest = chain.sha256_hex(text)
            rows.append((seq, full["id"], full["time"], text, digest, self.signer.sign_record(digest)))
            self.head_seq, self.head_hash = seq, digest
        # One statement for the cycle's records; a failure rolls the transaction back and resets the head.
        self.conn.executemany("INSERT INTO records(seq, id, time, body, hash, signature) VALUES (?, ?, ?, ?, ?, ?)",
                              rows)
        return [row[0] for row in rows]

    def checkpoint(self) -> dict[str, Any]:
        """Sign the current head (inside the caller's transaction)."""
        body = {"ledger": self.ledger_id, "seq": self.head_seq, "head": self.head_hash, "time": utc_now(),
                "keyId": self.signer.key_id, "publicKey": self.signer.public_key_b64,
                "service": self.get_meta("service"), "namespace": self.get_meta("namespace"),
                "pod": self.get_meta("pod")}
        text = chain.canonical(body)
        self.conn.execute("INSERT INTO checkpoints(seq, body, signature) VALUES (?, ?, ?) "
                          "ON CONFLICT(seq) DO NOTHING", (self.head_seq, text, self.signer.sign_checkpoint(text)))
        return body

    def last_checkpoint_seq(self) -> int:
        row = self.conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
        return int(row[0] or 0)

    def link_before(self, seq: int) -> str | None:
        """The hash record ``seq`` must link to (``prevHash``): the record before it, the pruning anchor, or the
        genesis hash for the first record; None when that record is gone and no anchor names it."""
        if seq <= 1:
            return chain.genesis_hash(self.ledger_id)
        row = self.conn.execute("SELECT hash FROM records WHERE seq = ?", (seq - 1,)).fetchone()
        if row is not None:
            return str(row[0])
        if self.get_meta("pruned_seq") == str(seq - 1):
            return self.get_meta("pruned_hash")
        return None

    def recorded(self, record_ids: Sequence[str]) -> set[str]:
        """Which of these record ids the ledger holds (one query per 500 ids)."""
        found: set[str] = set()
        for at in range(0, len(record_ids), 500):
            part = record_ids[at:at + 500]
            query = f"SELECT id FROM records WHERE id IN ({','.join('?' * len(part))})"
            found.update(row[0] for row in self.conn.execute(query, part))
        return found

    # -- retention -----------------------------------------------------------------------------
    def prune(self, older_than_seconds: float, now: float | None = None) -> int:
        """Delete exported records older than the retention that an exported checkpoint covers."""
        if older_than_seconds <= 0:
            return 0
        cutoff = datetime.datetime.fromtimestamp((now or time.time()) - older_than_seconds, tz=datetime.UTC)
        cutoff_text = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        exported = int(self.get_meta("exported_seq") or 0)
        row = self.conn.execute(
            "SELECT MAX(c.seq) FROM checkpoints c JOIN records r ON r.seq = c.seq "
            "WHERE c.exported = 1 AND c.seq <= ? AND r.time < ?", (exported, cutoff_text)).fetchone()
        anchor = int(row[0] or 0)
        if anchor <= int(self.get_meta("pruned_seq") or 0):
            return 0
        anchor_hash = self.conn.execute("SELECT hash FROM records WHERE seq = ?", (anchor,)).fetchone()[0]
        with self.transaction():
            self.set_meta("prunable_seq", str(anchor))
            deleted = self.conn.execute("DELETE FROM records WHERE seq <= ?", (anchor,)).rowcount
            self.conn.execute("DELETE FROM checkpoints WHERE seq < ?", (anchor,))
            self.set_meta("pruned_seq", str(anchor))
            self.set_meta("pruned_hash", str(anchor_hash))
        return int(deleted)

    # -- export cursor -------------------------------------------------------------------------
    def unexported(self, limit: int) -> tuple[list[tuple[int, str, str, str]], list[tuple[int, str, str]]]:
        """Records after the export cursor (seq, body, hash, signature) and the checkpoints up to them."""
        exported = int(self.get_meta("exported_seq") or 0)
        records = self.conn.execute("SELECT seq, body, hash, signature FROM records WHERE seq > ? ORDER BY seq "
                                    "LIMIT ?", (exported, limit)).fetchall()
        upto = records[-1][0] if records else exported
        checkpoints = self.conn.execute("SELECT seq, body, signature FROM checkpoints WHERE exported = 0 "
                                        "AND seq <= ? ORDER BY seq", (upto,)).fetchall()
        return records, checkpoints

    def mark_exported(self, upto_seq: int, checkpoint_seqs: Sequence[int]) -> None:
        with self.transaction():
            current = int(self.get_meta("exported_seq") or 0)
            self.set_meta("exported_seq", str(max(current, upto_seq)))
            self.conn.executemany("UPDATE checkpoints SET exported = 1 WHERE seq = ?",
                                  [(s,) for s in checkpoint_seqs])

    def spool_size(self) -> int:
        exported = int(self.get_meta("exported_seq") or 0)
        row = self.conn.execute("SELECT MAX(seq) FROM records").fetchone()
        return max(0, int(row[0] or 0) - exported)


def read_ledger(path: str | Path) -> tuple[dict[str, str], list[tuple[int, str, str, str]], list[tuple[str, str]]]:
    """(meta, records as (seq, body, hash, signature), checkpoints as (body, signature)) of a ledger file.

    The file and its WAL are never written: a read-write connection closing last would fold the WAL into the
    file and delete it, changing the evidence a verifier reads. A live ledger (its ``-shm`` beside it) is read
    in place, read-only, beside its writer; otherwise, or when that fails, a snapshot copy in a temporary folder.
    A symlink (``latest.db -> usage.db``) is followed first: the ``-wal`` and ``-shm`` lie beside the real file.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such ledger")
    path = Path(path).resolve()
    if Path(f"{path}-shm").exists():
        with contextlib.suppress(sqlite3.OperationalError):
            return _read_tables(f"{path.as_uri()}?mode=ro")
    with tempfile.TemporaryDirectory(prefix="tensorfleet-ledger-") as folder:
        copy = Path(folder) / "usage.db"
        shutil.copyfile(path, copy)
        if Path(f"{path}-wal").exists():
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        return _read_tables(copy.as_uri())


def _read_tables(uri: str) -> tuple[dict[str, str], list[tuple[int, str, str, str]], list[tuple[str, str]]]:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
    try:
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        records = [(int(s), str(b), str(h), str(g)) for s, b, h, g in
                   conn.execute("SELECT seq, body, hash, signature FROM records ORDER BY seq")]
        checkpoints = [(str(b), str(g)) for b, g in
                       conn.execute("SELECT body, signature FROM checkpoints ORDER BY seq")]
    finally:
        conn.close()
    return meta, records, checkpoints
