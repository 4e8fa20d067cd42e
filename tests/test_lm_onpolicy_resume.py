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
