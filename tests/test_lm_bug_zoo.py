"""The bug zoo: one test per correctness bug the LM-distillation anchors shipped, each showing
kdkit right where the anchor was wrong (shared/LM-ANCHORS.md; the table is in
docs/lm-families.md). Each docstring names the anchor's issue or pull request. Every reference
is built from the models' own ``forward(...).logits`` or from the plain formula in float64."""

from __future__ import annotations

import pytest
import torch
from _lm_families import build
from _lm_fixtures import corpus, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.errors import KDError
from kdkit.lm.align import IGNORE_INDEX, Aligner
from kdkit.lm.data import TokenRow
from kdkit.lm.divergence import DIVERGENCES, divergence_value
from kdkit.lm.fused import DenseTeacher, token_divergence
from kdkit.lm.task import LMTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n: int, seed: int = 0, vocab: int = 320) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _pair():
    return build("llama", seed=1), build("llama", seed=0)  # student, teacher (float64)


def _own_fkl(student, teacher, ids: list[int], targets: list[int]) -> torch.Tensor:
    """Mean forward KL of the next-token distributions at ``targets`` (positions j predicting
    ids[j+1]), from the models' own logits of ``ids`` alone."""
    x = torch.tensor([ids])
    with torch.no_grad():
        s, t = student(input_ids=x).logits[0, targets], teacher(input_ids=x).logits[0, targets]
    return divergence_value("fkl", torch.log_softmax(s, -1), torch.log_softmax(t, -1)).mean()


def test_mask_is_shifted_at_the_prompt_completion_boundary():
    """DistillKit takes its mask from *unshifted* labels (``trainer.py
    total_distillation_loss``, LM-ANCHORS finding 8); ms-swift's Megatron GKD compared
    unshifted logits and labels (modelscope/ms-swift PR #8436). kdkit trains exactly the
    positions that predict a completion token: the last prompt token predicts the first."""
    student, teacher = _pair()
    prompt, completion = _ids(7, 1), _ids(6, 2)
    row = TokenRow.of(prompt + completion, [False] * 7 + [True] * 6)
    batch = Aligner(pad_id=0, max_length=16)([row])
    out = LMTask(student, teacher, probe=False)(batch, "mean")
    right = _own_fkl(student, teacher, prompt + completion, list(range(6, 12)))
    unshifted = _own_fkl(student, teacher, prompt + completion, list(range(7, 12)))
    assert float(out.kl) == pytest.approx(float(right), rel=1e-9)
    assert abs(float(unshifted) - float(right)) > 1e-3  # the anchor's mask trains other tokens


def test_padding_is_never_trained_nor_attended():
    """Unmasked padding changed perplexity by ~4 and made two KD runs look different
    (peremartra/optipfair#34); ModelOpt's HF trainer ignored loss masks (NVIDIA/Model-Optimizer
    PR #1009). A right-padded batch gives each row exactly its loss alone."""
    student, teacher = _pair()
    rows = [_ids(12, 3), _ids(5, 4)]
    task = LMTask(student, teacher, probe=False)
    both = task(Aligner(pad_id=0, max_length=16)([TokenRow.of(r) for r in rows]), "sum")
    alone = [task(Aligner(pad_id=0, max_length=16)([TokenRow.of(r)]), "sum") for r in rows]
    assert both.tokens == 11 + 4
    assert float(both.loss.detach()) == pytest.approx(sum(float(a.loss.detach()) for a in alone))


def test_left_padded_prompts_sample_from_the_prompt_alone(monkeypatch):
    """Right-padded student rollouts put padding between prompt and completion
    (siyan-zhao/OPSD#30); generation with the wrong padding side or positions differs
    (huggingface/transformers#26569). kdkit's sampler left-pads with positions from the mask:
    the short prompt's first distribution is its own, alone; for a soft-capped Gemma 2 student,
    its capped distribution (the sampler reads the model's own logits)."""
    from kdkit.lm.logits import project_logits
    from kdkit.lm.models import hidden_and_head
    from kdkit.lm.onpolicy import sample_completions

    student = build("gemma2", seed=2, dtype=torch.float32)  # float64 eager: NaN on padding
    seen = []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, **kw: seen.append(p) or draw(p, **kw))
    prompts = [torch.tensor(_ids(9, 5)), torch.tensor(_ids(3, 6))]
    sample_completions(student, prompts, 1, 0.7, (), 0, "cpu")
    with torch.no_grad():
        alone = student(input_ids=prompts[1][None]).logits[0, -1].float()
        uncapped = project_logits(
            hidden_and_head(student, prompts[1][None]).hidden[0, -1:], student.lm_head
        )
    torch.testing.assert_close(seen[0][1], torch.softmax(alone / 0.7, -1), rtol=1e-5, atol=1e-7)
    assert (alone - uncapped[0]).abs().max() > 1.0  # the cap is in what is sampled from


