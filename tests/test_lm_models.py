"""kdkit.lm.models (model strings, hidden states without logits) and kdkit.lm.vocab."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _lm_fixtures as fx
import pytest
import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.data import TokenRow
from kdkit.lm.models import freeze_teacher, hidden_and_head, load_lm, logit_transform, max_positions
from kdkit.lm.tokenizer import train_bpe_tokenizer
from kdkit.lm.vocab import check_vocab

VOCAB, corpus, tiny_llama = fx.VOCAB, fx.corpus, fx.tiny_llama
# fixtures
lm_tokenizer, lm_tokenizer_dir, tiny_llama_dir = (
    fx.lm_tokenizer,
    fx.lm_tokenizer_dir,
    fx.tiny_llama_dir,
)


def test_hf_folder_loads_model_and_tokenizer(tiny_llama_dir, lm_tokenizer):
    model, tok = load_lm(f"hf:{tiny_llama_dir}")
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == len(lm_tokenizer)
    ref = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)
    half, _ = load_lm(f"hf:{tiny_llama_dir}", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert max_positions(model) == 64 and logit_transform(model) == (1.0, None)


def test_hf_config_builds_random_init_reproducibly(tiny_llama_dir, tmp_path):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    a, tok = load_lm(f"hf-config:{cfg_dir}", seed=3)
    b, _ = load_lm(f"hf-config:{cfg_dir / 'config.json'}", seed=3)
    c, tok_c = load_lm(f"hf-config:{tiny_llama_dir}", seed=4)
    assert tok is None and tok_c is not None
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.hidden_size == 32


def test_model_string_errors(tmp_path):
    for spec, expect in [
        ("hff:./x", "did you mean ['hf"),
        (f"hf:{tmp_path / 'missing'}", "no such folder"),
        (f"hf:{tmp_path}", "has no config.json"),
    ]:
        with pytest.raises(KDError, match=expect.replace("[", r"\[")):
            load_lm(spec)


def test_hidden_and_head_never_computes_logits_and_matches_them(tiny_llama_dir):
    model, _ = load_lm(f"hf:{tiny_llama_dir}")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        hidden, head = hidden_and_head(model, ids, attention_mask=mask)
        assert not calls and hidden.shape == (2, 5, 32) and head.out_features == VOCAB
        logits = model(ids, attention_mask=mask).logits
    assert torch.allclose(head(hidden), logits, atol=1e-5)


def test_freeze_teacher():
    model = tiny_llama().train()
    assert freeze_teacher(model) is model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


class _Plain(nn.Module):
    """The protocol: forward(ids) -> hidden, plus an lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lm_head = nn.Linear(8, VOCAB, bias=False)

    def forward(self, input_ids, position_ids=None):
        return self.embed(input_ids) + (0 if position_ids is None else position_ids[..., None])


def test_plain_module_protocol():
    model = _Plain()
    ids = torch.tensor([[3, 4, 5]])
    hidden, head = hidden_and_head(model, ids, position_ids=torch.tensor([[0, 1, 2]]))
    assert head is model.lm_head
    assert torch.allclose(hidden, model.embed(ids) + torch.tensor([0.0, 1, 2])[None, :, None])
    packed = Aligner(pad_id=1, max_length=4)([TokenRow.of([3, 4, 5], doc_ids=[0, 0, 1])])
    with pytest.raises(KDError, match="attend across documents"):
        hidden_and_head(model, packed.input_ids, packed.position_ids, packed.attention_mask)
    with pytest.raises(KDError, match="no output head"):
        hidden_and_head(nn.Identity(), ids)


