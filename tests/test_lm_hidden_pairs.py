"""Hidden-state distillation between decoder layers (``distill.pairs`` in a ``task: lm``
config), as DistillKit users know it: the pair loss is the reference's on the trained tokens,
a learned projection joins different widths and trains, checkpoints carry it, and a pair the
models cannot run is a one-line error."""

from __future__ import annotations

import pytest
import torch
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401
from test_lm_habits import _config, _write, lm_root  # noqa: F401

from kdkit.cli import main
from kdkit.errors import KDError
from kdkit.lm import Aligner, LMTask, TokenRow
from kdkit.lm.hidden import LayerPair


def _batch():
    rows = [TokenRow.of(list(range(5, 25)), [False] * 8 + [True] * 12) for _ in range(2)]
    return Aligner(pad_id=0, max_length=32)(rows)


def test_the_pair_loss_is_the_projected_mse_of_the_layers_outputs():
    student = tiny_llama(seed=3, hidden_size=16, intermediate_size=32).train()
    teacher = tiny_llama(seed=1)
    plain = LMTask(student, teacher, probe=False)
    pairs = [LayerPair(0, 0), LayerPair(0, 1, weight=0.5, loss="cosine")]
    task = LMTask(student, teacher, probe=False, layer_pairs=pairs)
    batch = _batch()
    out, base = task.step(batch), plain.step(batch)
    s_hs = student(batch.input_ids, output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_hs = teacher(batch.input_ids, output_hidden_states=True).hidden_states
    m = batch.mask
    proj = task.hidden_pairs.proj
    mse = (proj[0](s_hs[1][m]) - t_hs[1][m]).pow(2).mean(-1).sum()
    cos = (1 - torch.cosine_similarity(proj[1](s_hs[1][m]), t_hs[2][m], dim=-1)).sum()
    torch.testing.assert_close(out.loss, base.loss + mse + 0.5 * cos, rtol=1e-5, atol=1e-5)
    expected = float((mse + 0.5 * cos).detach()) / int(m.sum())
    assert float(out.components["hidden"]) == pytest.approx(expected)
    out.loss.backward()
    assert proj[0].weight.grad.abs().sum() > 0  # the projection learns
    assert set(task.checkpoint_state()) == {"student", "adapters"}
    with pytest.raises(KDError, match="2 decoder layers"):
        LMTask(student, teacher, probe=False, layer_pairs=[LayerPair(0, 5)])


def test_kdkit_train_with_layer_pairs(lm_root, tmp_path, capsys):  # noqa: F811
    pairs = [{"student": 1, "teacher": 1}, {"student": 0, "teacher": 0, "loss": "cosine"}]
    run = tmp_path / "run"
    cfg = _config(lm_root, run_dir=str(run), distill={"pairs": pairs})
    assert main(["train", _write(tmp_path / "p.yaml", cfg), "--no-progress"]) == 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert set(state["adapters"]) == {"proj.0.weight", "proj.1.weight"}  # widths 16 -> 32
    assert state["history"][0]["loss_hidden"] > 0
    capsys.readouterr()
    bad = {
        "layer": ({"distill": {"pairs": [{"student": 7, "teacher": 0}]}}, "decoder layers"),
        "cache": ({"teacher": {"model": f"cache:{tmp_path}"}, "distill": {"pairs": pairs}},
                  "live PyTorch teacher"),
    }  # fmt: skip
    for name, (change, words) in bad.items():
        path = _write(tmp_path / "bad.yaml", {**cfg, **change, "run_dir": str(tmp_path / name)})
        assert main(["train", path]) == 2, name
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kdkit")]
        assert len(err) == 1 and words in err[0], (name, err)
    assert yaml.safe_load((run / "config.yaml").read_text())["distill"]["pairs"][1]["loss"] == (
        "cosine"
    )
