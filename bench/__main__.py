"""Run benchmarks: `python -m bench` lists them, `python -m bench NAME [NAME ...]` runs them.

Each benchmark is a module in bench/ with a `main()`; it writes bench/results/NAME.json and prints
its figures. Run one with its own options as `python -m bench.NAME --help`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def main() -> None:
    names = sys.argv[1:]
    if not names:
        print("benchmarks:", " ".join(available()))
        print("run: python -m bench NAME [NAME ...]  (or python -m bench.NAME --help)")
        return
    for name in names:
        if name not in available():
            raise SystemExit(f"no benchmark {name!r}; available: {', '.join(available())}")
        print(f"== {name}")
        sys.argv = [f"bench.{name}"]
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
