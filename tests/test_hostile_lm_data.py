"""Hostile ``task: lm`` data and config values (issue 40): text that is not what it looks like
(a ``**`` glob through a symlink loop, JSON Lines in a ``.json`` file, a NUL-filled file,
validation files the training glob also matches, JSON nested 100k deep), a teacher without
weights, and ``--set`` values out of range. Each is a one-line error or the right rows, never
silence. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import json
import os

import pytest
from _hostile import Case, Fx, cli_rows, judge_row, params

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(fx: Fx):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fx.lm.tokenizer), local_files_only=True)


def _train(fx: Fx, name: str, *extra, **sections) -> list:
    cfg = fx.lm.write(name, **sections)
    return ["train", cfg, "--run-dir", fx.root / "work" / f"{name}-run", *extra]


def _text_files(fx: Fx, name: str, files: dict[str, bytes | str], glob: str, **data) -> list:
    folder = fx.lm.folder(name)
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return _train(fx, name, data={"text_files": [str(folder / glob)], **data})


# -- data -------------------------------------------------------------------------------------
def _symlink_loop(fx: Fx) -> bool:
    """``corpus/**/*.txt`` where corpus/loop -> corpus: one file, read once."""
    from kdkit.lm.data import load_lm_dataset

    folder = fx.lm.folder("loop")
    (folder / "a.txt").write_text(fx.lm.corpus.read_text())
    os.symlink(folder, folder / "loop")
    ds = load_lm_dataset(str(folder / "**" / "*.txt"), _tokenizer(fx), max_length=32)
    return len(ds.description["files"]) == 1


def _same_file_two_names(fx: Fx) -> bool:
    """``a.txt`` and a symlink to it: the text is trained once."""
    from kdkit.lm.data import load_lm_dataset

    folder = fx.lm.folder("twonames")
    (folder / "a.txt").write_text(fx.lm.corpus.read_text())
    os.symlink(folder / "a.txt", folder / "b.txt")
    ds = load_lm_dataset(str(folder / "*.txt"), _tokenizer(fx), max_length=32)
    return len(ds.description["files"]) == 1


def _json_holding_jsonl(fx: Fx) -> bool:
    """What HF datasets' ``to_json`` writes: JSON Lines in ``train.json``. The records' text is
    trained, never the braces and keys."""
    from kdkit.lm.data import load_lm_dataset

    folder = fx.lm.folder("jsonl-in-json")
    lines = [
        json.dumps({"text": f"document {i}: {fx.lm.corpus.read_text()[:300]}"}) for i in range(3)
    ]
    (folder / "train.json").write_text("\n".join(lines) + "\n")
    tok = _tokenizer(fx)
    ds = load_lm_dataset(str(folder / "train.json"), tok, max_length=512)
    text = "".join(tok.decode(r.input_ids) for r in ds.rows)
    return ds.description["documents"] == 3 and '"text"' not in text


DATA: list[Case] = [
    Case("lm-glob-through-symlink-loop", _symlink_loop, expect="correct"),
    Case("lm-glob-same-file-two-names", _same_file_two_names, expect="correct"),
    Case("lm-json-file-holding-json-lines", _json_holding_jsonl, expect="correct"),
] + cli_rows([
    Case("lm-nul-filled-file", lambda fx: _text_files(fx, "nul", {"a.txt": b"\0" * 4096}, "*.txt"),
         r"NUL|binary"),
    Case("lm-binary-file-valid-utf8", lambda fx: _text_files(fx, "bin", {"a.txt": b"ok\0\1\2\3\0" * 500}, "*.txt"),
         r"NUL|binary"),
    Case("lm-json-not-records", lambda fx: _text_files(fx, "json-num", {"a.json": "[1, 2, 3]"}, "*.json"),
         r"a\.json"),
    Case("lm-jsonl-nested-100k-deep", lambda fx: _text_files(fx, "deep", {"a.jsonl": "[" * 100_000 + "]" * 100_000}, "*.jsonl"),
         r"a\.jsonl:1.*(deep|nest)"),
    Case("lm-json-nested-100k-deep", lambda fx: _text_files(fx, "deep-json", {"a.json": "[" * 100_000 + "]" * 100_000}, "*.json"),
         r"a\.json.*(deep|nest)"),
    Case("lm-val-files-in-train-glob", lambda fx: _text_files(
        fx, "overlap", {"a.txt": fx.lm.corpus.read_text(), "val.txt": fx.lm.corpus.read_text()[:900]}, "*.txt",
        val={"text_files": [str(fx.lm.root / "work" / "overlap" / "val.txt")]}), r"val\.txt.*(also|train)"),
    Case("lm-val-files-same-file-other-name", lambda fx: _text_files(
        fx, "overlap2", {"a.txt": fx.lm.corpus.read_text()}, "a.txt",
        val={"text_files": [str(fx.lm.root / "work" / "overlap2" / "." / "a.txt")]}), r"a\.txt.*(also|train)"),
    Case("lm-teacher-hf-config-no-weights",
         lambda fx: _train(fx, "hfconfig", teacher={"model": f"hf-config:{fx.lm.teacher}"}), r"teacher.*weights"),
])  # fmt: skip


# -- --set values of LM keys ------------------------------------------------------------------
def _set(*pairs: str):
    """``kdkit train lm.yaml --set KEY=VALUE --print-config``: a value it accepts is one
    kdkit train would build with."""

    def argv(fx: Fx) -> list:
        out = ["train", fx.lm.write("values"), "--run-dir", fx.root / "work" / "never"]
        for pair in pairs:
            out += ["--set", pair]
        return [*out, "--print-config"]

    return argv


def _on_policy(*pairs: str):
    """As :func:`_set`, on a prompt/completion config with on-policy distillation."""

    def argv(fx: Fx) -> list:
        pc = fx.lm.root / "work" / "pc.jsonl"
        pc.parent.mkdir(parents=True, exist_ok=True)
        pc.write_text(json.dumps({"prompt": "Question: why?", "completion": " Because."}) + "\n")
        data = {"text_files": [str(pc)], "format": "prompt_completion", "loss_on": "completion",
                "pack": False, "val": None}  # fmt: skip
        cfg = fx.lm.write("on-policy", data=data, distill={"on_policy": {"lambda": 0.5}})
        out = ["train", cfg, "--run-dir", fx.root / "work" / "never", "--print-config"]
        for pair in pairs:
            out += ["--set", pair]
        return out

    return argv


BIG = "100000000000000000000000000000"  # 1e29 as a YAML integer
VALUES: list[Case] = cli_rows([
    Case("lm-set-batch-size-1e29", _set(f"data.batch_size={BIG}"), "data.batch_size"),
    Case("lm-set-data-seed-1e29", _set(f"data.seed={BIG}"), "data.seed"),
    Case("lm-set-data-seed-negative", _set("data.seed=-1"), "data.seed"),
    Case("lm-set-train-seed-1e29", _set(f"train.seed={BIG}"), "train.seed"),
    Case("lm-set-max-length-1e29", _set(f"data.max_length={BIG}"), "data.max_length"),
    Case("lm-set-memory-budget-inf", _set("distill.memory_budget_mb=.inf"), "distill.memory_budget_mb"),
    Case("lm-set-memory-budget-nan", _set("distill.memory_budget_mb=.nan"), "distill.memory_budget_mb"),
    Case("lm-set-temperature-inf", _set("distill.temperature=.inf"), "distill.temperature"),
    Case("lm-set-on-policy-accepted", _on_policy(), expect="correct"),
    Case("lm-set-on-policy-tokens-1e29", _on_policy(f"distill.on_policy.max_new_tokens={BIG}"),
         "distill.on_policy.max_new_tokens"),
    Case("lm-set-on-policy-temperature-inf", _on_policy("distill.on_policy.temperature=.inf"),
         "distill.on_policy.temperature"),
    Case("lm-set-accepted", _set("data.batch_size=16", "data.seed=7"), expect="correct"),
])  # fmt: skip

CASES: list[Case] = DATA + VALUES


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_lm_data(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
