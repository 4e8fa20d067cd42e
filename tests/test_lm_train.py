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


def _in_process(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed job runs single-threaded: the same arithmetic
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_mid_epoch_then_resume_gives_bitwise_equal_weights(lm_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    _, _, config = lm_run
    cfg = {**config, "train": {**config["train"], "checkpoint_every": 2}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _in_process(["train", str(path), "--run-dir", str(ref)]) == 0
    job = [sys.executable, str(Path(__file__).parent / "_train_kill_job.py"), "5", "train"]
    root = str(Path(__file__).parents[1])  # the kdkit under test, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    killed = subprocess.run([*job, str(path), "--run-dir", str(run)], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    assert _in_process(["train", str(path), "--run-dir", str(run), "--resume"]) == 0
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["step"] == b["step"]
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), k  # bitwise on the CPU


def test_cli_refuses_bad_lm_inputs_in_one_line_and_writes_nothing(lm_run, tmp_path, capsys):
    root, _, config = lm_run
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    jsonl = tmp_path / "pc.jsonl"
    jsonl.write_text('{"prompt": "a"}\n')
    other_tok = tmp_path / "other"
    from transformers import AutoTokenizer

    from kdkit.lm.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([PARAGRAPH * 30], 280, other_tok)
    tiny_llama(vocab=len(AutoTokenizer.from_pretrained(str(other_tok)))).save_pretrained(other_tok)
    cases = {
        "unknown divergence": {"distill": {"divergence": "kll"}},
        "empty file": {"data": {**config["data"], "text_files": [str(empty)]}},
        "non-UTF-8 file": {"data": {**config["data"], "text_files": [str(latin)]}},
        "missing JSONL keys": {
            "data": {
                **config["data"],
                "text_files": [str(jsonl)],
                "format": "prompt_completion",
                "loss_on": "completion",
            }  # fmt: skip
        },
        "too long for the model": {"data": {**config["data"], "max_length": 4096}},
        "another tokenizer with reverse KL": {
            "teacher": {"model": f"hf:{other_tok}"},
            "distill": {"divergence": "rkl", "cross_tokenizer": {"method": "project"}},
        },
        "no file matches": {"data": {**config["data"], "text_files": [str(tmp_path / "*.md")]}},
    }
    capsys.readouterr()
    for name, change in cases.items():
        run_dir = tmp_path / name.replace(" ", "-")
        bad = {**config, **change, "run_dir": str(run_dir)}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        assert main(["train", str(tmp_path / "bad.yaml")]) == 2, name
        # transformers' own loading bars may precede it; kdkit says one line
        said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kdkit")]
        assert len(said) == 1 and said[0].startswith("kdkit: error:"), (name, said)
        assert not run_dir.exists(), name  # nothing written


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


def test_torchrun_fsdp_cli(lm_run):
    """``torchrun -m kdkit train`` with ``train.fsdp: true`` on 2 gloo ranks: one run
    directory written by rank 0, whose best.pt exports like a one-process run's."""
    import os
    import subprocess
    import sys

    root, path, _ = lm_run
    run = root / "fsdp-run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "kdkit", "train", str(path), "--set", "train.fsdp=true", "--set"]
    cmd += [f"run_dir={run}", "--set", "train.epochs=1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "sharded over 2 ranks" in done.stderr
    assert done.stdout.count("best val perplexity") == 1  # rank 0 alone prints the summary
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + the one epoch, written once
    assert main(["export", str(run), "--hf", str(root / "fsdp-hf")]) == 0
