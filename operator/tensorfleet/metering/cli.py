"""``tensorfleet usage``: verify ledgers and exports, report usage, make a signing key."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from tensorfleet import cli_files
from tensorfleet.metering import chain, report, verify


@click.group()
def usage() -> None:
    """Verify, report on and sign usage records (the metering ledger and its exports)."""


@dataclasses.dataclass
class Sources:
    """What the files on the command line hold: records, checkpoints, pruning anchors and embedded keys."""

    records: list[verify.Record] = dataclasses.field(default_factory=list)
    checkpoints: list[verify.Checkpoint] = dataclasses.field(default_factory=list)
    anchors: dict[str, verify.Anchor] = dataclasses.field(default_factory=dict)
    embedded_keys: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (ledger file, base64 key)


def _sources(ledgers: tuple[str, ...], exports: tuple[str, ...], checkpoint_files: tuple[str, ...] = ()) -> Sources:
    """Ledger files and exports give records and checkpoints; ``checkpoint_files`` only their checkpoints."""
    if not ledgers and not exports:
        raise click.UsageError("give at least one --ledger FILE or --export FILE")
    sources = Sources()
    for path in ledgers:
        try:
            more, points, anchor, key = verify.from_ledger_file(path)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--ledger") from None
        except Exception as exc:  # sqlite3.DatabaseError: not a ledger
            raise click.BadParameter(f"{path}: not a usage ledger ({exc})", param_hint="--ledger") from None
        sources.records += more
        sources.checkpoints += points
        sources.anchors.update(anchor)
        sources.embedded_keys.append((path, key))
    for option, paths in (("--export", exports), ("--checkpoints", checkpoint_files)):
        for path in paths:
            more, points = _read_export(path, option)
            sources.records += more if option == "--export" else []
            sources.checkpoints += points
    return sources


def _read_export(path: str, option: str) -> tuple[list[verify.Record], list[verify.Checkpoint]]:
    try:
        events = verify.parse_events(cli_files.read_text(path, option))
    except ValueError as exc:
        raise click.BadParameter(f"{path}: not CloudEvents JSON: {exc}", param_hint=option) from None
    try:
        return verify.from_events(events)
    except ValueError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint=option) from None


def _trusted_keys(public_keys: tuple[str, ...], trust_embedded_key: bool,
                  embedded: list[tuple[str, str]]) -> list[chain.Verifier]:
    if public_keys:
        verifiers = []
        for path in public_keys:
            try:
                verifiers.append(chain.Verifier(chain.load_public_key(path)))
            except (OSError, ValueError) as exc:
                raise click.BadParameter(str(exc), param_hint="--public-key") from None
        return verifiers
    if trust_embedded_key and any(key for _, key in embedded):
        verifiers = []
        for path, key in embedded:
            try:
                verifiers.append(chain.Verifier(chain.public_key_from_b64(key)))
            except ValueError as exc:
                raise click.BadParameter(f"{path}: its embedded public key is not an Ed25519 key ({exc})",
                                         param_hint="--ledger") from None
        return verifiers
    raise click.UsageError("--public-key is required (or --trust-embedded-key with --ledger)")


@usage.command("verify")
@click.option("--ledger", "ledgers", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A pod's ledger file (usage.db); repeatable.")
@click.option("--export", "exports", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Exported CloudEvents (JSON or JSON lines), records and checkpoints; repeatable. With --ledger, "
                   "a record in both must be the same.")
@click.option("--checkpoints", "checkpoint_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Exported CloudEvents to take only the signed checkpoints from (to detect a cut-off tail of "
                   "--ledger, or prove its pruning); repeatable.")
@click.option("--public-key", "public_keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An Ed25519 public key (PEM) to trust; repeatable (a ledger set aside at a key change, an export "
                   "spanning one). Each record is checked with the key its proof names.")
@click.option("--trust-embedded-key", is_flag=True,
              help="Use the keys stored in the ledgers themselves: proves integrity, not who signed.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def verify_command(ledgers: tuple[str, ...], exports: tuple[str, ...], checkpoint_files: tuple[str, ...],
                   public_keys: tuple[str, ...], trust_embedded_key: bool, output: str) -> None:
    """Check that no record was edited, deleted, reordered, inserted or cut off. Exit 1 on any problem."""
    sources = _sources(ledgers, exports, checkpoint_files)
    keys = _trusted_keys(public_keys, trust_embedded_key, sources.embedded_keys)
    result = verify.verify(sources.records, sources.checkpoints, keys, sources.anchors)
    if output == "json":
        click.echo(json.dumps({"ok": result.ok, "ledgers": {k: vars(v) for k, v in result.ledgers.items()},
                               "problems": [vars(p) for p in result.problems], "warnings": result.warnings},
                              indent=2))
    else:
        for ledger, summary in result.ledgers.items():
            present = (f"records {summary.first_seq}..{summary.head_seq} ({summary.records})" if summary.records
                       else "no records")
            pruned = f", pruned up to {summary.pruned_seq}" if summary.pruned_seq else ""
            click.echo(f"ledger {ledger}: {present}{pruned}, {summary.checkpoints} checkpoints, "
                       f"last at {summary.last_checkpoint_seq}")
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        for problem in result.problems:
            click.echo(f"PROBLEM {problem.kind}: ledger {problem.ledger} seq {problem.seq}: {problem.message}")
        click.echo("OK: every record verifies" if result.ok else f"FAILED: {len(result.problems)} problems")
    sys.exit(0 if result.ok else 1)


@usage.command("report")
@click.option("--ledger", "ledgers", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A pod's ledger file (usage.db); repeatable.")
@click.option("--export", "exports", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Exported CloudEvents (JSON or JSON lines); repeatable.")
@click.option("--by", default="tenant,model,tier", show_default=True,
              help=f"Group by these, comma-separated: {', '.join(report.GROUP_KEYS)}.")
@click.option("--window", default="1h", show_default=True, help="Window size for --by window and the chart.")
@click.option("--since", help="Only records at or after this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="Only records before this time.")
@click.option("-o", "--output", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--chart", type=click.Path(dir_okay=False), help="Also write a PNG of RU over time per tenant.")
def report_command(ledgers: tuple[str, ...], exports: tuple[str, ...], by: str, window: str, since: str | None,
                   until: str | None, output: str, chart: str | None) -> None:
    """Totals of tokens, GPU-ms, resource units and cost per tenant, model, tier and time window."""
    try:
        size = report.parse_window(window)
    except ValueError as exc:  # its message names --window and the limit
        raise click.UsageError(str(exc)) from None
    start, end = _time_range(since, until)
    if chart:
        cli_files.check_writable(chart, "--chart")
    records = _sources(ledgers, exports).records
    bodies = _unique_bodies(records)
    try:
        selected = report.billable(bodies, start, end)
        rows = report.aggregate(selected, [k.strip() for k in by.split(",") if k.strip()], size)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(report.render(rows, output), nl=False)
    if chart:
        try:
            with cli_files.naming("--chart", chart):
                report.chart(selected, size, chart)
        except ImportError:
            raise click.ClickException("--chart needs matplotlib: pip install 'tensorfleet[plots]'") from None
        click.echo(f"chart written to {chart}", err=True)


def _time_range(since: str | None, until: str | None) -> tuple[datetime.datetime | None, datetime.datetime | None]:
    start, end = _time_option("--since", since), _time_option("--until", until)
    if start and end and start >= end:  # a swapped pair would select nothing and read as a zero bill
        raise click.BadParameter(f"{_utc(start)} must be before --until {_utc(end)}", param_hint="--since")
    return start, end


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _time_option(option: str, value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return report.parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected an ISO 8601 time such as 2026-11-21T13:00:00Z ({exc})",
                                 param_hint=option) from None


def _unique_bodies(records: list[verify.Record]) -> list[dict[str, Any]]:
    """Record bodies, once each (exports are at-least-once)."""
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        try:
            body = chain.parse(record.body_text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            where = f"ledger row {record.position}" if record.position is not None else "an exported record"
            raise click.ClickException(f"{where} is not a JSON object; run `tensorfleet usage verify` on it")
        seen.setdefault(str(body.get("id")), body)
    return list(seen.values())


@usage.command("keygen")
@click.option("--private-key", required=True, type=click.Path(dir_okay=False),
              help="Where to write the Ed25519 private key (PEM); it must not exist.")
@click.option("--public-key", required=True, type=click.Path(dir_okay=False),
              help="Where to write the public key (PEM) that verifiers use.")
def keygen_command(private_key: str, public_key: str) -> None:
    """Make a signing key pair for the metering Secret."""
    _check_key_paths(private_key, public_key)
    key = chain.generate_key()
    _write_all([("--private-key", Path(private_key), chain.private_pem(key), 0o600),
                ("--public-key", Path(public_key), chain.public_pem(key.public_key()), 0o644)])
    click.echo(f"key id {chain.key_id(key.public_key())}; create the Secret in each serving namespace with\n"
               f"  kubectl -n NAMESPACE create secret generic tensorfleet-metering "
               f"--from-file=signing-key={private_key}")


def _check_key_paths(private_key: str, public_key: str) -> None:
    """Both paths new, in existing folders, and not the same file (the public key would replace the private one)."""
    private, public = Path(private_key), Path(public_key)
    if private.resolve() == public.resolve() or (private.exists() and public.exists()
                                                 and os.path.samefile(private, public)):
        raise click.BadParameter(f"{public_key}: must differ from --private-key", param_hint="--public-key")
    for flag, path in (("--private-key", private), ("--public-key", public)):
        if path.exists() or path.is_symlink():
            raise click.BadParameter(f"{path} exists; refusing to overwrite a key", param_hint=flag)
        cli_files.check_writable(str(path), flag)


def _write_all(files: list[tuple[str, Path, bytes, int]]) -> None:
    """Write every (flag, path, content, mode) or none: each goes to a temporary file beside its target first,
    and a failure or Ctrl-C before the last is in place removes what was written."""
    written: list[Path] = []  # temporary files, then the targets they became
    try:
        temporaries = [_write_temporary(flag, path, content, mode, written) for flag, path, content, mode in files]
        for (flag, path, _, _), temporary in zip(files, temporaries, strict=True):
            with cli_files.naming(flag, path):
                os.replace(temporary, path)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _write_temporary(flag: str, path: Path, content: bytes, mode: int, written: list[Path]) -> Path:
    with cli_files.naming(flag, path):
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)  # O_EXCL, 0600
        written.append(Path(name))
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(name)
