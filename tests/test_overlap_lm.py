"""The LM task's teacher beside the student (kdkit/train/overlap.py, LMTask.teacher_ahead)
and the scratch baseline without a KD term (NoTeacher), issue 39."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit import Trainer


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_lm_live_teacher_overlapped_and_the_scratch_baseline():
    pytest.importorskip("transformers")
    from _lm_fixtures import tiny_llama

    from kdkit.lm import Aligner, LMTask, TokenInputs
    from kdkit.lm.data import TokenRow
    from kdkit.lm.hidden import LayerPair

    g = torch.Generator().manual_seed(0)
    rows = [
        TokenRow.of(torch.randint(3, 64, (int(n),), generator=g).tolist())
        for n in torch.randint(8, 24, (24,), generator=g)
    ]

    def run(option, threads, teacher=True, layer_pairs=()):
        torch.set_num_threads(threads)
        student = tiny_llama(seed=1)
        teacher_lm = tiny_llama(seed=2, num_hidden_layers=3) if teacher else None
        task = LMTask(student, teacher_lm, probe=False, layer_pairs=layer_pairs)
        loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=Aligner(0, 32))
        tr = Trainer(
            task, loader, inputs=TokenInputs("cpu"), device="cpu", progress=False,
            overlap=option,
        )  # fmt: skip
        tr.fit()
        return student.state_dict(), tr

    sequential, _ = run(False, 1)
    overlapped, tr = run("1+1", 2)
    assert tr.choices[-1].value == "1+1"
    for k in sequential:
        assert torch.equal(sequential[k], overlapped[k]), k  # bitwise
    _, scratch = run("auto", 2, teacher=False)  # nothing to run ahead: never measured
    assert scratch.choices[-1].value == "off"
    # hidden-state pairs catch the teacher's layers inside the step: its teacher stays there
    _, paired = run("auto", 2, layer_pairs=[LayerPair(0, 1)])
    assert "no teacher to run ahead" in paired.choices[-1].skipped["overlap"]
    assert "loss_kl" not in scratch.history[-1]  # no KD term, none reported


def test_scratch_target_gives_the_old_weight_zero_loss_and_gradients():
    """NoTeacher (no KD term) against the student as its own teacher at weight 0."""
    from kdkit.lm.fused import DenseTeacher, token_divergence
    from kdkit.lm.targets import NoTeacher

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(16, 50, bias=False).double()
    labels = torch.randint(0, 50, (40,), generator=g)
    labels[::7] = -100
    results = []
    for target in (NoTeacher((40,), 50), DenseTeacher(hidden.detach(), head.weight.detach())):
        out = token_divergence(
            hidden, head, target, labels=labels, ce_weight=1.0, reduction="sum",
            memory_budget_mb=0.05,
        )  # fmt: skip
        gh, gw = torch.autograd.grad(out.loss, (hidden, head.weight))
        results.append((out.loss, out.ce, gh, gw))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
