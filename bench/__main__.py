"""``python -m bench``: run every benchmark module in bench/ that has a ``main()`` (make bench)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

for module in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])):
    loaded = importlib.import_module(f"bench.{module}")
    if callable(getattr(loaded, "main", None)):
        print(f"\n## bench.{module}\n")
        loaded.main([])