def test_importing_kdkit_lm_does_not_import_transformers():
    code = (
        "import sys, kdkit.lm, kdkit.lm.data, kdkit.lm.align, kdkit.lm.models, "
        "kdkit.lm.vocab, kdkit.lm.tokenizer; print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vocab_same_tokenizer_with_padded_heads(tiny_llama_dir, lm_tokenizer):
    _, teacher_tok = load_lm(f"hf:{tiny_llama_dir}")  # a second copy, loaded from another folder
    assert check_vocab(lm_tokenizer, teacher_tok, VOCAB, VOCAB + 64) == VOCAB
    with pytest.raises(KDError, match=f"student head has {VOCAB - 1} rows"):
        check_vocab(lm_tokenizer, teacher_tok, VOCAB - 1, VOCAB)


def test_vocab_different_tokenizers_name_the_first_differing_id(lm_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    other_dir = train_bpe_tokenizer(corpus()[1:], VOCAB, tmp_path / "other")
    other = AutoTokenizer.from_pretrained(str(other_dir), local_files_only=True)
    s_inv = {i: t for t, i in lm_tokenizer.get_vocab().items()}
    o_inv = {i: t for t, i in other.get_vocab().items()}
    first = min(i for i in s_inv if s_inv[i] != o_inv.get(i))
    with pytest.raises(KDError) as e:
        check_vocab(lm_tokenizer, other, VOCAB, VOCAB)
    msg = str(e.value)
    assert "kdkit.lm.xtok" in msg and f"id {first}:" in msg
    assert repr(s_inv[first]) in msg and "\n" not in msg
    # same vocabulary, different merges: tokenization differs, still an error
    data = json.loads((tmp_path / "other" / "tokenizer.json").read_text())
    mine = json.loads(Path(lm_tokenizer.name_or_path, "tokenizer.json").read_text())
    mine["model"]["merges"] = mine["model"]["merges"][::-1]
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(mine))
    swapped = AutoTokenizer.from_pretrained(str(other_dir), local_files_only=True)
    assert data != mine and swapped.get_vocab() == lm_tokenizer.get_vocab()
    with pytest.raises(KDError, match="different 'model'"):
        check_vocab(lm_tokenizer, swapped, VOCAB, VOCAB)


def test_kd_step_contract(tiny_llama_dir, lm_tokenizer, tmp_path):
    """The call pattern of a training step: one TokenBatch feeds the student and the teacher."""
    from torch.utils.data import DataLoader

    from kdkit.lm.data import load_lm_dataset

    (tmp_path / "a.txt").write_text(fx.PARAGRAPH * 3, encoding="utf-8")
    (tmp_path / "b.txt").write_text("A short second document.", encoding="utf-8")
    teacher = freeze_teacher(load_lm(f"hf:{tiny_llama_dir}")[0])
    student = tiny_llama(seed=5, hidden_size=16, intermediate_size=32).train()
    ds = load_lm_dataset(
        str(tmp_path / "*.txt"),
        lm_tokenizer,
        max_length=48,
        pack=True,
        overflow="split",
        max_positions=max_positions(student),
    )
    vocab = check_vocab(
        lm_tokenizer, lm_tokenizer, student.lm_head.out_features, teacher.lm_head.out_features
    )
    loader = DataLoader(ds, batch_size=len(ds), collate_fn=Aligner(lm_tokenizer.pad_token_id, 48))
    batch = next(iter(loader))
    assert batch.packed and batch.n_tokens > 0
    with torch.no_grad():
        t_hidden, t_head = hidden_and_head(teacher, **batch.model_inputs())
    s_hidden, s_head = hidden_and_head(student, **batch.model_inputs())
    m = batch.mask
    t_logp = t_head(t_hidden[m]).float()[:, :vocab].log_softmax(-1)
    s_logp = s_head(s_hidden[m]).float()[:, :vocab].log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).sum() / batch.n_tokens
    ce = torch.nn.functional.cross_entropy(s_head(s_hidden).flatten(0, 1), batch.labels.flatten())
    (kl + ce).backward()
    assert kl > 0 and torch.isfinite(ce)
    assert student.lm_head.weight.grad is not None and teacher.lm_head.weight.grad is None


class _Masked(nn.Module):
    """The protocol with an attention_mask: records the mask it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(1, VOCAB, bias=False)
        self.masks: list[torch.Tensor | None] = []

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        self.masks.append(attention_mask)
        return input_ids[..., None].float()


def test_packed_rows_reach_each_kind_of_model_as_it_attends():
    """HF: position_ids and no mask (a legacy [B,1,L,L] mask is read as positions, same
    hidden states); a protocol module: the block-causal bool mask, built only for it."""
    docs = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]]
    row = TokenRow.of(sum(docs, []), doc_ids=[0] * 5 + [1] * 6)
    batch = Aligner(pad_id=1, max_length=16)([row, TokenRow.of([3, 4, 5])])
    assert batch.packed and batch.attention_mask is None
    model = tiny_llama(attn="sdpa")
    with torch.no_grad():
        new = hidden_and_head(model, **batch.model_inputs()).hidden
        legacy = hidden_and_head(model, batch.input_ids, None, batch.block_mask()).hidden
        alone = model.model(input_ids=torch.tensor([docs[1]])).last_hidden_state[0]
    real = batch.padding_mask.bool()
    torch.testing.assert_close(new[real], legacy[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new[0, 5:11], alone, rtol=1e-5, atol=1e-6)
    plain = _Masked()
    hidden_and_head(plain, **batch.model_inputs())
    assert torch.equal(plain.masks[-1][:1], batch.block_mask()[:1])  # the packed row's blocks
    one_doc = Aligner(pad_id=1, max_length=16)([TokenRow.of([3, 4, 5])])
    hidden_and_head(plain, **one_doc.model_inputs())
    assert plain.masks[-1].dim() == 2  # no packed row: the padding mask, nothing built


def test_logit_transform_tuple_comes_from_the_one_lookup():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    from kdkit.lm.logits import output_transform, transform_rules

    small = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    cases = [
        (GraniteConfig(logits_scaling=8.0, **small), (0.125, None)),
        (CohereConfig(logit_scale=0.5, **small), (0.5, None)),
        (Gemma2Config(final_logit_softcapping=30.0, head_dim=8, **small), (1.0, 30.0)),
    ]
    from transformers import AutoModelForCausalLM

    for config, want in cases:
        model = AutoModelForCausalLM.from_config(config)
        assert logit_transform(model) == want
        assert output_transform(model).family == config.model_type
    assert transform_rules()["granite"] == "z / logits_scaling"
    assert transform_rules()["hyperclovax"] == "z * logits_scaling"
