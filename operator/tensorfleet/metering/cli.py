"""``tensorfleet usage``: verify ledgers and exports, report usage, make a signing key."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tensorfleet.metering import chain, report, verify


@click.group()
def usage() -> None:
    """Verify, report on and sign usage records (the metering ledger and its exports)."""


def _sources(ledgers: tuple[str, ...], exports: tuple[str, ...]) -> tuple[list[verify.Record],
                                                                         list[verify.Checkpoint],
                                                                         dict[str, verify.Anchor], list[str]]:
    if not ledgers and not exports:
        raise click.UsageError("give at least one --ledger FILE or --export FILE")
    records: list[verify.Record] = []
    checkpoints: list[verify.Checkpoint] = []
    anchors: dict[str, verify.Anchor] = {}
    embedded: list[str] = []
    for path in ledgers:
        try:
            more, points, anchor, key = verify.from_ledger_file(path)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--ledger") from None
        except Exception as exc:  # sqlite3.DatabaseError: not a ledger
            raise click.BadParameter(f"{path}: not a usage ledger ({exc})", param_hint="--ledger") from None
        records += more
        checkpoints += points
        anchors.update(anchor)
        embedded.append(key)
    for path in exports:
        try:
            more, points = verify.from_events(verify.read_events(path))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{path}: not CloudEvents JSON ({exc})", param_hint="--export") from None
        records += more
        checkpoints += points
    return records, checkpoints, anchors, embedded


@usage.command("verify")
@click.option("--ledger", "ledgers", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A pod's ledger file (usage.db); repeatable.")
@click.option("--export", "exports", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Exported CloudEvents (JSON or JSON lines), records and checkpoints; repeatable.")
@click.option("--checkpoints", "checkpoint_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoints published outside the pod (exported CloudEvents) to detect a cut-off tail.")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False),
              help="The Ed25519 public key (PEM) records must be signed with.")
@click.option("--trust-embedded-key", is_flag=True,
              help="Use the key stored in the ledger itself: proves integrity, not who signed.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def verify_command(ledgers: tuple[str, ...], exports: tuple[str, ...], checkpoint_files: tuple[str, ...],
                   public_key: str | None, trust_embedded_key: bool, output: str) -> None:
    """Check that no record was edited, deleted, reordered, inserted or cut off. Exit 1 on any problem."""
    records, checkpoints, anchors, embedded = _sources(ledgers, exports + checkpoint_files)
    if public_key:
        try:
            key = chain.load_public_key(public_key)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--public-key") from None
    elif trust_embedded_key and embedded and embedded[0]:
        key = chain.public_key_from_b64(embedded[0])
    else:
        raise click.UsageError("--public-key is required (or --trust-embedded-key with --ledger)")
    result = verify.verify(records, checkpoints, chain.Verifier(key), anchors)
    if output == "json":
        click.echo(json.dumps({"ok": result.ok, "ledgers": {k: vars(v) for k, v in result.ledgers.items()},
                               "problems": [vars(p) for p in result.problems], "warnings": result.warnings},
                              indent=2))
    else:
        for ledger, summary in result.ledgers.items():
            click.echo(f"ledger {ledger}: records {summary.first_seq}..{summary.head_seq} ({summary.records}), "
                       f"{summary.checkpoints} checkpoints, last at {summary.last_checkpoint_seq}")
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
    records, _, _, _ = _sources(ledgers, exports)
    try:
        size = report.parse_window(window)
        start = report.parse_time(since) if since else None
        end = report.parse_time(until) if until else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    bodies = _unique_bodies(records)
    try:
        selected = report.billable(bodies, start, end)
        rows = report.aggregate(selected, [k.strip() for k in by.split(",") if k.strip()], size)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(report.render(rows, output), nl=False)
    if chart:
        try:
            report.chart(selected, size, chart)
        except ImportError:
            raise click.ClickException("--chart needs matplotlib: pip install 'tensorfleet[plots]'") from None
        click.echo(f"chart written to {chart}", err=True)


def _unique_bodies(records: list[verify.Record]) -> list[dict[str, Any]]:
    """Record bodies, once each (exports are at-least-once)."""
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        body = json.loads(record.body_text)
        seen.setdefault(str(body.get("id")), body)
    return list(seen.values())


@usage.command("keygen")
@click.option("--private-key", required=True, type=click.Path(dir_okay=False),
              help="Where to write the Ed25519 private key (PEM); it must not exist.")
@click.option("--public-key", required=True, type=click.Path(dir_okay=False),
              help="Where to write the public key (PEM) that verifiers use.")
def keygen_command(private_key: str, public_key: str) -> None:
    """Make a signing key pair for the metering Secret."""
    for path in (private_key, public_key):
        if Path(path).exists():
            raise click.BadParameter(f"{path} exists; refusing to overwrite a key", param_hint="--private-key")
    key = chain.generate_key()
    Path(private_key).touch(mode=0o600)
    Path(private_key).write_bytes(chain.private_pem(key))
    Path(public_key).write_bytes(chain.public_pem(key.public_key()))
    click.echo(f"key id {chain.key_id(key.public_key())}; create the Secret in each serving namespace with\n"
               f"  kubectl -n NAMESPACE create secret generic tensorfleet-metering "
               f"--from-file=signing-key={private_key}")
