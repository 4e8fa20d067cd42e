"""The teacher's sampling loop of ``kdkit lm generate`` (kdkit.lm.sampling): the targets it keeps
are a full forward's at the distillation temperature, a sample is a function of its seed alone,
draws follow the nucleus of softmax(f / T), and the tokenization check bans what it must."""

from __future__ import annotations

import pytest
import torch
from _lm_fixtures import tiny_llama

from kdkit.lm.align import Aligner
from kdkit.lm.data import TokenRow
from kdkit.lm.sampling import REDRAWS, SampleSettings, TeacherSampler, sample_seed
from kdkit.lm.topk import teacher_topk

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 320
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def sampler():
    return TeacherSampler(tiny_llama(seed=1), VOCAB, 0, torch.device("cpu"))


def _settings(**kw) -> SampleSettings:
    base = dict(temperature=1.3, top_p=0.9, max_new_tokens=10, stop_ids=(2, 3), k=8,
                kd_temperature=2.0, prompt_targets=True)  # fmt: skip
    return SampleSettings(**{**base, **kw})


def test_targets_are_a_full_forward_at_the_kd_temperature(sampler):
    out = sampler.sample(
        PROMPTS, [sample_seed(0, i, 0) for i in range(3)], [10, 5, 10], _settings()
    )
    for o in out:
        seq = o.sequence
        assert len(o.tokens) <= 10 and o.first == 0 and o.ids.shape == (len(seq), 8)
        batch = Aligner(pad_id=0, max_length=64)([TokenRow.of(seq + [0])])  # train every position
        top = teacher_topk(sampler.model, batch, VOCAB, 8, 2.0)
        ids, lp, tail = top.ids, top.logp, top.tail
        assert torch.equal(ids, o.ids.long())
        torch.testing.assert_close(lp, o.logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(tail, o.tail, atol=1e-5, rtol=0)
        # every position's distribution counted, but the last of a finished row (nothing follows)
        assert float(o.mass.sum()) == pytest.approx(len(seq) - o.finished, abs=1e-6)
        hot = teacher_topk(sampler.model, batch, VOCAB, 8, 1.0).logp
        assert not torch.allclose(hot, o.logp, atol=1e-3)  # not the sampling temperature's


def test_a_sample_is_a_function_of_its_seed(sampler):
    s = _settings(prompt_targets=False)
    batch = sampler.sample(PROMPTS, [sample_seed(7, i, 0) for i in range(3)], [10] * 3, s)
    alone = sampler.sample(PROMPTS[1:2], [sample_seed(7, 1, 0)], [10], s)[0]
    assert alone.tokens == batch[1].tokens and alone.first == len(PROMPTS[1]) - 1
    torch.testing.assert_close(alone.logp, batch[1].logp, atol=1e-5, rtol=0)
    other = sampler.sample(PROMPTS[1:2], [sample_seed(7, 1, 1)], [10], s)[0]
    assert other.tokens != alone.tokens


def test_draws_follow_the_nucleus(sampler):
    """2000 one-token samples of one prompt against softmax(f / 0.7) cut to top-p 0.8."""
    n, s = 2000, _settings(temperature=0.7, top_p=0.8, max_new_tokens=1, stop_ids=())
    out = sampler.sample([PROMPTS[0]] * n, [sample_seed(3, 0, j) for j in range(n)], [1] * n, s)
    counts = torch.bincount(torch.tensor([o.tokens[0] for o in out]), minlength=VOCAB).double()
    logits = sampler.model(torch.tensor([PROMPTS[0]])).logits[0, -1].double()
    p, order = torch.softmax(logits / 0.7, -1).sort(descending=True)
    p = torch.where(p.cumsum(0) - p < 0.8, p, 0.0)
    want = torch.zeros(VOCAB, dtype=torch.float64).scatter(0, order, p / p.sum())
    assert counts[want == 0].sum() == 0  # nothing outside the nucleus
    sd = (n * want * (1 - want)).sqrt()
    assert bool(((counts - n * want).abs() <= 5 * sd + 1).all())


def test_greedy_and_the_tokenization_check(sampler):
    greedy = sampler.sample(PROMPTS, [1, 2, 3], [6] * 3, _settings(temperature=0.0, stop_ids=()))
    again = sampler.sample(PROMPTS, [4, 5, 6], [6] * 3, _settings(temperature=0.0, stop_ids=()))
    assert [o.tokens for o in greedy] == [o.tokens for o in again]
    first = {o.tokens[0] for o in greedy}

    def canonical(completions):  # these ids never make a text that tokenizes back
        return [not (set(c) & first) for c in completions]

    s = _settings(temperature=0.0, stop_ids=(), canonical=canonical)
    checked = sampler.sample(PROMPTS, [1, 2, 3], [6] * 3, s)
    assert all(not (set(o.tokens) & first) for o in checked)
    assert all(o.redraws >= 1 for o in checked)

    def never(completions):
        return [False] * len(completions)

    stuck = sampler.sample(PROMPTS[:1], [1], [2], _settings(canonical=never, stop_ids=()))[0]
    assert stuck.redraws == 2 * REDRAWS and len(stuck.tokens) == 2  # the last draw stands
