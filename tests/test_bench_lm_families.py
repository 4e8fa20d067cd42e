"""benchmarks/bench_lm_families.py at tiny shapes: every row runs, the transformed fused loss
equals the dense one it is measured against, and the packed rows give the same hidden states."""

import pytest
from _scripts import benchmark_module

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_lm_families")


def test_every_row_runs_and_the_rows_agree(bench, monkeypatch, one_thread):
    monkeypatch.setattr(bench, "N", 64)
    monkeypatch.setattr(bench, "V", 500)
    monkeypatch.setattr(bench, "LENGTH", 64)
    loss = {row: bench.run_row("loss", row, 0, 1) for row in bench.LOSS_ROWS}
    assert loss["kdkit softcap"]["value"] == pytest.approx(loss["dense softcap"]["value"], rel=1e-5)
    assert loss["kdkit none"]["value"] != pytest.approx(loss["kdkit softcap"]["value"], rel=1e-3)
    packed = {row: bench.run_row("pack", row, 2, 1) for row in bench.PACK_ROWS}
    values = [packed[row]["value"] for row in bench.PACK_ROWS[1:]]
    assert values == pytest.approx([values[0]] * len(values), rel=1e-6)
    assert packed["packed after"]["mask_mb"] == 0 and packed["packed before"]["mask_mb"] > 0
