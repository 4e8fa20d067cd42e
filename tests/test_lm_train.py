"""``task: lm`` end to end: kdkit train -> eval -> export --hf, and the loop's token
normalization (1x8 == 8x1), on a few KB of real text with tiny random Llamas."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _lm_fixtures import PARAGRAPH, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main
from kdkit.errors import KDError


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, lm_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("lmrun")
    teacher_dir, student_dir = root / "teacher", root / "student"
    tiny_llama(seed=1).save_pretrained(teacher_dir)
    lm_tokenizer.save_pretrained(teacher_dir)
    student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
    student.config.save_pretrained(student_dir)  # hf-config: random init from config.json
    lm_tokenizer.save_pretrained(student_dir)
    text = root / "corpus.txt"
    text.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:6000] + PARAGRAPH * 4)
    config = {
        "task": "lm",
        "name": "tiny-lm",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {
            "text_files": [str(text)],
            "val": {"split": 0.25},
            "max_length": 32,
            "pack": True,
            "batch_size": 4,
        },
        "distill": {"divergence": "fkl", "temperature": 2.0, "ce_weight": 0.1},
        "train": {"epochs": 2, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(root / "run"),
    }
    path = root / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path, config


def test_train_eval_export_roundtrip(lm_run, capsys):
    root, path, _ = lm_run
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "best val perplexity" in out
    run = root / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "report.md"):
        assert (run / name).is_file(), name
    assert "task: lm" in (run / "config.yaml").read_text()
    assert main(["eval", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "agree"} <= set(scores["student"]) and "ppl" in scores["teacher"]
    assert main(["export", str(run), "--hf", str(root / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(root / "hf"), local_files_only=True)
    state = torch.load(run / "best.pt", weights_only=True)["student"]
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert (root / "hf" / "tokenizer.json").is_file()


def test_resume_continues_to_identical_weights(lm_run, tmp_path):
    root, path, config = lm_run
    straight = {**config, "run_dir": str(tmp_path / "straight")}
    halves = {**config, "run_dir": str(tmp_path / "halves")}
    for cfg in (straight, halves):
        (tmp_path / f"{Path(cfg['run_dir']).name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "straight.yaml")]) == 0
    halves_yaml = str(tmp_path / "halves.yaml")
    assert main(["train", halves_yaml, "--set", "train.epochs=1"]) == 0
    # resume with the whole schedule: the config differs only in epochs, so start it anew
    # from the one-epoch run's last.pt through the library path
    from kdkit.config import load_config, resolve_paths
    from kdkit.run.lm_job import build_lm_trainer

    cfg = resolve_paths(load_config(halves_yaml))
    trainer, _ = build_lm_trainer(cfg, torch.device("cpu"))
    trainer.fit(resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["student"]
    b = trainer.task.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Recorder(torch.optim.Optimizer):
    """Records the gradients it would step with (the loop's normalized gradients)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = None

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def test_token_normalization_is_the_same_for_1x8_and_8x1():
    from kdkit.lm import Aligner, LMTask, TokenRow
    from kdkit.train.precision import Precision

    g = torch.Generator().manual_seed(0)
    rows = [
        TokenRow.of(torch.randint(0, 300, (n,), generator=g).tolist())
        for n in (9, 17, 5, 30, 12, 8, 21, 14)  # unequal lengths: per-batch means would differ
    ]
    collate = Aligner(pad_id=0, max_length=32)
    seen = []
    for micro in (1, 8):  # one batch of 8 rows, or 8 micro-batches of 1 row
        task = LMTask(tiny_llama(seed=2, hidden_size=16, intermediate_size=32), tiny_llama(seed=1))
        opt = _Recorder(task.parameters())
        precision = Precision("fp32", torch.device("cpu"), grad_accum=micro)
        size = len(rows) // micro
        for i in range(micro):
            out = task.step(collate(rows[i * size : (i + 1) * size]))
            precision.backward_step(out.loss, opt, list(task.parameters()), None, out.normalizer)
        seen.append(opt.seen)
    for a, b in zip(*seen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_config_with_an_unknown_divergence_is_one_line(lm_run, tmp_path, capsys):
    _, _, config = lm_run
    bad = {**config, "distill": {"divergence": "kll"}, "run_dir": str(tmp_path / "r")}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "distill.divergence" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_every_token_masked_is_a_clear_error():
    from kdkit.lm import LMTask, TokenRow
    from kdkit.lm.align import Aligner

    task = LMTask(tiny_llama(seed=2), tiny_llama(seed=1))
    batch = Aligner(pad_id=0, max_length=8)([TokenRow.of([5, 6, 7], [False, False, False])])
    with pytest.raises(KDError, match="every token"):
        task.step(batch)
