"""Every model family right: kdkit's LM path against each model's own ``forward(...).logits``.

For each family of ``_lm_families.FAMILIES`` (tiny random-init configs of the installed
transformers, float64), as teacher and as student of the same family, on plain (padded) and
packed rows (documents longer than the 4-token sliding windows):

- the fused loss and the student's gradients equal a float64 reference built from the two
  models' own logits, each document run alone (so packing, the after-head transform, tied
  heads, head biases and windows are all in the comparison);
- ``evaluate`` gives the perplexity of the student's own logits;
- the logits probe passes, and families that cannot pack are refused by name;
- ``kdkit lm capture`` stores the log-probabilities of the teacher's own logits;
- a MoE student's router loss is the model's own ``aux_loss``.

And the probe refuses a model that transforms its logits in a way kdkit does not know.
"""

from __future__ import annotations

import pytest
import torch
from _lm_families import FAMILIES, MOE, TRANSFORMED, VOCAB, build
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir  # noqa: F401

from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.data import TokenRow
from kdkit.lm.divergence import divergence_value
from kdkit.lm.logits import output_transform
from kdkit.lm.packing import CANNOT_PACK
from kdkit.lm.probe import probe_model
from kdkit.lm.task import LMTask

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(FAMILIES)
T, CE_WEIGHT = 2.0, 0.25