def test_normalization_spans_micro_batches_not_each_one():
    """GKD divided by each micro-batch's tokens under gradient accumulation
    (huggingface/trl#4719, fixed by PR #6006; the same for DDP ranks in modelscope/ms-swift PR
    #10165). kdkit's step returns a *sum* and its token count: summed over micro-batches of
    unequal lengths and divided by all their tokens, it is the one-batch mean (the loop
    all-reduces the count over ranks, tests/test_lm_train.py and test_lm_fsdp.py)."""
    student, teacher = _pair()
    rows = [TokenRow.of(_ids(n, n)) for n in (14, 3, 9, 6)]
    collate = Aligner(pad_id=0, max_length=16)
    task = LMTask(student, teacher, probe=False)
    whole = task(collate(rows), "mean")
    parts = [task(collate([r]), "sum") for r in rows]
    tokens = sum(p.tokens for p in parts)
    assert tokens == whole.tokens
    summed = sum(float(p.loss.detach()) for p in parts) / tokens
    assert summed == pytest.approx(float(whole.loss.detach()), rel=1e-12)
    per_batch_means = sum(float(p.loss.detach()) / p.tokens for p in parts) / len(parts)
    assert abs(per_batch_means - summed) > 1e-3  # what the anchor optimized instead


def test_the_kd_temperature_is_not_the_sampling_temperature(monkeypatch):
    """TRL's GKD applies its ``temperature`` to sampling only, never to the loss
    (``gkd_trainer.py compute_loss``, LM-ANCHORS A.10), and its Liger path trained at the
    sampling temperature (huggingface/trl PR #5731, a 15% loss gap). kdkit samples at
    ``on_policy.temperature`` and distills at ``distill.temperature``."""
    from kdkit.lm.onpolicy import OnPolicy

    student, teacher = _pair()
    seen, batches = [], []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, **kw: seen.append(p) or draw(p, **kw))
    sampler = OnPolicy(1.0, max_new_tokens=3, temperature=0.5)
    generate = sampler.generate
    monkeypatch.setattr(
        OnPolicy, "__call__", lambda self, s, b: batches.append(generate(s, b)) or batches[-1]
    )
    row = TokenRow.of(_ids(10, 7), [False] * 6 + [True] * 4)
    batch = Aligner(pad_id=0, max_length=16)([row])
    task = LMTask(student, teacher, temperature=2.0, on_policy=sampler, probe=False)
    torch.manual_seed(0)
    out = task.step(batch)
    prompt = batch.input_ids[0, :6]
    with torch.no_grad():
        own = student(input_ids=prompt[None]).logits[0, -1]
    want = torch.softmax(own.float() / 0.5, -1)
    torch.testing.assert_close(seen[0][0], want, rtol=1e-5, atol=1e-7)
    at_kd_t = LMTask(student, teacher, temperature=2.0, probe=False)(batches[0], "sum")
    at_sample_t = LMTask(student, teacher, temperature=0.5, probe=False)(batches[0], "sum")
    assert float(out.loss.detach()) == pytest.approx(float(at_kd_t.loss.detach()), rel=1e-6)
    assert abs(float(at_sample_t.loss.detach()) - float(at_kd_t.loss.detach())) > 1e-3


