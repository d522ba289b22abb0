"""The signed, hash-chained ledger: tampering of every kind is detected, in the file and in exports."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, export, records, units, verify
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.cli import usage
from tensorfleet.metering.ledger import Ledger

KEY = chain.generate_key()
SIGNER = chain.Signer(KEY)
VERIFIER = chain.Verifier(KEY.public_key())
CTX = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())


def body(i: int, tenant: str = "acme") -> dict:
    event = request(f"req-{i}", admitted=0.0, first_token=0.1, chunks=((0.2, 10),), tenant=tenant,
                    received_at=1_700_000_000.0 + i)
    return records.request_record(event, CTX, Settled(f"k{i}", Share(gpu_ms=10.0 * i), 110, True), "gpm")


def make_ledger(path: Path, count: int = 6, checkpoint_at: tuple[int, ...] = (6,)) -> Ledger:
    ledger = Ledger(path, SIGNER, {"namespace": "team-a", "service": "llama", "pod": "pod-1"})
    for i in range(1, count + 1):
        with ledger.transaction():
            ledger.append([body(i)])
            if i in checkpoint_at:
                ledger.checkpoint()
    return ledger


def check(path: Path, extra: list[verify.Checkpoint] | None = None) -> verify.Result:
    recs, points, anchors, _ = verify.from_ledger_file(path)
    return verify.verify(recs, points + (extra or []), VERIFIER, anchors)


def attacker(path: Path) -> sqlite3.Connection:
    """Direct write access to the file, as someone with the volume would have (triggers dropped)."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("DROP TRIGGER records_append_only")
    conn.execute("DROP TRIGGER records_prune_only")
    return conn


def kinds(result: verify.Result) -> set[str]:
    return {p.kind for p in result.problems}


