"""Hostile ``task: lm`` model and tokenizer folders (issue 40): what transformers, jinja2,
safetensors and pickle raise must reach the user as one line naming the folder, and a config
that declares an absurd size is refused before anything is allocated. Rows and verdicts:
tests/_hostile/.
"""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
from _hostile import PWN, Case, Fx, cli_rows, file_size_cap, judge_row, memory_cap, params, pwned

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(fx: Fx, name: str, **sections) -> list:
    return ["train", fx.lm.write(name, **sections), "--run-dir", fx.root / "work" / f"{name}-run"]


def _student_config(fx: Fx, name: str, **config) -> list:
    """A student ``hf-config:`` folder whose config.json is edited by ``config``."""
    folder = fx.lm.model_folder(name, **config)
    (folder / "model.safetensors").unlink()
    return _train(fx, name, student={"model": f"hf-config:{folder}"})


def _config_list(fx: Fx) -> list:
    argv = _student_config(fx, "cfglist")
    (fx.lm.root / "work" / "cfglist" / "config.json").write_text("[1, 2]")
    return argv


def _teacher_config(fx: Fx, name: str, **config) -> list:
    folder = fx.lm.model_folder(name, **config)
    return _train(fx, name, teacher={"model": f"hf:{folder}"})


def _teacher_file(fx: Fx, name: str, edit) -> list:
    """A teacher folder whose weights file ``edit(folder)`` changed."""
    folder = fx.lm.copy(fx.lm.teacher, name)
    edit(folder)
    return _train(fx, name, teacher={"model": f"hf:{folder}"})


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


def _absurd_header(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((1 << 60).to_bytes(8, "little") + data[8:])


class _Payload:
    def __reduce__(self):
        return subprocess.call, (PWN,)


def _pickled_bin(folder: Path) -> None:
    """The weights as a pickle that runs ``PWN`` when unpickled (pytorch_model.bin)."""
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(
        pickle.dumps({"model.embed_tokens.weight": _Payload()})
    )


# -- chat templates -----------------------------------------------------------------------------
def _chat(fx: Fx, name: str, template: str) -> list:
    """Chat data through a tokenizer whose chat template is ``template``."""
    tok = fx.lm.copy(fx.lm.tokenizer, name)
    (tok / "chat_template.jinja").write_text(template)
    chat = tok.parent / f"{name}.jsonl"
    msgs = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."}]
    chat.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(4)) + "\n")
    data = {"text_files": [str(chat)], "format": "chat", "loss_on": "assistant", "val": None}
    student = {"model": f"hf-config:{fx.lm.student}", "tokenizer": str(tok)}
    return _train(fx, name, data=data, student=student)


GOOD_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


# -- a tokenizer with neither pad nor eos -------------------------------------------------------
def _no_pad_tokenizer(fx: Fx, name: str) -> Path:
    tok = fx.lm.copy(fx.lm.teacher, name)  # a teacher folder: weights and tokenizer
    cfg_path = tok / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("pad_token", "eos_token", "bos_token"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg))
    return tok


def _no_pad(fx: Fx, verb: str) -> list:
    folder = _no_pad_tokenizer(fx, f"nopad-{verb}")
    teacher = {"model": f"hf:{folder}"}
    student = {"model": f"hf-config:{fx.lm.student}", "tokenizer": str(folder)}
    cfg = fx.lm.write(f"nopad-{verb}", teacher=teacher, student=student)
    if verb == "train":
        return ["train", cfg, "--run-dir", fx.root / "work" / "nopad-run"]
    if verb == "capture":
        return ["precompute", cfg, "--out", fx.root / "work" / "nopad-cache", "--no-progress"]
    return ["cache", "check", fx.lm.cache, "--teacher", f"hf:{folder}"]


def _lm_ready(fx: Fx, then):
    """A guard that builds the room's run and cache first, then enters ``then``."""
    _ = (fx.lm.run, fx.lm.cache)  # built outside the guard
    return then