def test_padded_vocab_rows_are_minus_infinity_not_zero():
    """Liger pads the smaller head's logits with zeros, so the student puts mass on ids no
    text has (LM-ANCHORS finding 7); TRL raises (huggingface/trl#3028), torchtune crashes
    (meta-pytorch/torchtune#2119). kdkit slices both heads to the real vocabulary: padded rows
    get probability 0 on both sides."""
    g = torch.Generator().manual_seed(0)
    v, pad = 40, 8
    hs, ht = torch.randn(20, 16, dtype=torch.float64, generator=g), torch.randn(20, 24, generator=g)
    ws = torch.randn(v, 16, dtype=torch.float64, generator=g)
    wt = torch.randn(v + pad, 24, generator=g).double()
    wt[v:] *= 5  # padded rows with large logits: any leak shows
    out = token_divergence(hs, ws, DenseTeacher(ht.double(), wt), vocab_size=v)
    s, t = hs @ ws.T, ht.double() @ wt[:v].T
    want = divergence_value("fkl", torch.log_softmax(s, -1), torch.log_softmax(t, -1)).mean()
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-12)
    zeros = torch.cat([s, torch.zeros(20, pad, dtype=s.dtype)], 1)  # Liger's padding
    full_t = ht.double() @ wt.T
    liger = divergence_value("fkl", torch.log_softmax(zeros, -1), torch.log_softmax(full_t, -1))
    assert abs(float(liger.mean()) - float(want)) > 1e-2


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ignore_index_holds_in_every_divergence(divergence):
    """Liger's JSD never applied ``ignore_index`` (linkedin/Liger-Kernel PR #974): prompt and
    padding tokens were trained. In kdkit a masked token (label -100) changes nothing, in every
    divergence, loss or gradient, whatever the two models say there."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 12, 8, 30
    hs = torch.randn(n, h, dtype=torch.float64, generator=g)
    ht, w = torch.randn(n, h, dtype=torch.float64, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 11]] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    results = []
    for noise in (0.0, 7.0):  # other values at the ignored positions only
        x = hs.clone()
        x[~mask] += noise
        y = ht.clone()
        y[~mask] -= noise
        x.requires_grad_()
        out = token_divergence(
            x, w.double(), DenseTeacher(y, w.double()), divergence=divergence, mask=mask,
            labels=labels, ce_weight=0.3, temperature=1.5,
        )  # fmt: skip
        out.loss.backward()
        results.append((float(out.loss.detach()), x.grad[mask].clone(), x.grad[~mask].clone()))
    (a, ga, za), (b, gb, zb) = results
    assert a == pytest.approx(b, rel=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert not za.any() and not zb.any()


def test_soft_capping_and_logit_scales_are_part_of_the_target():
    """TRL's Liger path ignored Gemma's soft-capping and Cohere's ``logit_scale``
    (huggingface/trl PR #6629); Axolotl's cut-cross-entropy Gemma 2 path never enabled the
    soft-cap (apple/ml-cross-entropy#48). A soft-capped Gemma 2 teacher distilled into a scaled
    Cohere student: kdkit's loss and gradient are those of the two models' own logits."""
    teacher, student = build("gemma2", seed=0), build("cohere", seed=1)
    ids = _ids(12, 8)
    batch = Aligner(pad_id=0, max_length=16)([TokenRow.of(ids)])
    out = LMTask(student, teacher, probe=False)(batch, "mean")
    out.loss.backward()
    got = student.lm_head.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = teacher(input_ids=torch.tensor([ids])).logits[0, :-1]
    s = student(input_ids=torch.tensor([ids])).logits[0, :-1]
    want = divergence_value("fkl", torch.log_softmax(s, -1), torch.log_softmax(t, -1)).mean()
    want.backward()
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    torch.testing.assert_close(got, student.lm_head.weight.grad, rtol=1e-5, atol=1e-9)
    student.zero_grad(set_to_none=True)


def test_top_k_is_taken_after_the_full_softmax(lm_tokenizer, tmp_path):  # noqa: F811
    """Axolotl found its top-k-before-softmax KD "mostly incorrect" (axolotl-ai-cloud/axolotl
    PR #2700); maxtext compared a top-k-renormalized teacher with a full-vocabulary student
    (AI-Hypercomputer/maxtext PR #4056). kdkit's cache stores full-vocabulary log-probs of the
    top k and the exact mass outside them, and its default ``bucket`` tail compares the same
    k + 1 buckets on both sides: with k = V it is the dense KL."""
    from kdkit.lm.cache import TopKCache
    from kdkit.lm.cache.capture import Provenance, capture

    student, teacher = build("llama", seed=1), build("llama", seed=0)
    row = TokenRow.of(_ids(15, 9))
    prov = Provenance("test:llama", "0" * 64, "float64", 320, "torch fp32", {})
    for k in (8, 320):
        out_dir = tmp_path / f"k{k}"
        capture(
            teacher, [row], Aligner(pad_id=0, max_length=16), out_dir, tokenizer=lm_tokenizer,
            provenance=prov, topk=k, encoding="f16", progress=False,
        )  # fmt: skip
        cache = TopKCache(out_dir)
        ids, logp, tail = (torch.from_numpy(a).double() for a in cache.entries(row))
        with torch.no_grad():
            full = torch.log_softmax(teacher(input_ids=row.input_ids[None]).logits[0, :-1], -1)
        want = full.gather(1, ids.long())
        assert ((logp - want).abs() <= 1e-3 * want.abs() + 1e-3).all()  # f16, not renormalized
        mass = torch.logaddexp(torch.logsumexp(logp, 1), tail)
        assert mass.abs().max() < 2e-3  # top k + tail = the whole distribution
        if k == 320:
            batch = cache.collate(Aligner(pad_id=0, max_length=16))([row])
            out = LMTask(student, cache, probe=False)(batch, "mean")
            dense = _own_fkl(student, teacher, row.input_ids.tolist(), list(range(14)))
            assert float(out.kl) == pytest.approx(float(dense), abs=2e-3)


def test_a_chat_template_that_writes_bos_gives_one_bos(lm_tokenizer_dir):  # noqa: F811
    """Rendering a template that writes ``{{ bos_token }}`` to text and tokenizing it again adds
    a second BOS (OpenRLHF/OpenRLHF#393; TRL made BOS configurable for it, huggingface/trl PR
    #1114). kdkit tokenizes a rendered chat once, without the tokenizer's own specials."""
    import json
    from pathlib import Path

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.tokenizer import CHATML_TEMPLATE

    base = PreTrainedTokenizerFast.from_pretrained(str(lm_tokenizer_dir), local_files_only=True)
    bos = base.bos_token
    inner = base.backend_tokenizer
    inner.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, base.bos_token_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token=bos, eos_token=base.eos_token,
        pad_token=base.pad_token, chat_template="{{ bos_token }}" + CHATML_TEMPLATE,
    )  # fmt: skip
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    naive = tok(tok.apply_chat_template(chat, tokenize=False))["input_ids"]
    assert naive[:2] == [tok.bos_token_id] * 2  # the anchors' trap, with this tokenizer
    path = Path(lm_tokenizer_dir).parent / "chat.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n")
    data = load_lm_dataset([str(path)], tok, format="chat", loss_on="assistant", max_length=64)
    ids = data.rows[0].input_ids.tolist()
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_truncation_that_removes_every_completion_token_is_never_a_nan(lm_tokenizer, tmp_path):  # noqa: F811
    """A prompt longer than ``max_length`` leaves a row with every label -100, and the loss is
    NaN (huggingface/trl PR #5826, for #5662; ms-swift fixed its GKD truncation in
    modelscope/ms-swift PR #9716). kdkit drops such a row when it reads the data (counted),
    refuses data where every row is such a row, and refuses a batch with nothing to train."""
    import json

    from kdkit.lm.data import load_lm_dataset

    long_prompt = " ".join(["distillation"] * 40)
    path = tmp_path / "pc.jsonl"
    records = [{"prompt": long_prompt, "completion": " ok"}, {"prompt": "a", "completion": " b c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kw = dict(format="prompt_completion", loss_on="completion", max_length=16)
    with pytest.raises(KDError, match="trainable tokens"):  # the default: refused, counted
        load_lm_dataset([str(path)], lm_tokenizer, **kw)
    kw["truncation"] = "right"  # accepted on purpose: the row without a target goes
    data = load_lm_dataset([str(path)], lm_tokenizer, **kw)
    assert len(data) == 1 and data.description["dropped_documents"] == 1
    path.write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(KDError, match="every token is masked"):
        load_lm_dataset([str(path)], lm_tokenizer, **kw)
    row = TokenRow.of(_ids(6), [False] * 6)  # a hand-made row with nothing to train
    with pytest.raises(KDError, match="every token of this batch is masked"):
        LMTask(tiny_llama(seed=2), tiny_llama(seed=1), probe=False)(
            Aligner(pad_id=0, max_length=8)([row])
        )
