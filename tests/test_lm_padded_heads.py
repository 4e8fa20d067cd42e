"""Padded heads everywhere: a teacher (or a student) whose head has more rows than the shared
320-token tokenizer trains, evaluates, exports, captures and reports like one without; the
run's report records the logits probe."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _lm_fixtures import PARAGRAPH, VOCAB, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
PADDED = VOCAB + 16


def _config(root: Path, lm_tokenizer, teacher_rows: int, student_rows: int) -> Path:  # noqa: F811
    teacher_dir, student_dir = root / "teacher", root / "student"
    tiny_llama(vocab=teacher_rows, seed=1).save_pretrained(teacher_dir)
    lm_tokenizer.save_pretrained(teacher_dir)
    student = tiny_llama(vocab=student_rows, seed=2, hidden_size=16, intermediate_size=32)
    student.config.save_pretrained(student_dir)
    lm_tokenizer.save_pretrained(student_dir)
    text = root / "corpus.txt"
    text.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:3000] + PARAGRAPH * 2)
    config = {
        "task": "lm",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {"text_files": [str(text)], "val": {"split": 0.25}, "max_length": 32},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(root / "run"),
    }
    path = root / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "teacher_rows, student_rows", [(PADDED, VOCAB), (VOCAB, PADDED)], ids=["teacher", "student"]
)
def test_a_padded_head_trains_evaluates_exports_and_captures(
    lm_tokenizer,  # noqa: F811
    tmp_path,
    capsys,
    teacher_rows,
    student_rows,
):
    path = _config(tmp_path, lm_tokenizer, teacher_rows, student_rows)
    run = tmp_path / "run"
    assert main(["train", str(path)]) == 0
    report = (run / "report.md").read_text()
    assert "Logits probe" in report and "student llama: after-head transform none" in report
    assert "teacher llama" in report
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # was: "pass vocab_size="
    scores = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "agree"} <= set(scores["student"]) and "ppl" in scores["teacher"]
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert exported.get_output_embeddings().out_features == student_rows
    assert main(["precompute", str(path), "--out", str(tmp_path / "cache"), "--topk", "4"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (
        manifest["teacher"]["vocab_rows"] == teacher_rows and manifest["teacher"]["vocab"] == VOCAB
    )


def test_eval_scores_the_real_vocabulary_as_training_did(lm_tokenizer, tmp_path, capsys):  # noqa: F811
    """``kdkit eval``'s student KL is the one the training loop logs on the same val rows."""
    path = _config(tmp_path, lm_tokenizer, PADDED, VOCAB)
    run = tmp_path / "run"
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    kl = json.loads(capsys.readouterr().out)["student"]["kl"]
    last = torch.load(run / "last.pt", weights_only=True)
    logged = [h for h in last["history"] if "val_kl" in h][-1]["val_kl"]
    assert kl == pytest.approx(logged, rel=1e-5)