SIZES: list[Case] = cli_rows([
    Case("lm-student-config-vocab-size-string", lambda fx: _student_config(fx, "vocab-str", vocab_size="300"), "vocab_size"),
    Case("lm-student-config-vocab-negative", lambda fx: _student_config(fx, "vocab-neg", vocab_size=-5), "vocab_size"),
    Case("lm-student-config-zero-heads", lambda fx: _student_config(fx, "heads0", num_attention_heads=0, num_key_value_heads=0),
         "num_attention_heads|heads"),
    Case("lm-student-hidden-not-multiple-of-heads", lambda fx: _student_config(fx, "hidden30", hidden_size=30, num_attention_heads=4, num_key_value_heads=4),
         "hidden_size|heads"),
    Case("lm-teacher-config-zero-heads", lambda fx: _teacher_config(fx, "theads0", num_attention_heads=0), "heads"),
    Case("lm-student-config-vocab-1e9", lambda fx: _student_config(fx, "vocab1e9", vocab_size=10**9), r"GiB|memory|vocab_size",
         guard=lambda fx: memory_cap()),
    Case("lm-teacher-config-vocab-1e9", lambda fx: _teacher_config(fx, "tvocab1e9", vocab_size=10**9), r"GiB|memory|vocab_size",
         guard=lambda fx: memory_cap()),
    Case("lm-student-config-million-layers", lambda fx: _student_config(fx, "layers1e6", num_hidden_layers=10**6),
         r"GiB|memory|num_hidden_layers", guard=lambda fx: memory_cap()),
    Case("lm-student-config-json-a-list", _config_list, r"config\.json"),
])  # fmt: skip

FILES: list[Case] = cli_rows([
    Case("lm-teacher-safetensors-truncated", lambda fx: _teacher_file(fx, "trunc", _truncate), r"model\.safetensors|trunc"),
    Case("lm-teacher-safetensors-absurd-header", lambda fx: _teacher_file(fx, "header", _absurd_header), r"model\.safetensors|header"),
    Case("lm-teacher-pytorch-model-bin-pickle", lambda fx: _teacher_file(fx, "pickle", _pickled_bin), r"pytorch_model\.bin|pickle",
         post=pwned),
    Case("lm-chat-template-raises", lambda fx: _chat(fx, "tpl-raise", "{{ raise_exception('no system messages') }}"),
         "chat template.*no system messages"),
    Case("lm-chat-template-syntax-error", lambda fx: _chat(fx, "tpl-syntax", "{% for m in messages %}{{ m['content'] }"),
         "chat template"),
    Case("lm-chat-template-undefined-name", lambda fx: _chat(fx, "tpl-undef", "{{ nothing.here }}{{ messages[0]['content'] }}"),
         "chat template.*nothing"),
    Case("lm-chat-template-incremental-ok", lambda fx: _chat(fx, "tpl-ok", GOOD_TEMPLATE), expect="correct"),
    Case("lm-tokenizer-no-pad-no-eos-train", lambda fx: _no_pad(fx, "train"), "pad"),
    Case("lm-tokenizer-no-pad-no-eos-capture", lambda fx: _no_pad(fx, "capture"), "pad"),
    Case("lm-tokenizer-no-pad-no-eos-cache-check", lambda fx: _no_pad(fx, "check"), "pad"),
    Case("lm-disk-full-during-capture", lambda fx: ["precompute", fx.lm.write("full"), "--out", fx.root / "work" / "full-cache",
                                                    "--no-progress", "--shard-rows", "8"],
         r"cannot write|too large|space", guard=lambda fx: _lm_ready(fx, file_size_cap(4096))),
    Case("lm-disk-full-during-export-hf", lambda fx: ["export", fx.lm.run, "--hf", fx.root / "work" / "full-hf"],
         r"cannot write|too large|space", guard=lambda fx: _lm_ready(fx, file_size_cap(4096))),
])  # fmt: skip

CASES: list[Case] = SIZES + FILES


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_lm_models(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
