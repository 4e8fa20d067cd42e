"""Hostile inputs to the CLI's front door (issue 10): ``kdkit demo`` (refused before any data
loading or training), ``kdkit train`` and ``kdkit eval`` given files that are not theirs, and
commands that do not exist. Rows and verdicts: tests/_hostile/; this file also checks the
size of the whole table.
"""

from __future__ import annotations

import pytest
from _hostile import Case, cli_rows, judge_row, params, pwned, table

pytestmark = pytest.mark.usefixtures("one_thread")


def _demo(*extra):
    return ["demo", "--quick", "--no-progress", *extra]


CASES: list[Case] = cli_rows([
    # demo (refused before any data loading or training)
    Case("demo-out-under-a-file", lambda fx: _demo("--out", fx.a_file / "demo"), "is a file"),
    Case("demo-out-in-proc", lambda fx: _demo("--out", "/proc/kdkit-nope"), "cannot write"),
    Case("demo-n-labeled-negative", lambda fx: _demo("--n-labeled", "-5"), "n_labeled"),
    Case("demo-kd-epochs-zero", lambda fx: _demo("--kd-epochs", "0"), "kd_epochs"),
    Case("demo-temperature-zero", lambda fx: _demo("--temperature", "0"), "temperature"),
    Case("demo-temperature-nan", lambda fx: _demo("--temperature", "nan"), "temperature"),
    Case("demo-temperature-negative", lambda fx: _demo("--temperature", "-1"), "temperature"),
    # train / eval (their own tests cover more; these are the file-trust paths)
    Case("eval-markdown-as-checkpoint", lambda fx: ["eval", fx.markdown], "not a readable checkpoint"),
    Case("eval-missing-checkpoint", lambda fx: ["eval", fx.root / "nope.pt"], "no checkpoint"),
    Case("eval-pwned-checkpoint", lambda fx: ["eval", fx.pwned], "would import 'subprocess'|holds no run config", post=pwned),
    Case("train-missing-config", lambda fx: ["train", fx.root / "nope.yaml"], "no config file"),
    Case("train-markdown-as-config", lambda fx: ["train", fx.markdown], "config"),
    # the command itself
    Case("unknown-command", lambda fx: ["distill"], "invalid choice"),
    Case("no-command", lambda fx: [], "required"),
])  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_cli(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)


def test_the_table_is_large_enough():
    """Every room's rows together (tally files are merged by row id: ids are unique across
    rooms, not only within one)."""
    rows = [case for cases in table().values() for case in cases]
    assert len(rows) >= 270 and sum(c.cli for c in rows) >= 150
    assert len({c.id for c in rows}) == len(rows)
