"""The top-k LM teacher cache end to end: ``kdkit lm capture`` -> info / verify / check ->
``kdkit train`` with ``teacher: {model: "cache:DIR"}`` -> eval; kill -9 and resume give a
byte-identical cache; a cache that does not fit the run is refused with one line naming why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from _lm_fixtures import PARAGRAPH, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main

HERE = Path(__file__).parent


def _config(root: Path, **data) -> dict:
    return {
        "task": "lm",
        "name": "cached",
        "student": {"model": f"hf-config:{root / 'student'}"},
        "teacher": {"model": f"hf:{root / 'teacher'}"},
        "data": {
            "text_files": [str(root / "corpus.txt")],
            "val": {"split": 0.25},
            "max_length": 32,
            "pack": True,
            "batch_size": 4,
            **data,
        },
        "distill": {"divergence": "fkl", "ce_weight": 0.1},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(root / "run"),
    }


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def captured(tmp_path_factory, lm_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("lmcache")
    tiny_llama(seed=1).save_pretrained(root / "teacher")
    lm_tokenizer.save_pretrained(root / "teacher")
    tiny_llama(seed=3).save_pretrained(root / "other-teacher")
    lm_tokenizer.save_pretrained(root / "other-teacher")
    tiny_llama(seed=2, hidden_size=16, intermediate_size=32).config.save_pretrained(
        root / "student"
    )
    (root / "corpus.txt").write_text(
        Path(textwrap.__file__).read_text(encoding="utf-8")[:5000] + PARAGRAPH * 3
    )
    cfg = _write(root / "capture.yaml", _config(root))
    argv = ["lm", "capture", str(cfg), "--out", str(root / "cache"), "--topk", "8"]
    assert main([*argv, "--shard-rows", "16", "--no-progress"]) == 0
    return root


def test_capture_info_verify_check(captured, capsys):
    cache = captured / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["capture"]["k"] == 8
    assert manifest["capture"]["id_bits"] == 9  # ceil(log2 320)
    assert len(manifest["shards"]) >= 2
    assert main(["lm", "cache", "info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "bytes per token" in out and "top-k mass" in out
    assert main(["lm", "cache", "verify", str(cache)]) == 0
    assert main(["lm", "cache", "check", str(cache)]) == 0  # the recorded teacher
    assert "same weights as captured" in capsys.readouterr().out


def test_precompute_and_cache_verbs_serve_the_lm_task(captured, tmp_path, capsys):
    """``kdkit precompute CONFIG`` is ``kdkit lm capture`` for a task: lm config (the config's
    recipe does it), byte for byte; ``kdkit cache info | verify`` read the LM format from its
    manifest; a flag only image caches take is refused, not ignored."""
    cfg = str(captured / "capture.yaml")
    out = tmp_path / "cache"
    argv = ["precompute", cfg, "--out", str(out), "--topk", "8", "--shard-rows", "16"]
    assert main([*argv, "--no-progress"]) == 0
    assert "train with teacher" in capsys.readouterr().out
    want = json.loads((captured / "cache" / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]
    assert main(["cache", "info", str(out)]) == 0
    assert "bytes per token" in capsys.readouterr().out
    assert main(["cache", "verify", str(out)]) == 0
    assert main(["precompute", cfg, "--out", str(tmp_path / "x"), "--views", "2"]) == 2
    assert "--views does not apply to a task: lm" in capsys.readouterr().err


def test_verify_catches_another_teacher(captured, capsys):
    cache = captured / "cache"
    other = f"hf:{captured / 'other-teacher'}"
    assert main(["lm", "cache", "verify", str(cache), "--teacher", other]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_train_from_the_cache_then_eval(captured, capsys):
    config = _config(captured)
    config["teacher"] = {"model": f"cache:{captured / 'cache'}"}
    config["run_dir"] = str(captured / "run-cached")
    path = _write(captured / "train.yaml", config)
    assert main(["train", str(path)]) == 0
    assert "best val perplexity" in capsys.readouterr().out
    rows = (captured / "run-cached" / "metrics.csv").read_text()
    assert "val_kl" in rows and "val_agree" in rows
    assert main(["eval", str(captured / "run-cached"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "agree"} <= set(scores["student"])
    from kdkit.run.lm_tools import evaluate_lm_run

    other = captured / "other.txt"  # text the cache does not hold: the student's ppl alone
    other.write_text(PARAGRAPH * 6)
    scores = evaluate_lm_run(captured / "run-cached", torch.device("cpu"), data=[str(other)])
    assert "ppl" in scores["student"] and "kl" not in scores["student"]


def test_full_vocab_cache_gives_the_online_loss(captured, tmp_path):
    """With k = V (f16) every tail policy is the teacher's whole distribution: the cached
    step's loss equals the online one to fp16 rounding."""
    from kdkit.config import load_resolved
    from kdkit.lm import LMTask
    from kdkit.lm.cache import TopKCache
    from kdkit.lm.models import load_lm
    from kdkit.run.lm_job import build_lm_data, capture_run

    cfg = load_resolved(captured / "capture.yaml")
    capture_run(cfg, tmp_path / "full", topk=320, encoding="f16", progress=False)
    cache = TopKCache(tmp_path / "full")
    teacher, tok = load_lm(cfg.teacher.model)
    student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
    online = next(iter(build_lm_data(cfg, tok, 64).train_loader))
    for policy in ("bucket", "renorm", "uniform"):
        batch = cache.collate(build_lm_data(cfg, tok, 64).train_loader.collate_fn, policy)(
            [cache.row(i) for i in range(4)]
        )
        live = build_lm_data(cfg, tok, 64).train_loader.collate_fn([cache.row(i) for i in range(4)])
        a = LMTask(student, cache).step(batch).loss
        b = LMTask(student, teacher).step(live).loss
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=2e-3), policy
    assert online.n_tokens > 0


