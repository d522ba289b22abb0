"""Files named on the command line: a missing, unreadable, non-UTF-8 or unwritable one is one line naming the
flag and the path (``Invalid value for --trace: t.csv: No such file or directory``), never a traceback.

Commands check output paths before long work (``check_writable``), so a typo does not cost the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of the file ``flag`` names; ``-`` reads standard input."""
    with naming(flag, path):
        try:
            with click.open_file(path, encoding="utf-8") as stream:
                return str(stream.read())
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})",
                                     param_hint=flag) from None


def check_writable(path: str, flag: str) -> None:
    """That ``path`` can be written: not a folder, in an existing folder this process may write to."""
    target = Path(path)
    folder = target.resolve().parent
    if target.is_dir():
        raise click.BadParameter(f"{path}: is a folder", param_hint=flag)
    if not folder.is_dir():
        raise click.BadParameter(f"{path}: no such folder {target.parent}", param_hint=flag)
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise click.BadParameter(f"{path}: permission denied", param_hint=flag)


@contextlib.contextmanager
def naming(flag: str, path: str | Path) -> Iterator[None]:
    """An ``OSError`` inside as the usage error of ``flag`` (``Invalid value for FLAG: PATH: No space left``)."""
    try:
        yield
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror or exc}", param_hint=flag) from None