def test_an_untouched_ledger_verifies(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    result = check(tmp_path / "u.db")
    assert result.ok, result.problems
    summary = next(iter(result.ledgers.values()))
    assert (summary.records, summary.head_seq, summary.last_checkpoint_seq) == (6, 6, 6)


def test_the_database_refuses_updates_and_deletes_of_records(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "u.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        ledger.conn.execute("UPDATE records SET body = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        ledger.conn.execute("DELETE FROM records WHERE seq = 1")


def test_an_edited_record_is_detected(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    conn = attacker(tmp_path / "u.db")
    text = conn.execute("SELECT body FROM records WHERE seq = 3").fetchone()[0]
    conn.execute("UPDATE records SET body = ? WHERE seq = 3", (text.replace('"tenant":"acme"', '"tenant":"other"'),))
    assert kinds(check(tmp_path / "u.db")) == {"edited"}


def test_an_edited_record_with_a_recomputed_hash_fails_its_signature_and_the_link(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    conn = attacker(tmp_path / "u.db")
    text = conn.execute("SELECT body FROM records WHERE seq = 3").fetchone()[0].replace('"gpuMs":30.0', '"gpuMs":3.0')
    conn.execute("UPDATE records SET body = ?, hash = ? WHERE seq = 3", (text, chain.sha256_hex(text)))
    assert {"bad-signature", "inserted"} <= kinds(check(tmp_path / "u.db"))


def test_a_deleted_record_is_detected(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    attacker(tmp_path / "u.db").execute("DELETE FROM records WHERE seq = 4")
    result = check(tmp_path / "u.db")
    assert "deleted" in kinds(result)
    assert any(p.seq == 5 for p in result.problems)


def test_reordered_records_are_detected(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    conn = attacker(tmp_path / "u.db")
    rows = {s: r for s, *r in conn.execute("SELECT seq, id, time, body, hash, signature FROM records")}
    for seq, other in ((2, 3), (3, 2)):
        conn.execute("UPDATE records SET id = ?, time = ?, body = ?, hash = ?, signature = ? WHERE seq = ?",
                     (*[f"x{seq}", *rows[other][1:]], seq))
    assert "reordered" in kinds(check(tmp_path / "u.db"))


def test_an_inserted_record_is_detected_even_with_a_valid_looking_chain(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    conn = attacker(tmp_path / "u.db")
    head = conn.execute("SELECT hash FROM records WHERE seq = 6").fetchone()[0]
    forged = chain.Signer(chain.generate_key())  # the attacker has no access to the real key
    ledger_id = conn.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()[0]
    text = chain.canonical({**body(7, tenant="victim"), "ledger": ledger_id, "seq": 7, "prevHash": head})
    digest = chain.sha256_hex(text)
    conn.execute("INSERT INTO records VALUES (7, 'forged', 't', ?, ?, ?)", (text, digest, forged.sign_record(digest)))
    assert kinds(check(tmp_path / "u.db")) == {"bad-signature"}


def test_a_record_inserted_in_the_middle_breaks_the_chain(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    conn = attacker(tmp_path / "u.db")
    conn.execute("UPDATE records SET seq = seq + 100 WHERE seq >= 4")
    conn.execute("UPDATE records SET seq = seq - 99 WHERE seq >= 104")
    copied = conn.execute("SELECT body, hash, signature FROM records WHERE seq = 2").fetchone()
    conn.execute("INSERT INTO records VALUES (4, 'dup', 't', ?, ?, ?)", copied)  # a replayed, validly signed record
    assert {"reordered", "inserted"} & kinds(check(tmp_path / "u.db"))


def test_a_truncated_tail_is_detected_with_checkpoints_published_outside(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db", count=8, checkpoint_at=(4, 8)).close()
    _, outside, _, _ = verify.from_ledger_file(tmp_path / "u.db")  # what the sink received
    conn = attacker(tmp_path / "u.db")
    conn.execute("DELETE FROM records WHERE seq > 5")
    conn.execute("DELETE FROM checkpoints WHERE seq > 5")  # the attacker also cleans the local checkpoints
    assert check(tmp_path / "u.db").ok  # locally nothing shows...
    result = check(tmp_path / "u.db", outside)
    assert kinds(result) == {"truncated"}  # ...but the published checkpoint at 8 does


def test_checkpoints_signed_by_another_key_do_not_count(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    recs, points, anchors, _ = verify.from_ledger_file(tmp_path / "u.db")
    other = chain.Verifier(chain.generate_key().public_key())
    # Verified with another key only: every record and checkpoint names a key that is not trusted.
    assert {"unknown-key"} == kinds(verify.verify(recs, points, other, anchors))
    # A checkpoint that names the trusted key but was signed by another fails, and does not count (no truncation).
    text = chain.canonical(json.loads(points[0].body_text) | {"seq": 99})
    forged = verify.Checkpoint(text, chain.Signer(chain.generate_key()).sign_checkpoint(text))
    assert {"bad-signature"} == kinds(verify.verify(recs, [forged], VERIFIER, anchors))


def test_pruning_keeps_the_rest_verifiable_and_only_removes_exported_records(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "u.db", count=6, checkpoint_at=(3, 6))
    assert ledger.prune(1.0, now=2_000_000_000.0) == 0  # nothing exported yet
    ledger.mark_exported(4, [3])
    assert ledger.prune(1.0, now=2_000_000_000.0) == 3  # up to the exported checkpoint at 3
    ledger.close()
    result = check(tmp_path / "u.db")
    assert result.ok, result.problems
    assert next(iter(result.ledgers.values())).first_seq == 4


def _exported_events(path: Path) -> list[dict]:
    ledger = Ledger(path, SIGNER)
    rows, points = ledger.unexported(100)
    events = [export.record_event(b, h, s, SIGNER.key_id) for _, b, h, s in rows]
    return events + [export.checkpoint_event(b, s) for _, b, s in points]


def test_exported_cloudevents_verify_with_duplicates_and_detect_tampering(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    events = _exported_events(tmp_path / "u.db")
    assert all(e["specversion"] == "1.0" and e["id"] and e["source"] and e["subject"] for e in events)
    assert events[0]["subject"] == "acme"
    assert events[0]["type"] == "io.tensorfleet.usage.request.v1"
    recs, points = verify.from_events(events + events[:3])  # at-least-once: some came twice
    assert verify.verify(recs, points, VERIFIER).ok
    edited = copy.deepcopy(events)
    edited[2]["data"]["outputTokens"] = 1
    recs, points = verify.from_events(edited)
    assert kinds(verify.verify(recs, points, VERIFIER)) == {"edited"}
    recs, points = verify.from_events(events[:1] + events[3:])
    assert "deleted" in kinds(verify.verify(recs, points, VERIFIER))
    recs, points = verify.from_events(events[:4] + events[-1:])  # tail cut, checkpoint kept
    assert kinds(verify.verify(recs, points, VERIFIER)) == {"truncated"}


def test_verify_command_exit_codes(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    (tmp_path / "pub.pem").write_bytes(chain.public_pem(KEY.public_key()))
    runner = CliRunner()
    ok = runner.invoke(usage, ["verify", "--ledger", str(tmp_path / "u.db"), "--public-key", str(tmp_path / "pub.pem")])
    assert ok.exit_code == 0
    assert "OK" in ok.output
    attacker(tmp_path / "u.db").execute("DELETE FROM records WHERE seq = 2")
    bad = runner.invoke(usage, ["verify", "--ledger", str(tmp_path / "u.db"), "--public-key",
                                str(tmp_path / "pub.pem"), "-o", "json"])
    assert bad.exit_code == 1
    assert "deleted" in {p["kind"] for p in json.loads(bad.output)["problems"]}
    missing = runner.invoke(usage, ["verify", "--ledger", str(tmp_path / "u.db")])
    assert missing.exit_code == 2
    assert "--public-key is required" in missing.output


def test_keygen_writes_a_pair_that_signs_and_verifies(tmp_path: Path) -> None:
    result = CliRunner().invoke(usage, ["keygen", "--private-key", str(tmp_path / "k.pem"),
                                        "--public-key", str(tmp_path / "k.pub")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    signer = chain.Signer(chain.load_private_key(tmp_path / "k.pem"))
    assert chain.Verifier(chain.load_public_key(tmp_path / "k.pub")).record_ok("ab" * 32, signer.sign_record("ab" * 32))
    again = CliRunner().invoke(usage, ["keygen", "--private-key", str(tmp_path / "k.pem"),
                                       "--public-key", str(tmp_path / "x.pub")])
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output


def keygen(private_key: Path, public_key: Path) -> Result:
    return CliRunner().invoke(usage, ["keygen", "--private-key", str(private_key), "--public-key", str(public_key)])


def test_keygen_with_one_path_for_both_keys_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """It wrote the private key, then the public key over it, and printed the Secret command for that file."""
    result = keygen(tmp_path / "k.pem", tmp_path / "." / "k.pem")
    assert result.exit_code == 2, result.output
    assert "--public-key" in result.output
    assert "must differ from --private-key" in result.output
    assert not (tmp_path / "k.pem").exists()


def test_keygen_that_cannot_write_the_public_key_leaves_no_private_key(tmp_path: Path) -> None:
    """A half pair made every re-run refuse ('exists') until the user deleted the key by hand."""
    result = keygen(tmp_path / "k.pem", tmp_path / "no-dir" / "k.pub")
    assert result.exit_code == 2, result.output
    assert "--public-key" in result.output
    assert "no-dir" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert list(tmp_path.iterdir()) == []


def test_keygen_that_fails_placing_the_second_key_removes_the_first(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    replace = os.replace
    calls: list[object] = []

    def full_disk_on_second(source: str, target: str) -> None:
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_on_second)
    result = keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    assert result.exit_code == 2
    assert "--public-key" in result.output
    assert "No space left" in result.output
    assert list(tmp_path.iterdir()) == []


def test_keygen_blames_the_flag_whose_file_exists(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text("x")
    result = keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    assert result.exit_code == 2
    assert "Invalid value for --public-key" in result.output
    assert "refusing to overwrite" in result.output
    assert not (tmp_path / "k.pem").exists()
    assert (tmp_path / "k.pub").read_text() == "x"


def test_a_ledger_refuses_a_different_signing_key(tmp_path: Path) -> None:
    make_ledger(tmp_path / "u.db").close()
    with pytest.raises(ValueError, match="signed with key"):
        Ledger(tmp_path / "u.db", chain.Signer(chain.generate_key()))


def test_the_exporter_verifies_each_record_once_before_it_leaves_the_pod(tmp_path: Path) -> None:
    """A tampered ledger still exports (the sink and `usage verify` see the same), but it is counted and logged,
    which is what the TensorfleetLedgerVerificationFailed alert watches."""
    from prometheus_client import REGISTRY

    from tensorfleet.metering.settings import MeteringSettings

    def failures(kind: str) -> float:
        return REGISTRY.get_sample_value("tensorfleet_metering_ledger_verification_failures_total",
                                         {"kind": kind}) or 0.0

    make_ledger(tmp_path / "u.db", count=8).close()
    conn = attacker(tmp_path / "u.db")
    text = conn.execute("SELECT body FROM records WHERE seq = 3").fetchone()[0]
    conn.execute("UPDATE records SET body = ? WHERE seq = 3", (text.replace('"tenant":"acme"', '"tenant":"x"'),))
    conn.execute("DELETE FROM records WHERE seq = 6")
    conn.close()
    before = {kind: failures(kind) for kind in ("edited", "broken-link", "bad-signature")}
    exporter = export.Exporter(Ledger(tmp_path / "u.db", SIGNER), MeteringSettings(sink_url="http://sink.invalid"))
    try:
        first, _ = exporter.ledger.unexported(4)
        problems = exporter.verify_before_export(first)
        assert [(p.seq, p.kind) for p in problems] == [(3, "edited")]
        assert exporter.verify_before_export(first) == []  # a batch retried after a failed export: once only
        rest, _ = exporter.ledger.unexported(100)
        assert [(p.seq, p.kind) for p in exporter.verify_before_export(rest)] == [(7, "broken-link")]
    finally:
        exporter.close()
        exporter.ledger.close()
    assert failures("edited") - before["edited"] == 1
    assert failures("broken-link") - before["broken-link"] == 1
    assert failures("bad-signature") == before["bad-signature"]
    clean = export.Exporter(make_ledger(tmp_path / "clean.db"), MeteringSettings(sink_url="http://sink.invalid"))
    try:
        rows, _ = clean.ledger.unexported(100)
        assert clean.verify_before_export(rows) == []
    finally:
        clean.close()
        clean.ledger.close()
