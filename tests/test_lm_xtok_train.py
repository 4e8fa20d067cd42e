"""``task: lm`` across tokenizers, end to end: kdkit train with a teacher of its own tokenizer."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import _xtok_fixtures as fx
import pytest
import torch
import yaml
from _lm_fixtures import PARAGRAPH, tiny_llama

from kdkit.cli import main
from kdkit.config import load_config
from kdkit.errors import KDError

tok_a, tok_a_dir, tok_b, tok_b_dir = fx.tok_a, fx.tok_a_dir, fx.tok_b, fx.tok_b_dir  # fixtures


@pytest.fixture(scope="module")
def xtok_run(tmp_path_factory, tok_a, tok_b):
    """Teacher on tokenizer A (2k, numbers merged), student on B (3k, digits split, BOS)."""
    root = tmp_path_factory.mktemp("xtokrun")
    teacher_dir, student_dir = root / "teacher", root / "student"
    tiny_llama(vocab=len(tok_a), seed=1).save_pretrained(teacher_dir)
    tok_a.save_pretrained(teacher_dir)
    student = tiny_llama(vocab=len(tok_b), seed=2, hidden_size=16, intermediate_size=32)
    student.config.save_pretrained(student_dir)
    tok_b.save_pretrained(student_dir)
    text = root / "corpus.txt"
    text.write_text(
        Path(textwrap.__file__).read_text(encoding="utf-8")[:4000]
        + PARAGRAPH * 3
        + "In 2024 the total was 12345 + 678 = 13023 units.\n" * 5
    )
    config = {
        "task": "lm",
        "name": "tiny-xtok",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {
            "text_files": [str(text)],
            "val": {"split": 0.25},
            "max_length": 32,
            "pack": True,
            "batch_size": 4,
        },
        "distill": {"divergence": "fkl", "temperature": 1.0, "ce_weight": 0.1},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(root / "run"),
    }
    return root, config


def test_kdkit_train_distils_across_tokenizers(xtok_run, capsys):
    root, config = xtok_run
    path = root / "xtok.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    assert "best val perplexity" in capsys.readouterr().out
    assert (root / "run" / "best.pt").is_file()
    assert main(["eval", str(root / "run"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "agree"} <= set(scores["student"]) and "ppl" in scores["teacher"]


def test_the_step_trains_on_paired_positions_and_ce_elsewhere(xtok_run):
    from kdkit.run.lm_job import build_lm_trainer

    root, config = xtok_run
    path = root / "direct.yaml"
    path.write_text(yaml.safe_dump({**config, "run_dir": str(root / "direct")}))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    batch = next(iter(data.train_loader))
    xt = batch.teacher
    assert xt is not None and xt.index.shape == batch.input_ids.shape
    paired = (xt.index[batch.mask] >= 0).float().mean().item()
    assert 0.3 < paired < 1.0  # digits split on one side only: some positions have no partner
    out = trainer.task(batch, reduction="mean")
    assert torch.isfinite(out.loss) and out.tokens == batch.n_tokens
    out.loss.backward()
    head = trainer.task.student.get_output_embeddings().weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_same_tokenizer_runs_never_take_the_cross_tokenizer_path(tmp_path, tok_a):
    from kdkit.run.lm_job import build_lm_trainer

    teacher_dir, student_dir = tmp_path / "t", tmp_path / "s"
    tiny_llama(vocab=len(tok_a), seed=1).save_pretrained(teacher_dir)
    tok_a.save_pretrained(teacher_dir)
    tiny_llama(vocab=len(tok_a), seed=2).config.save_pretrained(student_dir)
    tok_a.save_pretrained(student_dir)
    text = tmp_path / "c.txt"
    text.write_text(PARAGRAPH * 4)
    cfg = {
        "task": "lm",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {"text_files": [str(text)], "max_length": 32, "batch_size": 2},
        "distill": {"cross_tokenizer": {"method": "project"}},
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(cfg))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    batch = next(iter(data.train_loader))
    assert batch.teacher is None  # the plain Aligner: today's path, bit for bit


@pytest.mark.parametrize(
    "change,words",
    [
        ({"teacher": None}, "needs a teacher"),
        ({"teacher": {"model": "http://127.0.0.1:9"}}, "served teacher"),
        ({"distill": {"divergence": "rkl", "cross_tokenizer": {}}}, "rkl is infinite"),
        ({"distill": {"cross_tokenizer": {"method": "gold"}}}, "method"),
    ],
)
def test_config_refuses_what_cross_tokenizer_kd_cannot_do(xtok_run, tmp_path, change, words):
    root, config = xtok_run
    cfg = {**config, "distill": {"cross_tokenizer": {}}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(KDError, match=words) as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_a_student_of_another_tokenizer_trains_from_a_cache_of_the_teachers_tokens(
    xtok_run, tmp_path, capsys, tok_b
):
    from kdkit.lm.align import Aligner
    from kdkit.lm.cache import TopKCache
    from kdkit.lm.xtok.target import XTokTarget
    from kdkit.run.lm_job import build_lm_trainer

    root, config = xtok_run
    cfg = {**config, "run_dir": str(tmp_path / "unused")}
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cache_dir = tmp_path / "cache"
    assert main(["lm", "capture", str(path), "--out", str(cache_dir), "--topk", "16",
                 "--no-progress"]) == 0  # fmt: skip
    cache = TopKCache(cache_dir)
    assert (cache_dir / "tokenizer").is_dir()
    assert len(cache.tokenizer()) == 2000  # the teacher's own tokens
    cached = {**config, "teacher": {"model": f"cache:{cache_dir}"}, "run_dir": str(tmp_path / "r")}
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(cached))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    # one text cut into rows (overflow: split): the student's BOS starts its first row only,
    # as the student's own tokenization puts it (the teacher, tokenizer A, writes none)
    ds = data.train_loader.dataset
    ds = getattr(ds, "dataset", ds)  # the val split's Subset
    firsts = [int(r.input_ids[0]) for r in ds.rows]
    assert firsts[0] == tok_b.bos_token_id and tok_b.bos_token_id not in firsts[1:]
    assert sum(int((r.input_ids == tok_b.bos_token_id).sum()) for r in ds.rows) == 1
    batch = next(iter(data.train_loader))
    assert isinstance(batch.teacher, XTokTarget) and batch.teacher.shape == (batch.n_tokens,)
    assert (batch.teacher.index >= 0).float().mean() > 0.3
    out = trainer.task(batch, reduction="mean")
    assert torch.isfinite(out.loss)
    assert main(["train", str(path)]) == 0
    assert "best val perplexity" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "r"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "agree"} <= set(scores["student"])
    # tail: label, the same cache: the student's next token where no top-k id reaches it
    labelled = {**cached, "distill": {**cached["distill"], "tail": "label", "ce_weight": 0.0}}
    path.write_text(yaml.safe_dump(labelled))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    rows = [data.train_loader.dataset[i] for i in range(3)]
    batch = data.train_loader.collate_fn(rows)
    t = batch.teacher.teacher
    assert t.policy == "label"
    # the teacher rows' own next tokens at the cached entries (what the Aligner trains on)
    t_batch = Aligner(pad_id=0, max_length=64)([r.teacher_row() for r in rows])
    assert torch.equal(t.labels, t_batch.labels[t_batch.mask])
    out = trainer.task(batch, reduction="mean")
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_the_cached_loss_equals_the_live_teachers_on_the_same_rows(xtok_run, tmp_path):
    """Top k = the whole teacher vocabulary: the loss from the cache is the live teacher's
    (to the cache's float16 rounding) on the same student rows and pairs."""
    from kdkit.lm.align import Aligner
    from kdkit.lm.xtok.data import XTokCollate
    from kdkit.run.lm_job import build_lm_trainer

    root, config = xtok_run
    data_cfg = {**config["data"], "val": None}
    cache_dir = tmp_path / "cache"
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump({**config, "data": data_cfg}))
    assert main(["lm", "capture", str(path), "--out", str(cache_dir), "--topk", "2000",
                 "--encoding", "f16", "--no-progress"]) == 0  # fmt: skip
    cached = {**config, "data": data_cfg, "teacher": {"model": f"cache:{cache_dir}"},
              "run_dir": str(tmp_path / "r")}  # fmt: skip
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(cached))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump({**config, "data": data_cfg, "run_dir": str(tmp_path / "l")}))
    live, _ = build_lm_trainer(load_config(path), torch.device("cpu"))
    rows = [data.train_loader.dataset[i] for i in range(3)]
    collate = data.train_loader.collate_fn
    b_cache = collate(rows)
    t_aligner = Aligner(pad_id=0, max_length=max(len(r.teacher_ids) for r in rows))
    live_collate = XTokCollate(collate.student, t_aligner, collate.projection)
    b_live = live_collate(rows)
    assert torch.equal(trainer.task.student.lm_head.weight, live.task.student.lm_head.weight)
    with torch.no_grad():
        a = trainer.task(b_cache, reduction="sum")
        b = live.task(b_live, reduction="sum")
    assert a.tokens == b.tokens
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=2e-3)
    assert a.agree.item() == pytest.approx(b.agree.item(), abs=0.05)


def test_the_teacher_ahead_of_the_step_gives_the_same_cross_tokenizer_loss(xtok_run):
    from concurrent.futures import ThreadPoolExecutor

    from kdkit.run.lm_job import build_lm_trainer

    root, config = xtok_run
    path = root / "ahead.yaml"
    path.write_text(yaml.safe_dump({**config, "run_dir": str(root / "ahead")}))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    batch = next(iter(data.train_loader))
    task = trainer.task
    with torch.no_grad():
        direct = task(batch, reduction="sum")
        with ThreadPoolExecutor(1) as worker:
            ahead = task(task.teacher_ahead(batch, worker), reduction="sum")
    assert ahead.loss.item() == pytest.approx(direct.loss.item(), rel=1e-6)
