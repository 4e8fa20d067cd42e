"""kdkit.lm.align: the causal shift, padding, packing and masks, pinned by property tests."""

from __future__ import annotations

import random

import pytest
import torch
from _lm_fixtures import VOCAB, tiny_llama

from kdkit.errors import KDError
from kdkit.lm.align import IGNORE_INDEX, Aligner
from kdkit.lm.data import TokenRow
from kdkit.lm.models import hidden_and_head

PAD = 1


def _random_rows(rng: random.Random, max_length: int) -> list[TokenRow]:
    rows = []
    for _ in range(rng.randint(1, 5)):
        ids, tr, doc = [], [], []
        for d in range(rng.randint(1, 4)):
            n = rng.randint(1, max_length // 4)
            if len(ids) + n > max_length:
                break
            ids += [rng.randrange(2, VOCAB) for _ in range(n)]
            tr += [rng.random() < 0.7 for _ in range(n)]
            doc += [d] * n
        rows.append(TokenRow.of(ids, tr, doc))
    return rows


@pytest.mark.parametrize("seed", range(40))
def test_mask_and_labels_properties(seed):
    rng = random.Random(seed)
    rows = _random_rows(rng, 32)
    b = Aligner(pad_id=PAD, max_length=32, pad_to_multiple_of=8 if seed % 2 else None)(rows)
    assert b.input_ids.shape == b.labels.shape == b.mask.shape == b.position_ids.shape
    assert b.n_tokens == int(b.mask.sum())
    for i, r in enumerate(rows):
        n = len(r)
        for j in range(b.input_ids.shape[1]):
            nxt_ok = j + 1 < n and bool(r.trainable[j + 1]) and r.doc_ids[j + 1] == r.doc_ids[j]
            assert bool(b.mask[i, j]) == nxt_ok, (seed, i, j)
            if nxt_ok:
                assert b.labels[i, j] == b.input_ids[i, j + 1]
            else:
                assert b.labels[i, j] == IGNORE_INDEX
        assert not b.mask[i, n - 1 :].any()  # the last token before padding has no target
        assert (b.input_ids[i, n:] == PAD).all() and (b.doc_ids[i, n:] == -1).all()
        edges = (r.doc_ids[1:] != r.doc_ids[:-1]).nonzero().flatten()
        assert not b.mask[i, edges].any()  # never trained across a document edge
        starts = torch.cat([torch.tensor([0]), edges + 1])
        assert (b.position_ids[i, starts] == 0).all()
        assert (b.position_ids[i, :n].diff()[(r.doc_ids.diff() == 0)] == 1).all()
    packed = any((r.doc_ids.diff() != 0).any() for r in rows)
    assert b.packed == packed and (b.attention_mask is None) == packed
    assert torch.equal(b.padding_mask, (b.doc_ids >= 0).long())


def test_first_completion_token_is_predicted_by_the_last_prompt_token():
    rng = random.Random(0)
    for _ in range(20):
        p, c = rng.randint(1, 10), rng.randint(1, 10)
        ids = [rng.randrange(2, VOCAB) for _ in range(p + c)]
        row = TokenRow.of(ids, [False] * p + [True] * c)
        b = Aligner(pad_id=PAD, max_length=24)([row, TokenRow.of(ids[:3])])
        j = p - 1
        assert b.mask[0, j] and b.labels[0, j] == ids[p]
        assert not b.mask[0, :j].any() and b.mask[0, j : p + c - 1].all()
        assert int(b.mask[0].sum()) == c


def test_block_mask_is_causal_and_block_diagonal():
    row = TokenRow.of([5, 6, 7, 8, 9], doc_ids=[0, 0, 1, 1, 1])
    m = Aligner(pad_id=PAD, max_length=8)([row, TokenRow.of([5, 6])]).block_mask()
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    expect = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(m[0, 0], expect)
    assert not m[1, 0, :2, 2:].any()  # tokens never attend to padding


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_row_equals_each_document_alone(attn):
    model = tiny_llama(attn=attn)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 11)]
    packed = TokenRow.of(sum(docs, []), doc_ids=sum(([d] * len(x) for d, x in enumerate(docs)), []))
    short = TokenRow.of(docs[1])
    b = Aligner(pad_id=PAD, max_length=32)([packed, short])
    with torch.no_grad():
        hidden, head = hidden_and_head(model, b.input_ids, b.position_ids, b.attention_mask)
        start = 0
        for x in docs:
            alone = model.model(input_ids=torch.tensor([x])).last_hidden_state[0]
            assert torch.allclose(hidden[0, start : start + len(x)], alone, atol=1e-5)
            start += len(x)
        alone = model.model(input_ids=torch.tensor([docs[1]])).last_hidden_state[0]
        assert torch.allclose(hidden[1, : len(docs[1])], alone, atol=1e-5)  # padded row
    assert head is model.lm_head


def test_padded_unpacked_batch_equals_rows_alone():
    model = tiny_llama(attn="sdpa")
    rows = [TokenRow.of([3, 4, 5, 6, 7, 8]), TokenRow.of([9, 10])]
    b = Aligner(pad_id=PAD, max_length=8, pad_to_max_length=True)(rows)
    assert b.attention_mask.tolist()[1] == [1, 1, 0, 0, 0, 0, 0, 0] and b.input_ids.shape == (2, 8)
    with torch.no_grad():
        hidden, _ = hidden_and_head(model, b.input_ids, b.position_ids, b.attention_mask)
        alone = model.model(input_ids=torch.tensor([[9, 10]])).last_hidden_state[0]
    assert torch.allclose(hidden[1, :2], alone, atol=1e-5)


def test_row_longer_than_max_length_is_an_error():
    with pytest.raises(KDError, match="max_length 4"):
        Aligner(pad_id=PAD, max_length=4)([TokenRow.of(list(range(2, 8)))])
