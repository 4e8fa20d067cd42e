"""The teacher beside the student (kdkit/train/overlap.py): the same weights as the sequential
loop, for every kind of teacher work; exact resume; the split chosen and recorded.

Equality is bitwise on CPU: the overlapped split ``1+1`` runs the student on one thread, so it
is compared with the sequential loop on one thread. Timings are never asserted: the clock is
replaced where the choice logic is checked.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import blob_tensors, quadrant_net
from torch import nn

from kdkit import Distiller, FeatureMSE, KDError, SoftTargetKL, Trainer
from kdkit.data import ArrayDataset, FastLoader, ViewSampler
from kdkit.data.pipeline import InputPipeline
from kdkit.load import load_checkpoint
from kdkit.teachers import autotune
from kdkit.train import overlap
from kdkit.train.overlap import Split, TeacherWorker, choose_split, split_candidates

HERE = Path(__file__).parent
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the teacher's own stream (overlap 'stream') exists only there",
)


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def student_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),  # draws from the global RNG in every step: the order must not move
        nn.Linear(16, 4),
    )


def teacher_net() -> nn.Module:
    torch.manual_seed(1)
    return quadrant_net(8)


def data(n: int = 96) -> ArrayDataset:
    x, y = blob_tensors(n)
    y[::3] = -1  # a third unlabeled
    return ArrayDataset(x, y)


def train(teacher, pairs, option, *, threads, views=None, epochs=1, device="cpu"):
    """The student's weights after ``epochs`` with ``overlap=option`` on ``threads`` threads."""
    torch.set_num_threads(threads)
    student = student_net()
    ds = data()
    trainer = Trainer(
        Distiller(student, teacher, pairs),
        FastLoader(ds, 16, seed=3),
        epochs=epochs,
        inputs=InputPipeline(views, (0.5,), (0.25,), dataset=ds),
        device=device,
        progress=False,
        overlap=option,
    )
    trainer.fit()
    assert torch.get_num_threads() == threads  # the loop gives the budget back
    return student.state_dict(), trainer


def assert_same(a: dict, b: dict) -> None:
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise


PAD = {"crop": "pad", "pad": 2, "size": 8}


@pytest.mark.parametrize(
    "case",
    ["logits", "features", "mixup"] + (["onnx"] if HAS_ORT else []),
)
def test_overlapped_run_ends_with_the_sequential_weights(case):
    def pairs():  # each run its own (a FeatureMSE adapter is a trained parameter)
        if case == "features":  # a teacher layer through its hooks, a lazy adapter
            return {("", ""): SoftTargetKL(2.0), ("4", "3"): FeatureMSE()}
        return SoftTargetKL(temperature=2.0)

    views = ViewSampler(seed=5, **PAD)
    teacher = teacher_net()
    if case == "mixup":  # partners fetched from the pool, the same mixed view for both
        views = ViewSampler(seed=5, mixup=0.5, cutmix=0.5, **PAD)
    if case == "onnx":  # ONNX Runtime: its session follows the calling thread's count
        from kdkit.teachers import OnnxTeacher

        teacher = OnnxTeacher(teacher, input_shape=(1, 8, 8))
    sequential, t0 = train(teacher, pairs(), False, threads=1, views=views)
    overlapped, t1 = train(teacher, pairs(), "1+1", threads=2, views=views)
    assert t0.choices[-1].value == "off" and t1.choices[-1].value == "1+1"
    assert_same(sequential, overlapped)


def test_cached_teacher_replay_overlapped(tmp_path):
    from kdkit.cache import CachedTeacher, precompute

    views = ViewSampler(seed=5, num_views=2, **PAD)
    cache = precompute(
        teacher_net(), data(), tmp_path / "cache", views=views, dtype="fp32", mean=(0.5,),
        std=(0.25,), batch_size=32, progress=False,
    )  # fmt: skip
    teacher = CachedTeacher(cache, expect_views=views)
    sequential, _ = train(teacher, SoftTargetKL(2.0), False, threads=1, views=views, epochs=2)
    overlapped, _ = train(teacher, SoftTargetKL(2.0), "1+1", threads=2, views=views, epochs=2)
    assert_same(sequential, overlapped)


