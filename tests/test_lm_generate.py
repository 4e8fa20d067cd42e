"""``kdkit lm generate``: a teacher's completions and their top-k targets in one pass.

By construction and by test: the rows ``kdkit train`` builds from the written data are the
cache's rows (their hashes, ids and entry counts), the targets equal a separate capture of the
same data, and training from the text and the cache just works; a changed row is refused; kill
-9 and the same command give byte-identical parts, shards and manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main

HERE = Path(__file__).parent
FLAGS = ["--n", "2", "--max-new-tokens", "12", "--shard-rows", "8", "--topk", "8",
         "--encoding", "f16", "--batch-size", "3", "--keep-unfinished", "--no-progress"]  # fmt: skip


def _lines(n: int) -> list[str]:
    text = Path(textwrap.__file__).read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in text if 20 < len(x.strip()) < 60][:n]


def _taught(tokenizer) -> torch.nn.Module:
    """A tiny Llama that learned to finish the lines it will be prompted with (and stop)."""
    model = tiny_llama(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = [tokenizer(x)["input_ids"] + [tokenizer.eos_token_id] for x in _lines(32)]
    x = torch.full((len(ids), max(map(len, ids))), tokenizer.pad_token_id)
    att = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, : len(row)], att[i, : len(row)] = torch.tensor(row), 1
    for _ in range(50):
        loss = model(input_ids=x, attention_mask=att, labels=x.masked_fill(att == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _config(root: Path, **data) -> dict:
    return {
        "task": "lm",
        "name": "gen",
        "student": {"model": f"hf-config:{root / 'student'}"},
        "teacher": {"model": f"hf:{root / 'teacher'}"},
        "data": {
            "text_files": [str(root / "out" / "data" / "*.jsonl")],
            "format": "prompt_completion",
            "loss_on": "all",
            "pack": False,
            "max_length": 32,
            "batch_size": 4,
            **data,
        },  # fmt: skip
        "distill": {"divergence": "fkl", "temperature": 2.0},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(root / "run"),
    }


def _write(path: Path, data) -> Path:
    if isinstance(data, list):
        path.write_text("".join(json.dumps(x) + "\n" for x in data))
    else:
        path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def gen(tmp_path_factory, lm_tokenizer):  # noqa: F811
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lmgen")
    _taught(lm_tokenizer).save_pretrained(root / "teacher")
    lm_tokenizer.save_pretrained(root / "teacher")
    tiny_llama(seed=2, hidden_size=16, intermediate_size=32).config.save_pretrained(
        root / "student"
    )
    prompts = [{"prompt": x[: len(x) // 2], "id": i} for i, x in enumerate(_lines(12))]
    _write(root / "prompts.jsonl", prompts)
    cfg = _write(root / "gen.yaml", _config(root))
    assert main(["lm", "generate", str(cfg), "--prompts", str(root / "prompts.jsonl"),
                 "--out", str(root / "out"), *FLAGS]) == 0  # fmt: skip
    return root


def test_the_cache_holds_the_training_rows_and_equals_a_capture(gen, tmp_path):
    """Every row kdkit train builds from OUT/data is in OUT with its entries; the targets and
    the teacher's mass equal a separate capture of the same data (same rows, same order)."""
    from kdkit.config import load_resolved
    from kdkit.lm.cache import TopKCache
    from kdkit.lm.models import load_tokenizer
    from kdkit.run.lm_job import capture_run, lm_datasets

    cfg = load_resolved(gen / "gen.yaml")
    manifest = json.loads((gen / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["capture"]["temperature"] == 2.0  # distill's T
    counts = manifest["generate"]["counts"]
    assert counts["samples"] == 24 and counts["kept"] == manifest["num_rows"]
    assert 0 < counts["unfinished"] < 24  # the teacher stops by itself, sometimes
    rows = lm_datasets(cfg, load_tokenizer(cfg.teacher.model), 64)[0].rows
    cache = TopKCache(gen / "out")
    for row in rows:
        ids, logp, _ = cache.entries(row)  # found by hash, its ids compared
        assert ids.shape[0] == int(row.trainable[1:].sum())
    capture_run(cfg, tmp_path / "cap", topk=8, encoding="f16", temperature=2.0, shard_rows=8,
                progress=False)  # fmt: skip
    captured = TopKCache(tmp_path / "cap")
    assert captured.manifest["rows_sha256"] == manifest["rows_sha256"]
    for row in rows:
        (a_ids, a_lp, a_tail), (b_ids, b_lp, b_tail) = cache.entries(row), captured.entries(row)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_lp, b_lp, atol=2e-3)
        np.testing.assert_allclose(a_tail, b_tail, atol=2e-3)
    for shard, entry in zip(cache.shards, manifest["shards"], strict=True):  # every trained
        assert shard.arrays()["teacher_mass"].sum() == pytest.approx(entry["entries"])  # position
    # a row scored again counts in teacher_mass as it was sampled (the prior tail's shape)
    np.testing.assert_allclose(cache.prior(), captured.prior(), atol=5e-4)


def test_train_on_the_text_and_the_targets(gen, capsys):
    """The three recipes the summary prints run as printed; an edited completion is refused."""
    cfg = gen / "gen.yaml"
    out = gen / "out"
    cache = ["--set", f"teacher.model=cache:{out}", "--set", "data.val={split: 0.25}"]
    assert main(["train", str(cfg), *cache, "--set", f"run_dir={gen / 'tok'}"]) == 0
    assert "best val perplexity" in capsys.readouterr().out
    assert "val_kl" in (gen / "tok" / "metrics.csv").read_text()
    sft = ["--set", "teacher=null", "--set", f"student.tokenizer={out / 'tokenizer'}"]
    assert main(["train", str(cfg), *sft, "--set", f"run_dir={gen / 'sft'}"]) == 0
    both = [*cache, "--set", "distill.ce_weight=0.5", "--set", f"run_dir={gen / 'both'}"]
    assert main(["train", str(cfg), *both]) == 0
    part = out / "data" / "part-00000.jsonl"
    lines = part.read_text().splitlines()
    record = json.loads(lines[0])
    record["completion"] += " edited"
    part.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    try:
        capsys.readouterr()
        assert main(["train", str(cfg), *cache, "--set", f"run_dir={gen / 'edited'}"]) == 2
        assert "is not in the teacher cache" in capsys.readouterr().err
    finally:
        part.write_text("\n".join(lines) + "\n")


def _job(cfg: Path, prompts: Path, out: Path, stop_after: int) -> None:
    """A generation in a child process, SIGKILLed once its manifest lists ``stop_after``
    shards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    argv = [sys.executable, str(HERE / "_lm_generate_job.py"), str(cfg), str(prompts), str(out)]
    proc = subprocess.Popen([*argv, *FLAGS[:-1]], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            manifest = out / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= stop_after:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_killed_generation_resumes_byte_identical(gen, tmp_path):
    """Killed after its 1st and 2nd part (batches of 3 cut across parts of 8), the same command
    finishes it: no sample twice, none missing, every file as an uninterrupted run's."""
    cfg, prompts, killed = gen / "gen.yaml", gen / "prompts.jsonl", tmp_path / "killed"
    _job(cfg, prompts, killed, stop_after=1)
    _job(cfg, prompts, killed, stop_after=2)
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    argv = ["lm", "generate", str(cfg), "--prompts", str(prompts), "--out", str(killed)]
    assert main([*argv, *FLAGS]) == 0
    clean = gen / "out"
    for sub in ("", "data"):
        names = sorted(p.name for p in (clean / sub).iterdir() if p.is_file())
        assert names == sorted(p.name for p in (killed / sub).iterdir() if p.is_file())
        for name in names:
            assert (clean / sub / name).read_bytes() == (killed / sub / name).read_bytes(), name
    seen = [
        (r["gen"]["prompt"], r["gen"]["sample"])
        for part in sorted((killed / "data").glob("*.jsonl"))
        for r in map(json.loads, part.read_text().splitlines())
    ]
    assert seen == sorted(set(seen))  # in order, once each


@pytest.mark.parametrize("loss_on, template", [("assistant", None), ("all", None),
                                              ("assistant", "chatml")])  # fmt: skip
def test_chat_completions_with_the_assistant_turn(
    gen,
    tmp_path,
    lm_tokenizer,  # noqa: F811
    capsys,
    loss_on,
    template,
):
    """Chat prompts get the assistant turn; ChatML's <|im_end|> stops a reply; the targets
    agree with the live teacher (kdkit lm cache check), the teacher's mass counts every trained
    position (the template's newline after <|im_end|> too, under loss_on: all), and training
    reads them. A tokenizer without a template of its own renders prompts with
    data.chat_template, as the rows are built."""
    import shutil

    for folder in ("teacher", "student"):
        shutil.copytree(gen / folder, tmp_path / folder)
    if template:  # the tokenizer's own template removed: data.chat_template gives it
        (tmp_path / "teacher" / "chat_template.jinja").unlink()
        tok_cfg = json.loads((tmp_path / "teacher" / "tokenizer_config.json").read_text())
        tok_cfg.pop("chat_template", None)
        (tmp_path / "teacher" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    prompts = [{"messages": [{"role": "user", "content": x[:12]}]} for x in _lines(6)]
    _write(tmp_path / "prompts.jsonl", prompts)
    config = _config(tmp_path, format="chat", loss_on=loss_on, max_length=64,
                     **({"chat_template": template} if template else {}))  # fmt: skip
    cfg = _write(tmp_path / "chat.yaml", config)
    out = tmp_path / "out"
    argv = ["lm", "generate", str(cfg), "--prompts", str(tmp_path / "prompts.jsonl")]
    assert main([*argv, "--out", str(out), "--max-new-tokens", "6", "--keep-unfinished",
                 "--topk", "4", "--no-progress"]) == 0  # fmt: skip
    assert "completion lengths (tokens)" in capsys.readouterr().out
    record = json.loads((out / "data" / "part-00000.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    manifest = json.loads((out / "manifest.json").read_text())
    im_end = lm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in manifest["generate"]["sampling"]["stop_ids"]
    assert main(["lm", "cache", "check", str(out), "--rows", "6"]) == 0
    from kdkit.lm.cache import TopKCache

    if loss_on == "assistant":  # every row as sampled (under "all", a reply that ended with
        # EOS gets <|im_end|> in its row and the newline after it is trained: scored again)
        assert manifest["generate"]["counts"]["rescored"] == 0
        for shard, entry in zip(TopKCache(out).shards, manifest["shards"], strict=True):
            assert shard.arrays()["teacher_mass"].sum() == pytest.approx(entry["entries"])
    assert main(["train", str(cfg), "--set", f"teacher.model=cache:{out}"]) == 0


def test_filters_and_score(gen, tmp_path, capsys):
    """Greedy samples of a prompt are one completion (duplicates dropped), completions that hit
    --max-new-tokens are dropped by default, a prompt with no room is skipped; --score writes a
    cache of completions the teacher did not write, and training reads it."""
    prompts = [{"prompt": x[: len(x) // 2]} for x in _lines(4)] + [{"prompt": "word " * 40}]
    _write(tmp_path / "p.jsonl", prompts)
    cfg = gen / "gen.yaml"
    argv = ["lm", "generate", str(cfg), "--prompts", str(tmp_path / "p.jsonl"), "--no-progress"]
    out = tmp_path / "greedy"
    assert main([*argv, "--out", str(out), "--n", "3", "--temperature", "0", "--topk", "4"]) == 0
    text = capsys.readouterr().out
    counts = json.loads((out / "manifest.json").read_text())["generate"]["counts"]
    assert counts["skipped_prompts"] == 1 and counts["samples"] == 12
    assert counts["duplicates"] + counts["unfinished_dropped"] == 12 - counts["kept"]
    assert counts["unfinished"] % 3 == 0  # greedy: a prompt's 3 draws are one
    assert counts["duplicates"] == 2 * (4 - counts["unfinished"] // 3)  # 1 kept of each 3
    assert "duplicates dropped" in text and "completion lengths" in text
    assert main([*argv, "--out", str(tmp_path / "none"), "--max-new-tokens", "1"]) == 2
    assert "no completion was kept" in capsys.readouterr().err
    theirs = [{"prompt": p["prompt"], "completion": " by someone else."} for p in prompts[:4]]
    _write(tmp_path / "theirs.jsonl", theirs)
    scored = tmp_path / "scored"
    # their rows run past max_length 32: cut on the right, as training will (data.truncation)
    cut = ["--set", "data.truncation=right"]
    score = ["lm", "generate", str(cfg), "--score", str(tmp_path / "theirs.jsonl"), *cut]
    assert main([*score, "--out", str(scored), "--topk", "4", "--no-progress"]) == 0
    assert "scored 4 rows" in capsys.readouterr().out
    train = ["--set", f"teacher.model=cache:{scored}", "--set", f"run_dir={tmp_path / 'run'}",
             "--set", f"data.text_files=[{tmp_path / 'theirs.jsonl'}]", *cut]  # fmt: skip
    assert main(["train", str(cfg), *train]) == 0