def _run_capture_job(cfg: Path, out: Path, stop_after: int) -> None:
    """A capture in a child process, SIGKILLed once its manifest lists ``stop_after`` shards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    job = [sys.executable, str(HERE / "_lm_capture_job.py"), str(cfg), str(out)]
    proc = subprocess.Popen(job, env=env, stderr=subprocess.PIPE)
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


def test_killed_capture_resumes_byte_identical(captured, tmp_path):
    cfg = captured / "capture.yaml"
    killed = tmp_path / "killed"
    _run_capture_job(cfg, killed, stop_after=1)
    _run_capture_job(cfg, killed, stop_after=2)
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    argv = ["lm", "capture", str(cfg), "--out", str(killed), "--topk", "8", "--shard-rows", "16"]
    torch.set_num_threads(1)  # the same arithmetic as the one-thread children
    assert main([*argv, "--no-progress"]) == 0
    clean = captured / "cache"
    names = sorted(p.name for p in clean.iterdir() if p.is_file())
    assert names == sorted(p.name for p in killed.iterdir() if p.is_file())
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("pack", "data.pack: cache True, here False"),
        # another vocabulary now trains across tokenizers (test_lm_xtok_train.py); this
        # student's head is one row short of it
        ("tokenizer", "the student head has 320 rows but its tokenizer has 321 tokens"),
        ("template", "another tokenizer (differs in chat_template_sha256"),
        ("text", "is not in the teacher cache"),
        ("flip", "does not match its checksum"),
        ("manifest", "was edited after capture"),
    ],
)
def test_a_cache_that_does_not_fit_is_refused(captured, tmp_path, capsys, change, message):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(captured / "cache", cache)
    config = _config(captured)
    config["teacher"] = {"model": f"cache:{cache}"}
    config["run_dir"] = str(tmp_path / "run")
    if change == "pack":
        config["data"]["pack"] = False
    elif change in ("tokenizer", "template"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(cache / "tokenizer"), local_files_only=True)
        if change == "tokenizer":
            tok.add_tokens(["<extra-token>"])
        else:
            tok.chat_template = "{{ messages }}"
        tok.save_pretrained(tmp_path / "tok")
        config["student"]["tokenizer"] = str(tmp_path / "tok")
    elif change == "text":
        (tmp_path / "corpus.txt").write_text((captured / "corpus.txt").read_text().upper())
        config["data"]["text_files"] = [str(tmp_path / "corpus.txt")]
    elif change == "flip":
        shard = cache / "shard-00000.safetensors"
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["capture"]["k"] = 4
        (cache / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", str(_write(tmp_path / "c.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_capture_with_the_onnx_teacher_matches_torch(captured, tmp_path, capsys):
    """``teacher.backend: onnx`` captures the same distributions (checked against the eager
    teacher the cache records) and says which engine ran in the manifest."""
    pytest.importorskip("onnxruntime")
    cfg = captured / "capture.yaml"
    out = tmp_path / "onnx-cache"
    argv = ["lm", "capture", str(cfg), "--out", str(out), "--topk", "8", "--no-progress"]
    assert main([*argv, "--set", "teacher.backend=onnx"]) == 0
    assert json.loads((out / "manifest.json").read_text())["capture"]["precision"].startswith(
        "teacher onnx fp32"
    )
    assert main(["lm", "cache", "check", str(out), "--max-dlogp", "0.05"]) == 0
    assert "same weights as captured" in capsys.readouterr().out
