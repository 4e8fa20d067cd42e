"""Hostile ``task: lm`` runs (issue 40): ``--resume`` after what the run depends on changed
(the tokenizer retrained to the same size, the teacher's weights or the cache replaced, the
corpus edited) is refused as image runs are, and every metric kdkit logs has a direction that
early stopping and ``best.pt`` follow (``val_kl`` and ``val_ce`` are lower-is-better).
Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import pytest
from _hostile import Case, Fx, cli_rows, corpus_text, judge_row, params, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(fx: Fx, name: str, cache: bool = False) -> tuple[list, dict]:
    """A run of its own (teacher, student, corpus and cache copied, so they can be changed),
    trained for one epoch; returns the resume argv (two epochs) and the copies."""
    from kdkit.cli import main

    lm = fx.lm
    own = {"teacher": lm.copy(lm.teacher, f"{name}-teacher"),
           "student": lm.copy(lm.student, f"{name}-student"),
           "corpus": lm.copy(lm.corpus, f"{name}-corpus.txt")}  # fmt: skip
    teacher = f"hf:{own['teacher']}"
    if cache:
        own["cache"] = lm.copy(lm.cache, f"{name}-cache")
        teacher = f"cache:{own['cache']}"
    cfg = lm.write(name, teacher={"model": teacher}, student={"model": f"hf-config:{own['student']}"},
                   data={"text_files": [str(own["corpus"])]})  # fmt: skip
    run = fx.root / "work" / f"{name}-run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    return ["train", cfg, "--run-dir", run, "--resume", "--set", "train.epochs=2"], own


def _same(fx: Fx) -> list:
    return _trained(fx, "same")[0]


def _tokenizer_retrained(fx: Fx) -> list:
    """The same vocabulary size, every id now another string: saved over both folders."""
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    argv, own = _trained(fx, "retok")
    other = train_bpe_tokenizer([corpus_text(seed=3)[::-1] * 3], 300, fx.lm.folder("retok-tok"))
    for folder in (own["teacher"], own["student"]):
        for f in other.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return argv


def _teacher_replaced(fx: Fx) -> list:
    argv, own = _trained(fx, "reteach")
    tiny_llama(seed=7).save_pretrained(own["teacher"])  # same folder, other weights
    return argv


def _cache_replaced(fx: Fx) -> list:
    """The cache folder recaptured from another teacher (same settings, other log-probs)."""
    from kdkit.cli import main

    argv, own = _trained(fx, "recache", cache=True)
    other = fx.lm.copy(fx.lm.teacher, "recache-other-teacher")
    tiny_llama(seed=9).save_pretrained(other)
    cfg = fx.lm.write("recache-capture", teacher={"model": f"hf:{other}"})
    new = fx.lm.folder("recache-new")
    new.rmdir()
    assert (
        main(
            [
                "precompute",
                str(cfg),
                "--out",
                str(new),
                "--topk",
                "4",
                "--shard-rows",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    import shutil

    shutil.rmtree(own["cache"])
    shutil.copytree(new, own["cache"])
    return argv


def _corpus_edited(fx: Fx) -> list:
    argv, own = _trained(fx, "recorpus")
    text = own["corpus"].read_text()
    own["corpus"].write_text(text.replace("the", "a"))
    return argv


RESUME: list[Case] = cli_rows([
    Case("lm-resume-same-inputs-continues", _same, expect="correct"),
    Case("lm-resume-tokenizer-retrained-same-size", _tokenizer_retrained, "tokenizer changed|tokenizer.*changed"),
    Case("lm-resume-teacher-weights-replaced", _teacher_replaced, "teacher.*changed"),
    Case("lm-resume-cache-recaptured", _cache_replaced, "(cache|teacher).*changed"),
    Case("lm-resume-corpus-edited", _corpus_edited, "corpus.*changed"),
])  # fmt: skip


# -- directions ---------------------------------------------------------------------------------
def _direction(column: str, task_metric: str = "ppl", higher: bool = False):
    def run(fx: Fx) -> bool | None:
        from kdkit.train.early_stopping import EarlyStopping

        return EarlyStopping(metric=column).resolve(task_metric, higher)[1]

    return run


def _expect(column: str, want: bool, **kw):
    return lambda fx: _direction(column, **kw)(fx) is want


def _stops_while_improving(fx: Fx) -> bool:
    """val_kl falls every epoch: patience 1 must not stop the run."""
    from kdkit.train.early_stopping import EarlyStopping

    es = EarlyStopping(metric="val_kl", patience=1)
    column, higher = es.resolve("ppl", False)
    history = [{"epoch": i, "val_kl": 0.5 - 0.1 * i} for i in range(4)]
    return es.reason_to_stop(history, column, higher) is None


def _lm_run_early_stopping(fx: Fx) -> bool:
    """kdkit train with early_stopping on val_ce (mode auto): best.pt holds the lowest val_ce
    epoch's weights, and the run stops only after patience epochs without a lower one."""
    import csv

    from kdkit.cli import main

    es = {"metric": "val_ce", "patience": 1}
    cfg = fx.lm.write(
        "es", train={"epochs": 3, "early_stopping": es, "optimizer": {"name": "AdamW", "lr": 0.01}}
    )
    run = fx.root / "work" / "es-run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    ce = [float(r["val_ce"]) for r in rows]
    falling = all(b < a for a, b in zip(ce, ce[1:], strict=False))
    return len(rows) == 3 if falling else True


def _task_declares_wrong_direction(fx: Fx) -> None:
    """A task whose best metric is a perplexity but that says higher is better."""
    from kdkit.lm.task import LMTask
    from kdkit.train import Trainer

    class Wrong(LMTask):
        best_metric = ("ppl", True)

    Trainer(Wrong(tiny_llama(), None), [None], epochs=1, device="cpu", progress=False)


DIRECTIONS: list[Case] = [
    Case("early-stopping-auto-val-kl-lower-is-better", _expect("val_kl", False), expect="correct"),
    Case("early-stopping-auto-val-ce-lower-is-better", _expect("val_ce", False), expect="correct"),
    Case("early-stopping-auto-val-agree-higher-is-better", _expect("val_agree", True), expect="correct"),
    Case("early-stopping-auto-val-top5-higher-is-better", _expect("val_top5", True, task_metric="top1", higher=True), expect="correct"),
    Case("early-stopping-auto-val-pair-loss", _expect("val_pair_loss", False, task_metric="top1", higher=True), expect="correct"),
    Case("early-stopping-val-kl-keeps-going-while-falling", _stops_while_improving, expect="correct"),
    Case("early-stopping-auto-val-tokens-has-no-direction", _direction("val_tokens"), "val_tokens.*(mode|direction)"),
    Case("early-stopping-auto-unknown-metric", _direction("val_bleu"), "val_bleu.*mode"),
    Case("lm-run-early-stopping-val-ce", _lm_run_early_stopping, expect="correct"),
    Case("task-declares-ppl-higher-is-better", _task_declares_wrong_direction, "ppl.*lower"),
]  # fmt: skip

CASES: list[Case] = RESUME + DIRECTIONS


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_lm_runs(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
