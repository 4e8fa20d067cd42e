"""On-policy distillation resumed from a mid-epoch checkpoint (``train.checkpoint_every``) ends
with the same weights as the run that was never stopped: the samples drawn after the resume
are the ones the uninterrupted run drew (issue 38: 686.3 vs 715.5 before the fix)."""

from __future__ import annotations

import pytest
import torch
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir  # noqa: F401
from test_lm_onpolicy import pc_file, pc_run  # noqa: F401

from kdkit.cli import main
from kdkit.train import Trainer


class _Stop(Exception):
    pass


def _one_thread_main(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_on_policy_resume_mid_epoch_is_exact(pc_run, tmp_path, monkeypatch):  # noqa: F811
    _, config = pc_run
    cfg = {**config, "train": {**config["train"], "epochs": 2, "checkpoint_every": 2}}
    cfg["distill"] = {"on_policy": {"lambda": 0.5, "max_new_tokens": 8, "temperature": 1.0}}
    path = tmp_path / "op.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _one_thread_main(["train", str(path), "--run-dir", str(ref)]) == 0

    original = Trainer.__init__

    def stopping(self, *args, **kwargs):  # stop the run (as a kill would) after step 3
        original(self, *args, **kwargs)

        def stop(trainer, out):
            if trainer.step == 3:
                raise _Stop

        self.callbacks.append(stop)

    monkeypatch.setattr(Trainer, "__init__", stopping)
    with pytest.raises(_Stop):
        _one_thread_main(["train", str(path), "--run-dir", str(run)])
    monkeypatch.setattr(Trainer, "__init__", original)
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["batch_in_epoch"] == 2  # mid-epoch
    assert _one_thread_main(["train", str(path), "--run-dir", str(run), "--resume"]) == 0
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["step"] == b["step"]
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), k


def test_the_numbers_an_on_policy_run_shows(pc_run, tmp_path, caplog):  # noqa: F811
    """Per-token losses under plain labels, the global batch, and the samples' statistics in
    metrics.csv and report.md (completion length, clipped share, entropy)."""
    import csv
    import logging

    _, config = pc_run
    path = tmp_path / "op.yaml"
    path.write_text(yaml.safe_dump({**config, "run_dir": str(tmp_path / "run")}))
    with caplog.at_level(logging.INFO, logger="kdkit"):
        assert main(["train", str(path), "--set", "distill.on_policy.lambda=1"]) == 0
    assert "global batch: 8 rows per optimizer step (8 per process x 1 process" in caplog.text
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/"))
    assert " loss " in line and "loss_loss" not in line and " kl " in line
    assert "sample_len" in line and "sampled_share 1" in line
    with (tmp_path / "run" / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    assert float(row["sampled_share"]) == 1.0 and 0 < float(row["sample_len"]) <= 8
    assert 0 <= float(row["sample_clipped"]) <= 1 and float(row["sample_entropy"]) > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "On-policy samples (last epoch): 100% of the batches, mean completion" in report
    assert "Global batch: 8 rows per optimizer step" in report


def test_a_scratch_run_shows_no_kl_and_the_bar_a_per_token_loss(pc_run, tmp_path, monkeypatch):  # noqa: F811
    import kdkit.train.trainer as trainer_module

    shown = []

    class Bar:
        def __init__(self, iterable, **kw):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, values):
            shown.append(float(values["loss"]))

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    _, config = pc_run
    cfg = {**config, "teacher": None, "distill": {}, "data": {**config["data"], "batch_size": 1}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run_dir": str(tmp_path / "run")}))
    assert main(["train", str(path)]) == 0
    history = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["history"]
    assert "loss_kl" not in history[0] and "loss_loss" in history[0]  # csv columns kept
    assert shown and all(0 < v < 20 for v in shown)  # nats per token, not a sum over tokens
