"""The ONNX Runtime LM teacher (kdkit.lm.onnx_teacher): the same hidden states and loss as the
eager teacher on padded and packed rows, the export keyed by the weights, the int8 fidelity
gate, and ``kdkit train`` with ``teacher.backend: onnx``."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _lm_fixtures import PARAGRAPH, corpus, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from kdkit.errors import KDError  # noqa: E402
from kdkit.lm.align import Aligner  # noqa: E402
from kdkit.lm.data import TokenRow  # noqa: E402
from kdkit.lm.models import hidden_and_head, max_positions  # noqa: E402
from kdkit.lm.onnx_teacher import OnnxLMTeacher, ensure_lm_onnx  # noqa: E402
from kdkit.lm.task import LMTask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(seed: int, lengths: list[int], vocab: int = 320) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _padded():
    rows = [TokenRow.of(r) for r in _rows(0, [20, 13, 7])]
    return Aligner(pad_id=0, max_length=24)(rows)


def _packed():
    a, b = _rows(1, [24, 24])
    rows = [
        TokenRow.of(a, doc_ids=[0] * 9 + [1] * 10 + [2] * 5),
        TokenRow.of(b[:17], doc_ids=[0] * 4 + [1] * 13),
    ]
    return Aligner(pad_id=0, max_length=24)(rows)


@pytest.fixture(scope="module")
def teacher_pair(tmp_path_factory):
    """An eager teacher (sdpa attention, as ``hf:`` loads it) and its ONNX Runtime twin."""
    model = tiny_llama(attn="sdpa", seed=1)
    onnx = OnnxLMTeacher.from_model(model, cache_dir=tmp_path_factory.mktemp("onnx"))
    return model, onnx


@pytest.mark.parametrize("make", [_padded, _packed], ids=["padded", "packed"])
def test_hidden_states_equal_eager_torch(teacher_pair, make):
    model, onnx = teacher_pair
    batch = make()
    assert batch.packed == (make is _packed)
    inputs = (batch.input_ids, batch.position_ids, batch.attention_mask)
    with torch.no_grad():
        want = hidden_and_head(model, *inputs)
    got = hidden_and_head(onnx, *inputs)
    real = batch.doc_ids >= 0  # padding positions are never read
    assert got.hidden.shape == want.hidden.shape and got.hidden.dtype == torch.float32
    assert (got.hidden[real] - want.hidden[real]).abs().max() < 1e-4
    assert torch.equal(got.head.weight, want.head.weight) and not got.head.weight.requires_grad
    assert max_positions(onnx) == max_positions(model) == 64


def test_fused_loss_with_the_onnx_teacher_equals_the_torch_teachers(teacher_pair):
    model, onnx = teacher_pair
    batch = _packed()
    grads, losses = [], []
    for teacher in (model, onnx):
        student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
        task = LMTask(student, teacher, divergence="jsd", temperature=2.0, ce_weight=0.1)
        out = task.step(batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_a_stale_or_corrupted_export_is_exported_again(tmp_path):
    model = tiny_llama(seed=3)
    path = tmp_path / "teacher.onnx"
    first = ensure_lm_onnx(model, path)
    assert first.built and ensure_lm_onnx(model, path).built is False
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # new weights, same file name
    second = ensure_lm_onnx(model, path)
    assert second.built and second.record["model_fingerprint"] != first.record["model_fingerprint"]
    batch = _padded()
    with torch.no_grad():
        want = hidden_and_head(model, batch.input_ids, None, batch.attention_mask).hidden
    got = OnnxLMTeacher(path, model.lm_head)(batch.input_ids, None, batch.attention_mask)
    real = batch.doc_ids >= 0
    assert (got[real] - want[real]).abs().max() < 1e-4  # the new weights, not the old file
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    assert ensure_lm_onnx(model, path).built  # checksum mismatch: rebuilt, not loaded


def _corpus_rows(tokenizer, length: int = 32) -> torch.Tensor:
    ids = torch.tensor(tokenizer("".join(corpus()))["input_ids"])
    return ids[: len(ids) // length * length].view(-1, length)


def _trained(rows: torch.Tensor, steps: int = 150) -> torch.nn.Module:
    """A tiny Llama fitted to the corpus for a moment (loss ~2.3): peaked, real distributions."""
    model = tiny_llama(attn="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        b = rows[torch.randint(0, len(rows) - 16, (16,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_int8_passes_the_gate_on_a_trained_model_and_is_refused_where_it_fails(
    lm_tokenizer,  # noqa: F811
    tmp_path,
):
    rows = _corpus_rows(lm_tokenizer)
    aligner = Aligner(pad_id=0, max_length=32)
    held_out = rows[-16:]  # _trained never draws them
    probe = [aligner([TokenRow.of(r.tolist()) for r in held_out[i : i + 8]]) for i in (0, 8)]
    int8 = OnnxLMTeacher.from_model(
        _trained(rows), precision="int8", probe=probe, cache_dir=tmp_path
    )
    assert int8.precision == "int8" and "int8" in int8.path.name
    assert int8.fidelity.top1_agreement >= 0.95 and int8.fidelity.mean_kl <= 0.01
    # 30x weights: every layer's output dwarfs the residual stream and int8 rounding moves
    # real probability mass (measured: 85% top-1 agreement, KL 0.055 nats/token)
    broken = tiny_llama()
    with torch.no_grad():
        for p in broken.parameters():
            if p.dim() == 2:
                p.mul_(30)
    with pytest.raises(KDError, match="int8 LM teacher .* disagrees with fp32") as err:
        OnnxLMTeacher.from_model(broken, precision="int8", probe=probe, cache_dir=tmp_path)
    assert "\n" not in str(err.value) and "precision: fp32" in str(err.value)


@pytest.fixture
def lm_config(tmp_path, lm_tokenizer):  # noqa: F811
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_llama(seed=1).save_pretrained(teacher_dir)
    lm_tokenizer.save_pretrained(teacher_dir)
    student = tiny_llama(seed=2, hidden_size=16, intermediate_size=32)
    student.config.save_pretrained(student_dir)
    lm_tokenizer.save_pretrained(student_dir)
    text = tmp_path / "corpus.txt"
    text.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:3000] + PARAGRAPH * 2)
    return {
        "task": "lm",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}", "backend": "onnx"},
        "data": {"text_files": [str(text)], "max_length": 32, "batch_size": 4},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(tmp_path / "run"),
    }


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_kdkit_train_with_an_onnx_teacher(lm_config, precision, tmp_path, monkeypatch, caplog):
    from kdkit.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the ONNX cache: ~/.cache/kdkit/onnx
    lm_config["teacher"]["precision"] = precision
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(lm_config))
    with caplog.at_level(logging.INFO, logger="kdkit"):
        assert main(["train", str(path)]) == 0
    assert "teacher: OnnxLMTeacher(" in caplog.text and f"precision='{precision}'" in caplog.text
    cache = tmp_path / "home" / ".cache" / "kdkit" / "onnx"
    exports = list(cache.glob("*.lm.onnx"))
    assert len(exports) == 1 and Path(str(exports[0]) + ".json").is_file()
    assert len(list(cache.glob("*.int8-*.onnx"))) == (precision == "int8")
    if precision == "int8":
        assert "int8 fidelity gate passed" in caplog.text
    assert (tmp_path / "run" / "last.pt").is_file()
    report = (tmp_path / "run" / "report.md").read_text()  # the engine the teacher ran in
    assert f"(ONNX Runtime {precision}" in report
    assert ("; gate: " in report) == (precision == "int8")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"student": {"backend": "onnx"}}, "'student.backend' / 'student.precision' applies"),
        ({"teacher": {"precision": "int8", "dtype": "bfloat16"}}, "exported from float32"),
        ({"teacher": {"backend": "onnx"}, "train": {"fsdp": True}}, "cannot be sharded"),
        ({"teacher": {"backend": "trt"}}, "teacher.backend"),
    ],
)
def test_config_refuses_onnx_settings_it_cannot_run(lm_config, change, words):
    from kdkit.config import parse, validate

    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in lm_config.items()}
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value}
    with pytest.raises(KDError, match=words):
        validate(parse(cfg))


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_windowed_or_soft_capped_teacher_exports_with_its_own_attention(family, tmp_path):
    """Format 2: the graph takes positions only and builds the model's own masks, so a packed
    document longer than the sliding window (4 tokens) attends as it would alone; the ONNX
    teacher keeps the model's after-head transform (Gemma 2's soft-cap)."""
    from _lm_families import build

    from kdkit.lm.logits import output_transform

    model = build(family, seed=0, dtype=torch.float32)
    onnx = OnnxLMTeacher.from_model(model, cache_dir=tmp_path)
    assert onnx.output_transform == output_transform(model)
    batch = _packed()
    with torch.no_grad():
        want = hidden_and_head(model, **batch.model_inputs()).hidden
    got = hidden_and_head(onnx, **batch.model_inputs()).hidden
    real = batch.doc_ids >= 0
    assert (got[real] - want[real]).abs().max() < 1e-4
    student = build(family, seed=1, dtype=torch.float32)
    losses = [LMTask(student, t, temperature=2.0, probe=False)(batch).loss for t in (model, onnx)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