def test_killed_overlapped_run_resumes_to_the_sequential_weights(tmp_path):
    """SIGKILL mid-epoch while the worker computes the next batch's teacher; resumed, the
    overlapped run ends where the sequential run, never interrupted, ends."""
    job = [sys.executable, str(HERE / "_resume_job.py")]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    ref, resumed = tmp_path / "ref.pt", tmp_path / "resumed.pt"
    run = functools.partial(subprocess.run, env=env, timeout=300)
    run([*job, str(tmp_path / "a"), str(ref), "-1", "0", "off"], check=True)
    killed = run([*job, str(tmp_path / "b"), str(resumed), "10", "0", "1+1"])
    assert killed.returncode == -9
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["batch_in_epoch"] == 2 and state["choices"]["train.overlap"]["value"] == "1+1"
    run([*job, str(tmp_path / "b"), str(resumed), "-1", "1", "1+1"], check=True)
    a, b = torch.load(ref, weights_only=True), torch.load(resumed, weights_only=True)
    assert_same(a, b)


def test_a_teacher_error_in_the_worker_reaches_the_step():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 must have the same dtype")

    with pytest.raises(KDError, match="the teacher cannot run on this batch"):
        train(Broken(), SoftTargetKL(), "1+1", threads=2)


def test_the_worker_has_its_own_threads_and_the_callers_autocast():
    worker = TeacherWorker(torch.device("cpu"), threads=1)
    try:
        torch.set_num_threads(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = worker.submit(
                lambda: (torch.get_num_threads(), torch.is_autocast_enabled("cpu"))
            ).result()
        assert got == (1, True) and torch.get_num_threads() == 2
    finally:
        worker.close()


def test_splits_and_candidates():
    assert Split.parse("1+3") == Split(1, 3) and Split.parse("off").name == "off"
    assert Split.parse("stream").overlapped and not Split.parse("off").overlapped
    with pytest.raises(KDError, match="'T\\+S'"):
        Split.parse("0+2")
    cpu = torch.device("cpu")
    assert split_candidates(cpu, 1, "auto")[0] == ["off"]
    assert split_candidates(cpu, 2, "auto")[0] == ["off", "1+1"]
    assert split_candidates(cpu, 8, "auto")[0] == ["off", "1+7", "4+4"]
    assert split_candidates(cpu, 1, True)[0] == ["1+1"]
    assert split_candidates(torch.device("cuda"), 4, "auto")[0] == ["off", "stream"]
    with pytest.raises(KDError, match="overlap split"):
        Trainer(Distiller(student_net(), None), FastLoader(data(), 16), overlap="2x2")


def fake_clock(monkeypatch, table):
    def measure(label, fn, device):
        fn()  # the candidate must run
        return table.get(label, 1.0)  # the memory format (channels_last=...) ties: false

    monkeypatch.setattr(autotune, "measure", measure)


def example_task():
    d = Distiller(student_net(), teacher_net(), SoftTargetKL())
    x, y = blob_tensors(16)
    return d, InputPipeline(None, (0.5,), (0.25,))((x, y, torch.arange(16)))


def test_auto_keeps_overlap_only_when_clearly_faster_and_restores_the_task(monkeypatch):
    monkeypatch.setenv("KDKIT_AUTOTUNE", "on")
    torch.set_num_threads(2)
    d, example = example_task()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    rng = torch.get_rng_state()
    fake_clock(monkeypatch, {"off": 1.0, "1+1": 0.97})
    choice = choose_split(d, example, device=torch.device("cpu"))
    assert choice.value == "off" and set(choice.seconds) == {"off", "1+1"}  # within the margin
    fake_clock(monkeypatch, {"off": 1.0, "1+1": 0.6})
    assert choose_split(d, example, device=torch.device("cpu")).value == "1+1"
    assert_same(before, d.state_dict())  # BatchNorm statistics included
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == 2
    assert all(p.grad is None for p in d.parameters())


def test_auto_does_not_measure_without_a_teacher_or_a_second_thread(monkeypatch):
    def measure(label, fn, device):
        raise AssertionError(f"measured {label}")

    monkeypatch.setattr(autotune, "measure", measure)
    torch.set_num_threads(2)
    d, example = example_task()
    cpu = torch.device("cpu")
    no_teacher = choose_split(Distiller(student_net(), None), example, device=cpu)
    assert no_teacher.value == "off" and "no teacher" in no_teacher.skipped["overlap"]
    monkeypatch.setenv("KDKIT_AUTOTUNE", "off")
    assert choose_split(d, example, device=cpu).value == "off"
    monkeypatch.setenv("KDKIT_AUTOTUNE", "on")
    torch.set_num_threads(1)
    assert "1 thread" in choose_split(d, example, device=cpu).skipped["overlap"]
    recorded = {"value": "1+1", "seconds_per_batch": {}, "skipped": {}}
    assert choose_split(d, example, device=cpu, recorded=recorded).value == "1+1"


@pytest.mark.skipif(not HAS_ORT, reason="needs onnxruntime")
def test_api_auto_teacher_settles_on_the_first_batch_and_resume_keeps_it(tmp_path, monkeypatch):
    """make_teacher(module, backend="auto", calibration=...) needs no input_shape=: the
    Trainer's first batch decides, the bare calibration set is drawn through the run's views
    and normalisation, and the choice goes into the checkpoint (resume rebuilds it)."""
    import kdkit
    from kdkit.teachers import AutoTeacher, OnnxTeacher

    monkeypatch.setenv("KDKIT_AUTOTUNE", "on")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the ONNX export cache
    torch.set_num_threads(1)
    ds = data()
    seen = []

    def measure(label, fn, device):
        fn()
        seen.append(label)
        return {"torch": 0.3, "onnx": 0.1, "onnx-int8": 0.2}.get(label, 1.0)  # formats tie

    monkeypatch.setattr(autotune, "measure", measure)
    teacher = kdkit.make_teacher(teacher_net().eval(), backend="auto", calibration=ds)
    assert isinstance(teacher, AutoTeacher) and teacher.chosen is None
    views = ViewSampler(seed=5, **PAD)

    def trainer(epochs):
        return Trainer(
            Distiller(student_net(), teacher, SoftTargetKL()), FastLoader(ds, 16, seed=3),
            epochs=epochs, inputs=InputPipeline(views, (0.5,), (0.25,), dataset=ds),
            device="cpu", progress=False, checkpoint_dir=tmp_path / "run",
        )  # fmt: skip

    trainer(1).fit()
    assert isinstance(teacher.chosen, OnnxTeacher)
    assert seen == ["torch", "onnx", "onnx-int8", "channels_last=false", "channels_last=true"]
    assert teacher.calibration is ds  # completed per run, not replaced
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["choices"]["teacher.backend"]["value"] == "onnx"
    assert state["choices"]["train.channels_last"]["value"] is False  # the API measures it too
    teacher.chosen, teacher.choice, seen[:] = None, None, []  # a new process: nothing settled
    trainer(2).fit(resume=True)
    assert isinstance(teacher.chosen, OnnxTeacher) and seen == []  # rebuilt, not measured


def test_overlap_config_key(tmp_path):
    from kdkit.config import load_config
    from kdkit.train.options import loop_options

    base = {
        "student": {"model": "kdkit:fmnist_student"},
        "data": {"train": {"fashion_mnist": "train"}},
    }
    for value in ("auto", True, False):
        cfg = load_config(data={**base, "train": {"overlap": value}})
        assert loop_options(cfg.train).overlap == value
    with pytest.raises(KDError, match="train.overlap"):
        load_config(data={**base, "train": {"overlap": "sometimes"}})


def test_the_loop_closes_its_worker_when_a_step_fails(monkeypatch):
    torch.set_num_threads(2)
    opened = []
    real = overlap.TeacherWorker

    class Counted(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opened.append(self)

    monkeypatch.setattr(overlap, "TeacherWorker", Counted)

    def stop(trainer, out):
        if trainer.step == 2:
            raise RuntimeError("stop here")

    d = Distiller(student_net(), teacher_net(), SoftTargetKL())
    tr = Trainer(d, FastLoader(data(), 16), progress=False, overlap="1+1", callbacks=[stop])
    with pytest.raises(RuntimeError, match="stop here"):
        tr.fit()
    assert opened and all(w._pool._shutdown for w in opened)
    assert torch.get_num_threads() == 2


@CUDA
def test_stream_worker_waits_for_its_input_and_the_reader_waits_for_it():
    """No host sync: the worker's stream waits for the input's event, the caller's stream for
    the worker's. The input is still being written on the caller's stream when it is submitted."""
    dev = torch.device("cuda")
    worker = TeacherWorker(dev)
    try:
        x = torch.ones(1024, 1024, device=dev)
        for _ in range(20):  # queued work on the caller's stream, not finished at submit
            x = x @ torch.eye(1024, device=dev) + 1
        got = worker.submit(lambda: x.sum()).result() * 1  # read on the caller's stream
        assert worker._stream is not None and float(got) == float(x.sum())
    finally:
        worker.close()


@CUDA
def test_stream_overlap_on_cuda_matches_the_sequential_run(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    views = ViewSampler(seed=5, **PAD)
    pairs = {("", ""): SoftTargetKL(2.0), ("4", "3"): FeatureMSE()}
    sequential, t0 = train(teacher_net(), pairs, False, threads=1, views=views, device="cuda")
    pairs = {("", ""): SoftTargetKL(2.0), ("4", "3"): FeatureMSE()}
    overlapped, t1 = train(teacher_net(), pairs, "stream", threads=1, views=views, device="cuda")
    assert t1.choices[-1].value == "stream"
    for k in sequential:
        torch.testing.assert_close(sequential[k], overlapped[k], rtol=1e-5, atol=1e-6)


def test_a_run_from_before_overlap_resumes_sequential(tmp_path, monkeypatch):
    """A checkpoint without recorded choices ran the teacher before the student: resumed
    with ``overlap: auto`` on two threads it stays so (not measured: a split would change the
    student's thread count mid-run); an explicit split still wins."""
    from kdkit.load import checksum

    monkeypatch.setenv("KDKIT_AUTOTUNE", "on")
    fake_clock(monkeypatch, {"off": 1.0, "1+1": 0.1})
    torch.set_num_threads(2)

    def trainer(epochs, option="auto"):
        d = Distiller(student_net(), teacher_net(), SoftTargetKL())
        return Trainer(
            d, FastLoader(data(), 16, seed=3), epochs=epochs, device="cpu", progress=False,
            checkpoint_dir=tmp_path / "run", overlap=option,
        )  # fmt: skip

    first = trainer(1)
    first.fit()
    assert first.choices[-1].value == "1+1"  # measured: the fake clock favours it
    path = tmp_path / "run" / "last.pt"
    state = load_checkpoint(path)
    del state["choices"]  # as written before train.overlap
    state["checksum"] = checksum(state)
    torch.save(state, path)
    resumed = trainer(2)
    resumed.fit(resume=True)
    assert resumed.choices[-1].value == "off" and not resumed.choices[-1].measured
    explicit = trainer(3, "1+1")
    explicit.fit(resume=True)
    assert explicit.choices[-1].value == "1+1"


def test_a_step_that_runs_its_own_teacher_has_nothing_beside_it():
    """Where a batch's input carries no started teacher (distillation off when it was made,
    on at its step), the step runs the teacher itself: the next batch's starts after it."""
    from types import SimpleNamespace

    from kdkit.teachers.autotune import Choice

    events = []

    class Task:
        def teacher_ahead(self, batch, worker):
            events.append(f"start {batch}")
            started = None if batch % 2 else worker.submit(lambda: batch)
            return SimpleNamespace(teacher=started)

    ov = overlap.Overlap("1+1", torch.device("cpu"))
    ov.choice = Choice(overlap.KEY, "1+1")
    for batch, _ in ov.batches(range(5), lambda b: b, Task(), contextlib.nullcontext):
        events.append(f"step {batch}")
    assert events == [
        "start 0", "start 1", "step 0",  # 0's teacher started: 1's beside its step
        "step 1", "start 2",  # 1 runs its own: 2 starts after it
        "start 3", "step 2", "step 3", "start 4", "step 4",
    ]  # fmt: skip


def test_distillation_starting_later_overlapped_ends_with_the_sequential_weights():
    """LossBalancer(start_epoch=1) with a feature pair: the first batches of epoch 1 were made
    while distillation was off, so their steps run the teacher themselves (never beside the
    worker: the teacher's hooks are shared)."""
    from kdkit import LossBalancer

    def distiller(teacher):
        pairs = {("", ""): SoftTargetKL(2.0), ("4", "3"): FeatureMSE()}
        return Distiller(student_net(), teacher, pairs, LossBalancer(start_epoch=1))

    def run(option, threads):
        torch.set_num_threads(threads)
        d = distiller(teacher_net())
        tr = Trainer(
            d, FastLoader(data(), 16, seed=3), epochs=2, device="cpu", progress=False,
            overlap=option,
        )  # fmt: skip
        tr.fit()
        return d.state_dict()

    assert_same(run(False, 1), run("1+1", 2))
