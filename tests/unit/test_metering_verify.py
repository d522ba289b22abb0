"""`tensorfleet usage verify` over several sources: a ledger with its own export, pruned ledgers and their anchors,
exports across a signing-key change, and input that is not what the exporter writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from metering_builders import CONFIG, request
from tensorfleet.metering import chain, export, records, units, verify
from tensorfleet.metering.attribution import Settled, Share
from tensorfleet.metering.cli import usage
from tensorfleet.metering.ledger import Ledger

SIGNER = chain.Signer(chain.generate_key())
VERIFIER = chain.Verifier(SIGNER.public_key)
CTX = records.context_from_config(CONFIG, "pod-1", "NVIDIA-H100-80GB-HBM3", units.load_table())
PRUNE_NOW = 2_000_000_000.0  # far past every record's time: all exported, checkpointed records may go


def make_ledger(path: Path, count: int, checkpoint_at: tuple[int, ...], signer: chain.Signer = SIGNER) -> Ledger:
    ledger = Ledger(path, signer, {"namespace": "team-a", "service": "llama", "pod": "pod-1"})
    for i in range(1, count + 1):
        event = request(f"req-{i}", admitted=0.0, first_token=0.1, chunks=((0.2, 10),),
                        received_at=1_700_000_000.0 + i)
        with ledger.transaction():
            ledger.append([records.request_record(event, CTX, Settled(f"k{i}", Share(gpu_ms=10.0 * i), 110, True),
                                                  "gpm")])
            if i in checkpoint_at:
                ledger.checkpoint()
    return ledger


def exported(ledger: Ledger) -> list[dict]:
    """What the exporter sends for everything not exported yet: records, then the checkpoints they reach."""
    rows, points = ledger.unexported(10_000)
    events = [export.record_event(b, h, s, ledger.signer.key_id) for _, b, h, s in rows]
    return events + [export.checkpoint_event(b, s) for _, b, s in points]


def write(path: Path, events: list) -> str:
    path.write_text("".join(json.dumps(event) + "\n" for event in events))
    return str(path)


def public_key(path: Path, signer: chain.Signer = SIGNER) -> str:
    path.write_bytes(chain.public_pem(signer.public_key))
    return str(path)


def run(*args: str) -> Result:
    result = CliRunner().invoke(usage, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def check(path: Path, extra: list[verify.Checkpoint] | None = None) -> verify.Result:
    recs, points, anchors, _ = verify.from_ledger_file(path)
    return verify.verify(recs, points + (extra or []), VERIFIER, anchors)


def kinds(result: verify.Result) -> set[str]:
    return {p.kind for p in result.problems}


def attacker(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS records_append_only")
    conn.execute("DROP TRIGGER IF EXISTS records_prune_only")
    return conn


# -- a ledger and its export (bug: --checkpoints added the export's records and each seq was seen twice) ---------
def test_an_untouched_ledger_verifies_with_its_own_export_as_checkpoints_or_as_records(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=4, checkpoint_at=(4,))
    events = write(tmp_path / "exported.jsonl", exported(ledger))
    ledger.close()
    db, pub = str(tmp_path / "usage.db"), public_key(tmp_path / "pub.pem")
    documented = run("verify", "--ledger", db, "--public-key", pub, "--checkpoints", events)
    assert documented.exit_code == 0, documented.output
    both = run("verify", "--ledger", db, "--export", events, "--public-key", pub, "-o", "json")
    assert both.exit_code == 0, both.output
    (summary,) = json.loads(both.output)["ledgers"].values()
    assert (summary["records"], summary["head_seq"], summary["checkpoints"]) == (4, 4, 1)  # each counted once
    copies = run("verify", "--ledger", db, "--ledger", db, "--public-key", pub)  # a copy and the live file
    assert copies.exit_code == 0, copies.output


def test_a_record_that_differs_between_the_ledger_and_its_export_is_a_conflict(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=4, checkpoint_at=(4,))
    events = exported(ledger)
    ledger.close()
    data = {k: v for k, v in events[1]["data"].items() if k != "proof"} | {"outputTokens": 1}
    events[1]["data"] = data | {"proof": events[1]["data"]["proof"] | {"hash": chain.sha256_hex(chain.canonical(data))}}
    result = run("verify", "--ledger", str(tmp_path / "usage.db"), "--export", write(tmp_path / "e.jsonl", events),
                 "--public-key", public_key(tmp_path / "pub.pem"), "-o", "json")
    assert result.exit_code == 1
    assert [(p["kind"], p["seq"]) for p in json.loads(result.output)["problems"]] == [("conflict", 2)]


def test_a_ledger_cut_after_its_last_local_checkpoint_shows_with_the_exported_checkpoints(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=8, checkpoint_at=(4, 8))
    events = write(tmp_path / "exported.jsonl", exported(ledger))
    ledger.close()
    conn = attacker(tmp_path / "usage.db")
    conn.execute("DELETE FROM records WHERE seq > 5")
    conn.execute("DELETE FROM checkpoints WHERE seq > 5")
    conn.close()
    args = ["verify", "--ledger", str(tmp_path / "usage.db"), "--public-key", public_key(tmp_path / "pub.pem")]
    assert run(*args).exit_code == 0  # locally nothing shows
    cut = run(*args, "--checkpoints", events, "-o", "json")
    assert {p["kind"] for p in json.loads(cut.output)["problems"]} == {"truncated"}


# -- pruned ledgers (bugs: a fully pruned ledger was `truncated`; an unsigned anchor was trusted) ----------------
def test_a_fully_pruned_ledger_verifies_and_starts_from_its_anchor(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=3, checkpoint_at=(3,))
    ledger.mark_exported(3, [3])
    assert ledger.prune(1.0, now=PRUNE_NOW) == 3  # an idle pod past retention: every record exported and pruned
    ledger.close()
    result = check(tmp_path / "usage.db")
    assert result.ok, result.problems
    (summary,) = result.ledgers.values()
    assert (summary.records, summary.head_seq, summary.pruned_seq, summary.last_checkpoint_seq) == (0, 3, 3, 3)
    text = run("verify", "--ledger", str(tmp_path / "usage.db"), "--public-key", public_key(tmp_path / "pub.pem"))
    assert text.exit_code == 0, text.output
    assert "no records, pruned up to 3, 1 checkpoints" in text.output


def test_a_pruned_ledger_with_its_full_export_verifies_as_one(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=6, checkpoint_at=(3, 6))
    events = write(tmp_path / "exported.jsonl", exported(ledger))
    ledger.mark_exported(6, [3, 6])
    assert ledger.prune(1.0, now=PRUNE_NOW) == 6
    with ledger.transaction():  # traffic again after the prune
        ledger.append([records.request_record(request("late"), CTX, None, "gpm")])
    ledger.close()
    result = run("verify", "--ledger", str(tmp_path / "usage.db"), "--export", events,
                 "--public-key", public_key(tmp_path / "pub.pem"), "-o", "json")
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.output)["ledgers"].values()
    assert (summary["records"], summary["first_seq"], summary["head_seq"], summary["pruned_seq"]) == (7, 1, 7, 6)


def test_records_deleted_behind_a_fake_pruning_anchor_are_reported(tmp_path: Path) -> None:
    make_ledger(tmp_path / "usage.db", count=6, checkpoint_at=(6,)).close()  # nothing exported, no checkpoint at 3
    conn = attacker(tmp_path / "usage.db")
    h3 = conn.execute("SELECT hash FROM records WHERE seq = 3").fetchone()[0]
    conn.execute("DELETE FROM records WHERE seq <= 3")
    conn.execute("INSERT INTO meta VALUES ('pruned_seq', '3'), ('pruned_hash', ?)", (h3,))
    conn.close()
    result = check(tmp_path / "usage.db")
    assert [(p.kind, p.seq) for p in result.problems] == [("deleted", 3)]
    assert "records 1..3 are missing" in result.problems[0].message
    assert "pruning anchor" in result.problems[0].message


def test_a_pruning_anchor_needs_a_signed_checkpoint_at_its_seq_and_hash(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=6, checkpoint_at=(3, 6))
    published = write(tmp_path / "exported.jsonl", exported(ledger))
    ledger.mark_exported(4, [3])
    assert ledger.prune(1.0, now=PRUNE_NOW) == 3
    ledger.close()
    assert check(tmp_path / "usage.db").ok
    conn = attacker(tmp_path / "usage.db")
    conn.execute("DELETE FROM checkpoints WHERE seq = 3")  # the local proof of the prune is gone...
    conn.close()
    assert kinds(check(tmp_path / "usage.db")) == {"deleted"}
    args = ["verify", "--ledger", str(tmp_path / "usage.db"), "--public-key", public_key(tmp_path / "pub.pem")]
    assert run(*args, "--checkpoints", published).exit_code == 0  # ...the published checkpoint proves it again
    conn = attacker(tmp_path / "usage.db")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'pruned_hash'", ("0" * 64,))
    conn.close()
    wrong = run(*args, "--checkpoints", published, "-o", "json")
    assert {(p["kind"], p["seq"]) for p in json.loads(wrong.output)["problems"]} >= {("deleted", 3)}


# -- keys (bug: one --public-key only, old-key records were bad-signature, unknown-key never produced) ----------
def test_an_export_across_a_key_change_verifies_with_both_keys(tmp_path: Path) -> None:
    old, new = chain.Signer(chain.generate_key()), chain.Signer(chain.generate_key())
    first = make_ledger(tmp_path / f"usage.{old.key_id}.db", count=2, checkpoint_at=(2,), signer=old)
    second = make_ledger(tmp_path / "usage.db", count=2, checkpoint_at=(2,), signer=new)
    events = exported(first) + exported(second)
    first.close()
    second.close()
    stream = write(tmp_path / "exported.jsonl", events)
    old_pem, new_pem = public_key(tmp_path / "old.pem", old), public_key(tmp_path / "new.pem", new)
    both = run("verify", "--export", stream, "--public-key", old_pem, "--public-key", new_pem)
    assert both.exit_code == 0, both.output
    only_new = run("verify", "--export", stream, "--public-key", new_pem, "-o", "json")
    problems = json.loads(only_new.output)["problems"]
    assert {p["kind"] for p in problems} == {"unknown-key"}
    assert len(problems) == 3  # 2 records, 1 checkpoint
    assert all(old.key_id in p["message"] for p in problems)
    embedded = run("verify", "--ledger", str(tmp_path / f"usage.{old.key_id}.db"), "--ledger",
                   str(tmp_path / "usage.db"), "--trust-embedded-key")
    assert embedded.exit_code == 0, embedded.output


def test_a_record_naming_a_trusted_key_it_was_not_signed_with_is_a_bad_signature(tmp_path: Path) -> None:
    old, new = chain.Signer(chain.generate_key()), chain.Signer(chain.generate_key())
    ledger = make_ledger(tmp_path / "usage.db", count=2, checkpoint_at=(2,), signer=old)
    events = exported(ledger)
    ledger.close()
    events[0]["data"]["proof"]["keyId"] = new.key_id
    recs, points = verify.from_events(events)
    result = verify.verify(recs, points, [chain.Verifier(old.public_key), chain.Verifier(new.public_key)])
    assert [(p.kind, p.seq) for p in result.problems] == [("bad-signature", 1)]


# -- bad input: an error naming the option (and the event and field), never a traceback -----------------------
@pytest.mark.parametrize(("events", "named"), [
    ([1, 2], "event 1: expected a CloudEvent (a JSON object), got a number"),
    ([{"type": "io.tensorfleet.usage.request.v1", "id": "a", "data": "text"}], "event 1 (id 'a'): 'data' must be"),
    ([{"type": "io.tensorfleet.usage.request.v1", "id": "a", "data": {"seq": 1, "proof": "x"}}],
     "'data.proof' must be a JSON object, got a string"),
])
@pytest.mark.parametrize("option", ["--export", "--checkpoints"])
def test_events_not_shaped_as_exported_are_an_error_naming_the_file_and_event(tmp_path: Path, events: list,
                                                                                named: str, option: str) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=1, checkpoint_at=())
    ledger.close()
    path = write(tmp_path / "bad.json", events)
    result = run("verify", "--ledger", str(tmp_path / "usage.db"), option, path, "--trust-embedded-key")
    assert result.exit_code == 2
    assert f"Invalid value for {option}: {path}: " in result.output
    assert named in result.output
    if option == "--export":
        assert run("report", option, path).exit_code == 2


@pytest.mark.parametrize(("args", "named"), [
    (["--since", "yesterday"], "Invalid value for --since: 'yesterday'"),
    (["--until", "2026-13-01"], "Invalid value for --until: '2026-13-01'"),
    (["--window", "1e12d", "--by", "window"], "--window"),
])
def test_report_time_options_are_named_in_their_errors(tmp_path: Path, args: list[str], named: str) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=1, checkpoint_at=())
    ledger.close()
    result = run("report", "--ledger", str(tmp_path / "usage.db"), *args)
    assert result.exit_code == 2
    assert named in result.output


def test_a_ledger_row_that_is_not_json_is_named_by_report_and_a_bad_embedded_key_by_verify(tmp_path: Path) -> None:
    make_ledger(tmp_path / "usage.db", count=2, checkpoint_at=()).close()
    conn = attacker(tmp_path / "usage.db")
    conn.execute("UPDATE records SET body = 'not json' WHERE seq = 2")
    conn.execute("UPDATE meta SET value = 'AAAA' WHERE key = 'public_key'")
    conn.close()
    report = run("report", "--ledger", str(tmp_path / "usage.db"))
    assert report.exit_code == 1
    assert "ledger row 2 is not a JSON object" in report.output
    verified = run("verify", "--ledger", str(tmp_path / "usage.db"), "--trust-embedded-key")
    assert verified.exit_code == 2
    assert "Invalid value for --ledger" in verified.output
    assert "embedded public key" in verified.output


def test_json_nested_too_deeply_is_named_not_a_recursion_error(tmp_path: Path) -> None:
    """A corrupt or hostile export, or ledger row, nested beyond the parser's depth was a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    export_file = tmp_path / "deep.json"
    export_file.write_text(deep)
    for command in (["verify", "--trust-embedded-key"], ["report"]):
        result = run(*command, "--export", str(export_file))
        assert result.exit_code == 2
        assert (f"Invalid value for --export: {export_file}: not CloudEvents JSON: line 1: not JSON "
                "(JSON nested too deeply)") in result.output
    make_ledger(tmp_path / "usage.db", count=2, checkpoint_at=()).close()
    conn = attacker(tmp_path / "usage.db")
    conn.execute("UPDATE records SET body = ? WHERE seq = 2", (deep,))
    conn.close()
    report = run("report", "--ledger", str(tmp_path / "usage.db"))
    assert (report.exit_code, report.output) == (1, "Error: ledger row 2 is not a JSON object; run `tensorfleet "
                                                    "usage verify` on it\n")
    verified = run("verify", "--ledger", str(tmp_path / "usage.db"), "--trust-embedded-key")
    assert verified.exit_code == 1
    assert "malformed" in verified.output


