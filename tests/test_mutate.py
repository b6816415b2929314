"""tools/mutate.py's own logic on a toy source: which mutants it makes, that each is valid Python differing from the
original in one place, what it leaves alone, and that a run reports a killed and a surviving mutant."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import mutate  # noqa: E402

TOY = '''"""A docstring: 1 < 2 is left alone."""
from __future__ import annotations


def f(x: int = 0, flag: bool = True) -> float:
    """Also left alone: a + b."""
    if not flag and x < 3:
        x += 1
    y = -x * 2.5
    print(f"{x + 1}", end="")
    return y if x in (1, 2) else None
'''


def test_the_operators_on_a_toy_source():
    found = mutate.mutants(TOY, "toy.py")
    ops = {(m.line, m.op) for m in found}
    expected = {(5, "0 -> 1"), (5, "True -> False"), (7, "drop not"), (7, "And -> Or"), (7, "Lt -> LtE"),
                (7, "3 -> 4"), (8, "1 -> 0"), (8, "remove augassign"), (9, "drop unary -"), (9, "Mult -> Div"),
                (9, "2.5 -> 5.0"), (9, "remove assign"), (10, "drop keyword end="), (10, "remove expr"),
                (11, "In -> NotIn"), (11, "return None"), (11, "1 -> 0"), (11, "2 -> 3")}
    assert expected <= ops, expected - ops
    assert all(m.line >= 5 for m in found), "docstrings and the __future__ import are left alone"
    assert not any(m.line == 10 and m.op == "Add -> Sub" for m in found), "f-strings are left alone"
    assert not any(m.line == 5 and m.op.startswith("drop") for m in found), "annotations are left alone"
    assert [m.index for m in found] == list(range(len(found)))
    for m in found:
        mutated = m.apply(TOY)
        ast.parse(mutated)  # valid Python
        assert mutated != TOY
        diff = m.diff(TOY)
        changed = [line[0] for line in diff.splitlines()[3:]]
        assert changed == ["-", "+"], diff  # one line changed


def test_lines_keep_the_whole_file_numbering():
    every = mutate.mutants(TOY, "toy.py")
    some = mutate.mutants(TOY, "toy.py", lines=(9, 9))
    assert some and {m.line for m in some} == {9}
    assert [m.key for m in some] == [m.key for m in every if m.line == 9]
    assert [m.index for m in some] == [m.index for m in every if m.line == 9]


def test_a_run_reports_killed_and_survived_and_equivalent(tmp_path):
    """A toy repository: one test catches `<` -> `<=` in `smaller`, nothing checks `2 * x`."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tools" / "mutate.py").write_text(Path(mutate.__file__).read_text())
    (tmp_path / "m.py").write_text("def smaller(a, b):\n    return a < b\n\n\ndef double(x):\n    return 2 * x\n")
    (tmp_path / "tests" / "test_m.py").write_text(
        "import m\n\n\ndef test_smaller():\n    assert not m.smaller(1, 1)\n\n\ndef test_double_runs():\n"
        "    m.double(1)\n")
    (tmp_path / "tests" / "mutants_equivalent.md").write_text("- `m.py:6:11 2 -> 3`: a toy's equivalent\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "tools/mutate.py", "m.py", "--tests", "tests/test_m.py", "--timeout", "60",
                          "--report", str(report)], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    results = {r["key"]: r["outcome"] for r in json.loads(report.read_text())["results"]}
    assert results["m.py:2:11 Lt -> LtE"] == "killed"
    assert results["m.py:6:11 Mult -> Div"] == "survived"
    assert results["m.py:6:11 2 -> 3"] == "equivalent"
    assert "SURVIVED" in out and (tmp_path / "m.py").read_text().endswith("return 2 * x\n")  # the original kept


@pytest.mark.parametrize("text, lines", [("12-30", (12, 30)), ("7", (7, 7)), (None, None)])
def test_parse_lines(text, lines):
    assert mutate.parse_lines(text) == lines
