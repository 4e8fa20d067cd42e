"""``kdkit train`` / ``eval`` / ``lm capture`` with a served teacher (``teacher: {model:
"http://..."}``), and its faults: a server killed -9 mid-epoch and restarted (the run goes on,
to the same weights), a server swapped for another teacher (refused, mid-run and on resume), a
server gone for good (one line, the last checkpoint intact), a trainer killed -9 and resumed.
Real ``kdkit lm serve`` processes on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _lm_fixtures import PARAGRAPH, VOCAB, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401
from _served import ROOT, ServerProcess

from kdkit.cli import main
from kdkit.train import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lm_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("served")
    for name, seed in (("teacher", 1), ("teacher2", 3)):
        tiny_llama(seed=seed).save_pretrained(root / name)
        lm_tokenizer.save_pretrained(root / name)
    student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
    student.config.save_pretrained(root / "student")
    lm_tokenizer.save_pretrained(root / "student")
    text = root / "corpus.txt"
    text.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:5000] + PARAGRAPH * 4)
    server = ServerProcess(f"hf:{root / 'teacher'}").wait_ready()
    config = {
        "task": "lm",
        "name": "served",
        "student": {"model": f"hf-config:{root / 'student'}"},
        "teacher": {"model": server.url, "served": {"topk": VOCAB, "retry_s": 60}},
        "data": {
            "text_files": [str(text)],
            "val": {"split": 0.25},
            "max_length": 32,
            "batch_size": 4,
        },  # fmt: skip
        "distill": {"temperature": 2.0, "ce_weight": 0.1},
        "train": {
            "epochs": 2,
            "optimizer": {"name": "AdamW", "lr": 0.003},
            "progress": False,
            "checkpoint_every": 2,
        },  # fmt: skip
    }
    state = {"root": root, "server": server, "config": config}
    yield state
    state["server"].kill()


def _write(setup, tmp_path, **changes):
    cfg = json.loads(json.dumps(setup["config"]))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    path = tmp_path / f"lm-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(*argv: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every run of this file
    try:
        return main(["train", *argv])
    finally:
        torch.set_num_threads(threads)


def _at_step(monkeypatch, step: int, action) -> None:
    original = Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.callbacks.append(lambda trainer, out: trainer.step == step and action())

    monkeypatch.setattr(Trainer, "__init__", init)


def _student(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["student"]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted served run: what every faulted run must end at, bit for bit."""
    tmp = tmp_path_factory.mktemp("ref")
    path = _write(setup, tmp)
    assert _train(str(path), "--run-dir", str(tmp / "run")) == 0
    return tmp / "run"