# -- the evidence is read, never written (bug: verify folded a copied WAL into usage.db and deleted it) -----------
def copied_live_ledger(tmp_path: Path) -> Path:
    """usage.db and usage.db-wal as `kubectl cp` takes them from a running pod (the ledger still open)."""
    live = make_ledger(tmp_path / "usage.db", count=5, checkpoint_at=(5,))
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    for name in ("usage.db", "usage.db-wal"):
        shutil.copy(tmp_path / name, evidence / name)
    live.close()
    return evidence


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_verify_leaves_a_copied_ledger_and_its_wal_as_they_were(tmp_path: Path) -> None:
    evidence = copied_live_ledger(tmp_path)
    before = digests(evidence)
    result = run("verify", "--ledger", str(evidence / "usage.db"), "--public-key", public_key(tmp_path / "p.pem"))
    assert result.exit_code == 0, result.output
    assert "records 1..5 (5)" in result.output  # the records only in the WAL are read too
    assert digests(evidence) == before


def test_a_live_ledger_is_read_beside_its_writer_without_checkpointing_it(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "usage.db", count=3, checkpoint_at=(3,))
    before = digests(tmp_path)
    assert not check(tmp_path / "usage.db").problems
    after = digests(tmp_path)
    assert (after["usage.db"], after["usage.db-wal"]) == (before["usage.db"], before["usage.db-wal"])
    ledger.close()


