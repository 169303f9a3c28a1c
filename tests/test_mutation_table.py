"""tests/mutation/harmless.tsv stays a table of real functions (docs/testing.md, "Mutation testing")."""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "mutation"))
import survivors  # noqa: E402


def test_every_judged_function_still_exists_unless_marked_removed():
    import csv
    rows = list(csv.DictReader((line for line in survivors.TABLE.read_text().splitlines()
                                if not line.startswith("#")), delimiter="\t"))
    assert rows
    missing = []
    for row in rows:
        assert row["verdict"] in {"equivalent", "unused-default", "message-only", "cpu-only", "pinned-torch",
                                  "cost-only", "dtype-only", "not-fast-testable", "removed"}, row
        assert row["reason"].strip() and all(n.isdigit() for n in row["mutants"].split(",")), row
        if row["verdict"] == "removed":
            continue
        owner = importlib.import_module(row["module"])
        for part in row["function"].split("."):
            owner = getattr(owner, part, None)
        if owner is None:
            missing.append(f"{row['module']}.{row['function']}")
    assert not missing, f"rows name functions that are gone (mark them removed or re-judge): {missing}"


def test_survivors_lists_only_the_unjudged(capsys, monkeypatch):
    import io
    judged = survivors.mutmut_key("swinlab.models.swin", "SwinBlock.__init__", 48)
    fresh = survivors.mutmut_key("swinlab.models.swin", "SwinBlock.__init__", 4999)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"    {judged}: survived\n    {fresh}: survived\n"
                                                  f"    {fresh}x: timeout\n"))
    assert survivors.main() == 1
    assert capsys.readouterr().out.split() == [fresh]