def test_train_and_eval_with_a_served_teacher(setup, reference, tmp_path, capsys):
    assert (reference / "report.md").is_file()
    capsys.readouterr()
    assert main(["eval", str(reference), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "agree"} <= set(scores["student"])
    # the same run with the teacher in-process: the same first-epoch loss (top k = V, bucket)
    local = _write(setup, tmp_path, teacher__model=f"hf:{setup['root'] / 'teacher'}")
    cfg = yaml.safe_load(local.read_text())
    del cfg["teacher"]["served"]
    local.write_text(yaml.safe_dump(cfg))
    assert _train(str(local), "--run-dir", str(tmp_path / "local")) == 0
    rows = [(tmp_path / "local" / "metrics.csv"), (reference / "metrics.csv")]
    first = [r.read_text().splitlines()[1:2] for r in rows]
    head = (reference / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("loss_loss", "loss_kl"):
        i = head.index(name)
        a, b = (float(f[0].split(",")[i]) for f in first)
        assert b == pytest.approx(a, rel=1e-4), name
    assert "model: http://127.0.0.1" in (reference / "config.yaml").read_text()


def test_a_server_killed_mid_epoch_and_restarted_leaves_the_run_unchanged(
    setup, reference, tmp_path, monkeypatch
):
    def kill_and_restart():
        port = setup["server"].port
        setup["server"].kill()
        setup["server"] = ServerProcess(f"hf:{setup['root'] / 'teacher'}", port)  # starting

    _at_step(monkeypatch, 3, kill_and_restart)
    assert _train(str(_write(setup, tmp_path)), "--run-dir", str(tmp_path / "run")) == 0
    setup["server"].wait_ready()
    for k, v in _student(reference).items():
        assert torch.equal(v, _student(tmp_path / "run")[k]), k


def test_a_swapped_teacher_is_refused_mid_run_and_on_resume(
    setup, reference, tmp_path, monkeypatch, capsys
):
    port, root = setup["server"].port, setup["root"]

    def swap():
        setup["server"].kill()
        setup["server"] = ServerProcess(f"hf:{root / 'teacher2'}", port).wait_ready()

    _at_step(monkeypatch, 3, swap)
    path, run = _write(setup, tmp_path), tmp_path / "run"
    assert _train(str(path), "--run-dir", str(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search("changed mid-run|came back as another teacher", err[0])
    # the checkpoint holds only steps trained on the run's teacher (the prefetched targets of
    # steps 4-5 came before the swap), so resuming with it back ends at the reference weights
    assert torch.load(run / "last.pt", weights_only=True)["step"] in (2, 4)
    monkeypatch.undo()
    assert _train(str(path), "--run-dir", str(run), "--resume") == 2  # still the other teacher
    assert "served" in capsys.readouterr().err
    setup["server"].kill()
    setup["server"] = ServerProcess(f"hf:{root / 'teacher'}", port).wait_ready()
    assert _train(str(path), "--run-dir", str(run), "--resume") == 0
    for k, v in _student(reference).items():
        assert torch.equal(v, _student(run)[k]), k


def test_a_server_gone_for_good_stops_the_run_in_one_line(setup, tmp_path, monkeypatch, capsys):
    served = {**setup["config"]["teacher"]["served"], "retry_s": 2}
    path = _write(setup, tmp_path, teacher__served=served)
    port, root = setup["server"].port, setup["root"]
    _at_step(monkeypatch, 3, setup["server"].kill)
    try:
        assert _train(str(path), "--run-dir", str(tmp_path / "run")) == 2
    finally:
        setup["server"] = ServerProcess(f"hf:{root / 'teacher'}", port).wait_ready()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not answer for 2 s" in err[0] and "intact" in err[0], err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] in (2, 4)


def test_a_trainer_killed_mid_epoch_resumes_to_the_same_weights(setup, reference, tmp_path):
    path, run = _write(setup, tmp_path), tmp_path / "run"
    job = [sys.executable, str(Path(__file__).parent / "_train_kill_job.py"), "5", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    killed = subprocess.run([*job, str(path), "--run-dir", str(run)], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert _train(str(path), "--run-dir", str(run), "--resume") == 0
    for k, v in _student(reference).items():
        assert torch.equal(v, _student(run)[k]), k


def test_capture_from_a_served_teacher_writes_the_local_capture(setup, tmp_path):
    from safetensors.numpy import load_file

    served = _write(setup, tmp_path)
    local = _write(setup, tmp_path, teacher__model=f"hf:{setup['root'] / 'teacher'}")
    cfg = yaml.safe_load(local.read_text())
    del cfg["teacher"]["served"]
    local.write_text(yaml.safe_dump(cfg))
    for path, out in ((served, "a"), (local, "b")):
        argv = ["lm", "capture", str(path), "--out", str(tmp_path / out), "--topk", "8"]
        assert main([*argv, "--encoding", "f16", "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["teacher"]["weights_sha256"] == b["teacher"]["weights_sha256"]
    assert a["capture"]["precision"].startswith("teacher served torch fp32")
    for shard in a["shards"]:
        x, y = load_file(tmp_path / "a" / shard["file"]), load_file(tmp_path / "b" / shard["file"])
        for name in x:
            assert (x[name] == y[name]).all(), name


def test_on_policy_samples_are_scored_by_the_served_teacher(setup, tmp_path):
    import httpx

    words = PARAGRAPH.split()
    lines = [{"prompt": " ".join(words[i : i + 5]), "completion": " ".join(words[i + 5 : i + 9])}
             for i in range(0, len(words) - 9, 3)]  # fmt: skip
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    served = {**setup["config"]["teacher"]["served"], "prefetch": 0}
    path = _write(
        setup, tmp_path, teacher__served=served,
        data__text_files=[str(data)], data__format="prompt_completion",
        data__loss_on="completion", data__pack=False, data__max_length=48,
        distill__on_policy={"lambda": 1.0, "max_new_tokens": 6},
        train__epochs=1,
    )  # fmt: skip
    stats = f"{setup['server'].url}/kdkit/v1/info"
    before = httpx.get(stats, timeout=30).json()["stats"]["requests"]
    assert _train(str(path), "--run-dir", str(tmp_path / "run")) == 0
    after = httpx.get(stats, timeout=30).json()["stats"]["requests"]
    steps = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"]
    assert after - before >= steps  # every step's samples were sent (prefetch 0: nothing else)


def test_kdkit_lm_serve_refuses_in_one_line_before_loading(setup, capsys):
    teacher = f"hf:{setup['root'] / 'teacher'}"
    assert main(["lm", "serve", teacher, "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "beyond this machine: set a shared token" in capsys.readouterr().err
    assert main(["lm", "serve", str(setup["root"] / "teacher"), "--port", "0"]) == 2
    assert "takes a task: lm CONFIG.yaml or a model 'hf:DIR'" in capsys.readouterr().err
    assert main(["lm", "serve", teacher, "--precision", "int8", "--port", "0"]) == 2
    assert "a task: lm CONFIG whose teacher says precision: int8" in capsys.readouterr().err
