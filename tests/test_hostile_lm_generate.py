"""Hostile ``kdkit lm generate`` (issue 37): sampling and cache options out of range, prompts
files that are not prompts, configs it cannot sample with, an output folder that holds a run, a
capture, another generation or another writer's lock, and flags --score does not take. Every
row is refused with one line before the teacher samples anything. Rows and verdicts:
tests/_hostile/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _hostile import Case, Fx, cli_rows, judge_row, params

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
_DATA = {"format": "prompt_completion", "pack": False}


def _prompts(fx: Fx, name: str = "prompts", lines: list | None = None, raw: bytes | None = None):
    path = fx.root / "work" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is None:
        lines = [{"prompt": "The student sees"}] if lines is None else lines
        raw = "".join(json.dumps(x) + "\n" for x in lines).encode()
    path.write_bytes(raw)
    return path


def _generate(*extra: str, data: dict | None = None, teacher: dict | None = None,
              prompts: dict | None = None, out: str = ""):  # fmt: skip
    """``kdkit lm generate`` of a tiny config with ``extra`` flags (a fresh --out each)."""

    def argv(fx: Fx) -> list:
        sections = {"data": {**_DATA, **(data or {})}}
        if teacher is not None:
            sections["teacher"] = teacher
        cfg = fx.lm.write("gen", **sections)
        folder = out or fx.root / "work" / f"gen-out{abs(hash(extra)) % 10**8}"
        return ["lm", "generate", cfg, "--prompts", _prompts(fx, **(prompts or {})),
                "--out", folder, "--no-progress", "--max-new-tokens", "2", *extra]  # fmt: skip

    return argv


def _into(kind: str):
    def argv(fx: Fx) -> list:
        folder = {"run": lambda: fx.lm.run, "capture": lambda: fx.lm.cache}[kind]()
        return _generate(out=str(folder))(fx)

    return argv


def _again_other_settings(fx: Fx) -> list:
    """A finished generation in --out; the same command with another --temperature."""
    from kdkit.cli import main

    argv = _generate("--keep-unfinished", out=str(fx.root / "work" / "again"))(fx)
    assert main([str(a) for a in argv]) == 0
    return [*argv, "--temperature", "0.5"]


def _held(fx: Fx) -> list:
    """Another process holds --out with kdkit's lock."""
    out = fx.root / "work" / "held-gen"
    code = ("import sys, time; from kdkit.train.rundir import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    fx.background = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert fx.background.stdout.readline().strip() == "held"
    return _generate(out=str(out))(fx)


def _stop(fx: Fx) -> None:
    proc = getattr(fx, "background", None)
    if proc is not None:
        proc.kill()
        proc.wait()
        fx.background = None


def _score(*extra: str):
    def argv(fx: Fx) -> list:
        theirs = _prompts(fx, "theirs", [{"prompt": "The student", "completion": " sees."}])
        cfg = fx.lm.write("score", data=_DATA)
        out = fx.root / "work" / "scored"
        return ["lm", "generate", cfg, "--score", theirs, "--out", out, "--no-progress", *extra]

    return argv


def _from_a_cache(fx: Fx) -> list:
    """teacher: {model: cache:DIR}: log-probs on disk, nothing to sample from."""
    return _generate(teacher={"model": f"cache:{fx.lm.cache}"})(fx)


def _classify(fx: Fx) -> list:
    return ["lm", "generate", fx.cfg, "--prompts", _prompts(fx), "--out", fx.root / "work" / "c"]


def _builder_n_zero(fx: Fx) -> None:
    """The Python door: :func:`kdkit.run.lm_generate.generate_run` with ``n=0``."""
    from kdkit.run.lm_generate import generate_config, generate_run

    cfg = generate_config(fx.lm.write("builder", data=_DATA), [], _prompts(fx))
    generate_run(cfg, _prompts(fx), fx.root / "work" / "builder", {"n": 0, "progress": False})


_CHAT_DONE = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
]
OPTIONS: list[Case] = cli_rows([
    Case("lm-generate-n-zero", _generate("--n", "0"), "--n"),
    Case("lm-generate-temperature-negative", _generate("--temperature", "-1"), "--temperature"),
    Case("lm-generate-temperature-nan", _generate("--temperature", "nan"), "--temperature"),
    Case("lm-generate-top-p-zero", _generate("--top-p", "0"), "--top-p"),
    Case("lm-generate-top-p-above-one", _generate("--top-p", "1.5"), "--top-p"),
    Case("lm-generate-max-new-tokens-zero", _generate("--max-new-tokens", "0"), "--max-new-tokens"),
    Case("lm-generate-seed-negative", _generate("--seed", "-1"), "--seed"),
    Case("lm-generate-topk-zero", _generate("--topk", "0"), "--topk"),
    Case("lm-generate-shard-rows-zero", _generate("--shard-rows", "0"), "--shard-rows"),
    Case("lm-generate-batch-size-zero", _generate("--batch-size", "0"), "batch size"),
    Case("lm-generate-score-takes-no-n", _score("--n", "2"), "--n does not apply"),
    Case("lm-generate-classify-config", _classify, "task: classify"),
]) + [Case("lm-generate-builder-n-zero", _builder_n_zero, "--n")]  # fmt: skip

CONFIGS: list[Case] = cli_rows([
    Case("lm-generate-packed-rows", _generate(data={"pack": True}), "data.pack"),
    Case("lm-generate-format-text", _generate(data={"format": "text"}), "prompt_completion or chat"),
    Case("lm-generate-teacher-cache", _from_a_cache, "live teacher"),
    Case("lm-generate-teacher-onnx", _generate(teacher={"backend": "onnx"}), "backend"),
])  # fmt: skip

PROMPTS: list[Case] = cli_rows([
    Case("lm-generate-prompts-not-json", _generate(prompts={"raw": b"{nope\n"}), "not valid JSON"),
    Case("lm-generate-prompts-empty", _generate(prompts={"raw": b"\n\n"}), "no prompt"),
    Case("lm-generate-prompts-not-utf8", _generate(prompts={"raw": b'{"prompt": "\xff"}\n'}), "UTF-8"),
    Case("lm-generate-messages-for-prompt-completion",
         _generate(prompts={"lines": [{"messages": [{"role": "user", "content": "hi"}]}]}), "data.format chat"),
    Case("lm-generate-chat-ends-with-assistant",
         _generate(data={"format": "chat"}, prompts={"lines": _CHAT_DONE}), "assistant turn"),
    Case("lm-generate-prompt-not-a-string", _generate(prompts={"lines": [{"prompt": 3}]}), "string"),
])  # fmt: skip

OUTPUTS: list[Case] = cli_rows([
    Case("lm-generate-into-a-run", _into("run"), "run directory"),
    Case("lm-generate-into-a-capture", _into("capture"), "capture, not a generation"),
    Case("lm-generate-again-other-settings", _again_other_settings, "other settings"),
    Case("lm-generate-into-held-out", _held, "in use|lock", post=lambda fx: _stop(fx)),
])  # fmt: skip

CASES: list[Case] = OPTIONS + CONFIGS + PROMPTS + OUTPUTS


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_lm_generate(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
