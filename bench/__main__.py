"""`python -m bench` (make bench): run every benchmark module in bench/ that has a main()."""

from __future__ import annotations

import importlib
import pathlib
import sys


def main() -> int:
    status = 0
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{path.stem}")
        if callable(getattr(module, "main", None)):
            print(f"== bench.{path.stem}", flush=True)
            status = max(status, int(module.main() or 0))
    return status


if __name__ == "__main__":
    sys.exit(main())
