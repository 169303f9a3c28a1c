"""``python -m swinlab data optimize|bench``: image folders to LitData shards (:mod:`swinlab.tools.shards`), and
the training input pipeline's images/s (:mod:`swinlab.tools.databench`)."""
from __future__ import annotations

import sys
from typing import List, Optional

from ..errors import ConfigError

USAGE = "python -m swinlab data optimize|bench ... (--help for either)"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    if argv[0] == "optimize":
        from .shards import optimize_main
        return optimize_main(argv[1:])
    if argv[0] == "bench":
        from .databench import main as bench_main
        return bench_main(argv[1:])
    raise ConfigError(f"unknown data command {argv[0]!r}: use {USAGE}")