@pytest.mark.parametrize("live", [True, False], ids=["live", "copied"])
def test_a_ledger_named_through_a_symlink_is_read_with_its_wal(tmp_path: Path, live: bool) -> None:
    """latest.db -> usage.db: the -wal and -shm were looked for beside the link, so the records only in the WAL
    were left out: report billed part of them and verify said OK on what was left."""
    ledger = make_ledger(tmp_path / "usage.db", count=5, checkpoint_at=(5,)) if live else None
    folder = tmp_path if live else copied_live_ledger(tmp_path)
    link = tmp_path / "latest.db"
    link.symlink_to(folder / "usage.db")
    key = public_key(tmp_path / "p.pem")
    for command in (["verify", "--public-key", key], ["report", "--output", "json"]):
        direct, linked = (run(*command, "--ledger", str(path)) for path in (folder / "usage.db", link))
        assert (linked.exit_code, linked.output) == (direct.exit_code, direct.output)
    assert "records 1..5 (5)" in run("verify", "--public-key", key, "--ledger", str(link)).output
    if ledger:
        ledger.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as another user")
def test_verify_reads_a_ledger_copy_it_may_not_write(tmp_path: Path) -> None:
    """A copy owned by another user (a forensic mount) was 'not a usage ledger (unable to open database file)'."""
    copied = copied_live_ledger(tmp_path)
    with tempfile.TemporaryDirectory() as reachable:  # pytest's tmp_path is 0700: user nobody cannot reach it
        evidence = Path(reachable) / "evidence"
        shutil.copytree(copied, evidence)
        public_key(evidence / "p.pem")
        for path in (Path(reachable), evidence, *evidence.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        result = _verify_as_nobody(evidence)
    assert result.returncode == 0, result.stderr
    assert "OK: every record verifies" in result.stdout


def _verify_as_nobody(evidence: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from tensorfleet.metering.cli import usage; "
            f"usage(['verify', '--ledger', {str(evidence / 'usage.db')!r}, '--public-key', "
            f"{str(evidence / 'p.pem')!r}])")
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True, env={**os.environ, "HOME": "/"}, check=False)



def test_a_bad_line_of_an_export_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    """Each line was parsed alone, so every error said 'line 1 column 2 (char 1)', whatever the line."""
    export_file = write(tmp_path / "e.jsonl", exported(make_ledger(tmp_path / "usage.db", 3, (3,))))
    lines = Path(export_file).read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], "", lines[1], '{"broken', *lines[2:]]) + "\n")
    result = run("verify", "--export", str(broken), "--trust-embedded-key")
    assert result.exit_code == 2
    assert f"{broken}: not CloudEvents JSON: line 4: not JSON (Unterminated string starting at: column 2)" \
        in result.output, result.output