@pytest.fixture(scope="module")
def models():
    """``models(name) -> (teacher, student)``, built once per family for the module."""
    built: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def get(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        if name not in built:
            built[name] = (build(name, seed=0), build(name, seed=1))
        return built[name]

    return get


def _docs(packed: bool) -> list[list[list[int]]]:
    """Token ids, per row, per document: two rows of different lengths (so one is padded, by
    fewer tokens than the window: a float64 model's eager attention turns a query that sees
    only padding into NaN, a transformers float32-softmax artifact); packed, the first row holds
    two documents, each longer than the 4-token window."""
    g = torch.Generator().manual_seed(7)

    def doc(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [[doc(9), doc(8)], [doc(6)]] if packed else [[doc(13)], [doc(11)]]


def _batch(rows: list[list[list[int]]]):
    token_rows = [
        TokenRow.of(sum(docs, []), doc_ids=sum(([d] * len(x) for d, x in enumerate(docs)), []))
        for docs in rows
    ]
    return Aligner(pad_id=0, max_length=24)(token_rows)


def _reference(student, teacher, rows):
    """Float64 loss from the models' own logits, each document alone: ``(1 - w) T^2 fkl +
    w CE``, token means over every next-token target (the batch's trained positions)."""
    s_all, t_all, labels = [], [], []
    for docs in rows:
        for d in docs:
            ids = torch.tensor([d])
            s_all.append(student(input_ids=ids).logits[0, :-1])
            with torch.no_grad():
                t_all.append(teacher(input_ids=ids).logits[0, :-1])
            labels.append(ids[0, 1:])
    s, t, y = torch.cat(s_all), torch.cat(t_all), torch.cat(labels)
    lq, lp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    kd = divergence_value("fkl", lq, lp).mean() * T * T
    ce = torch.nn.functional.cross_entropy(s, y)
    return (1 - CE_WEIGHT) * kd + CE_WEIGHT * ce, ce


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_loss_and_gradients_equal_the_models_own_logits(models, name, packed):
    teacher, student = models(name)
    rows = _docs(packed)
    batch = _batch(rows)
    assert batch.packed == packed
    task = LMTask(
        student,
        teacher,
        temperature=T,
        ce_weight=CE_WEIGHT,
        probe=False,
        router_aux_loss=False,
        packed=packed,
    )
    if packed and name in CANNOT_PACK:
        with pytest.raises(
            KDError, match=f"data.pack: true cannot be used with the student \\({name}"
        ):
            task(batch, "mean")
        return
    student.zero_grad(set_to_none=True)
    out = task(batch, "mean")
    out.loss.backward()
    got = _grads(student)
    student.zero_grad(set_to_none=True)
    ref, ref_ce = _reference(student, teacher, rows)
    ref.backward()
    want = _grads(student)
    student.zero_grad(set_to_none=True)
    assert out.tokens == sum(len(d) - 1 for docs in rows for d in docs)
    # float64 models whose attention softmax runs in float32 (transformers' eager path)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert float(out.ce) == pytest.approx(float(ref_ce.detach()), rel=1e-6)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with torch.no_grad():  # kdkit eval: the perplexity of the student's own distribution
        assert task.evaluate([batch])["ppl"] == pytest.approx(
            float(ref_ce.detach().exp()), rel=1e-6
        )


@pytest.mark.parametrize("name", NAMES)
def test_the_probe_passes_every_family_and_refuses_packing_it_cannot_do(models, name):
    teacher, _ = models(name)
    ids = torch.tensor(_docs(False)[0][0])
    transform = output_transform(teacher)
    assert transform.identity == (name not in TRANSFORMED)
    plain = probe_model(teacher, ids, role="teacher")
    assert plain.max_abs_diff <= plain.tolerance and plain.family == name
    if name in CANNOT_PACK:
        with pytest.raises(
            KDError, match=f"data.pack: true cannot be used with the teacher \\({name}"
        ):
            probe_model(teacher, ids, role="teacher", packing=True)
    else:
        packed = probe_model(teacher, ids, role="teacher", packing=True)
        assert packed.packed_diff is not None and packed.packed_diff <= packed.tolerance


@pytest.mark.parametrize("name", NAMES)
def test_capture_stores_the_teachers_own_log_probs(models, name, lm_tokenizer, tmp_path):  # noqa: F811
    from kdkit.lm.cache import TopKCache
    from kdkit.lm.cache.capture import Provenance, capture

    teacher, _ = models(name)
    rows = _docs(name not in CANNOT_PACK)
    token_rows = [
        TokenRow.of(sum(docs, []), doc_ids=sum(([d] * len(x) for d, x in enumerate(docs)), []))
        for docs in rows
    ]
    provenance = Provenance(f"test:{name}", "0" * 64, "float64", VOCAB, "torch fp32", {})
    capture(
        teacher, token_rows, Aligner(pad_id=0, max_length=24), tmp_path / "cache",
        tokenizer=lm_tokenizer, provenance=provenance, topk=8, encoding="f16", progress=False,
    )  # fmt: skip
    cache = TopKCache(tmp_path / "cache")
    for docs, row in zip(rows, token_rows, strict=True):
        ids, logp, _ = (torch.from_numpy(a) for a in cache.entries(row))
        with torch.no_grad():
            own = torch.cat(
                [
                    torch.log_softmax(teacher(input_ids=torch.tensor([d])).logits[0, :-1], -1)
                    for d in docs
                ]
            )
        want = own.gather(1, ids.long())
        assert (logp.double() - want).abs().max() < 2e-3  # f16 storage
        assert torch.equal(ids[:, 0], own.argmax(-1))


@pytest.mark.parametrize("name", MOE)
def test_a_moe_students_router_loss_is_its_own(models, name):
    teacher, student = models(name)
    batch = _batch(_docs(False))
    task = LMTask(student, teacher, probe=False)
    assert task.router is not None and task.router.family == name
    out = task(batch, "mean")
    plain = LMTask(student, teacher, probe=False, router_aux_loss=False)(batch, "mean")
    own = student(
        input_ids=batch.input_ids, attention_mask=batch.padding_mask, output_router_logits=True
    ).aux_loss
    assert float(out.router_aux) == pytest.approx(float(own.detach()), rel=1e-9)
    coef = task.router.coef
    assert float((out.loss - plain.loss).detach()) == pytest.approx(
        coef * float(own.detach()), rel=1e-6
    )
    summed = task(batch, "sum")  # the step's sum: coef * aux per token
    assert float(summed.loss.detach()) == pytest.approx(
        float(out.loss.detach()) * out.tokens, rel=1e-9
    )


class _ScaledLlama(torch.nn.Module):
    """A Llama whose forward does something after its head that no config says."""

    def __init__(self, cap: float | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.inner, self.cap, self.scale = build("llama", seed=3), cap, scale
        self.config = self.inner.config

    def get_decoder(self):
        return self.inner.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        z = out.logits * self.scale
        out.logits = z if self.cap is None else self.cap * torch.tanh(z / self.cap)
        return out


@pytest.mark.parametrize(
    "after, words",
    [
        ({"scale": 3.0}, "its logits are kdkit's x 3 "),
        ({"cap": 1.5}, "a soft-cap kdkit does not know"),
    ],
    ids=["scale", "softcap"],
)
def test_the_probe_refuses_an_unknown_transform_before_any_step(after, words):
    from torch.utils.data import DataLoader

    from kdkit.lm.task import TokenInputs
    from kdkit.train import Trainer

    model = _ScaledLlama(**after)
    rows = [TokenRow.of(d) for docs in _docs(False) for d in docs]
    loader = DataLoader(rows, batch_size=2, collate_fn=Aligner(pad_id=0, max_length=24))
    task = LMTask(model, build("llama", seed=4))
    with pytest.raises(
        KDError, match="the student \\(llama, _ScaledLlama\\) transforms its logits"
    ):
        Trainer(task, loader, epochs=1, progress=False, device="cpu", inputs=TokenInputs())
    with pytest.raises(KDError, match=words):
        task.probe(rows[0])


def test_the_probe_catches_a_family_that_attends_across_packed_documents(models, monkeypatch):
    """GPT-OSS builds its masks without position_ids (transformers 5.23): were it not in the
    refusal table, the probe's packed row would still refuse it before any step."""
    teacher, _ = models("gpt_oss")
    monkeypatch.delitem(CANNOT_PACK, "gpt_oss")
    with pytest.raises(KDError, match="gpt_oss\\): a document in a packed row attends outside"):
        probe_model(teacher, torch.tensor(_docs(False)[0][0]), role="teacher", packing=True)
