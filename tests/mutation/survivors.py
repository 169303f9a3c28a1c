"""Survivors of a mutmut run that nobody has judged yet.

    cd <worktree> && /work/main/.venv/bin/mutmut results | python tests/mutation/survivors.py

reads ``mutmut results`` (one ``name: status`` line per mutant that did not die) and prints the survived mutants that
``tests/mutation/harmless.tsv`` does not list, one per line; exit 1 when there are any. A row there names a function
(``Class.method`` for methods) and its mutant numbers at the commit it was judged.
"""
from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

TABLE = Path(__file__).with_name("harmless.tsv")


def mutmut_key(module: str, function: str, number: int) -> str:
    """mutmut 3's mutant name: ``mod.x_func__mutmut_N``, or ``mod.xǁClassǁmethod__mutmut_N`` for a method."""
    if "." in function:
        cls, method = function.split(".", 1)
        return f"{module}.xǁ{cls}ǁ{method}__mutmut_{number}"
    return f"{module}.x_{function}__mutmut_{number}"


def harmless() -> dict:
    rows = csv.DictReader((line for line in TABLE.read_text().splitlines() if not line.startswith("#")),
                          delimiter="\t")
    return {mutmut_key(r["module"], r["function"], int(n)): r for r in rows for n in r["mutants"].split(",")}


def main() -> int:
    known = harmless()
    open_ = [name for name, status in re.findall(r"^\s*(\S+): (\w[\w ]*)$", sys.stdin.read(), re.M)
             if status.strip() == "survived" and name not in known]
    print("\n".join(open_) if open_ else "every survivor is in tests/mutation/harmless.tsv")
    return 1 if open_ else 0


if __name__ == "__main__":
    sys.exit(main())
