"""The teacher beside the student: the next batch's teacher runs while the student steps.

Sequentially, every step waits for the teacher's forward before the student's: on a 2-core CPU
the default ``kdkit train`` reached 59% of the student-alone ceiling at two threads, the rest
being the teacher on the critical path (issue 39, docs/benchmarks.md). Overlapped, the loop
makes the *next* batch's model input (its views drawn from (seed, epoch, index) as always, so
nothing changes but the time) and hands it to the task's :meth:`~kdkit.task.Task.teacher_ahead`
before stepping the current batch; the task submits its teacher's work to a
:class:`TeacherWorker` and the step waits for the result only when it needs it:

- on CPU, one worker thread with its own PyTorch thread count (per thread under OpenMP; ONNX
  Runtime's session follows the calling thread's count, and both release the GIL), the student
  keeping the rest of the budget: a :class:`Split` ``T+S``;
- on CUDA, the worker's own stream: the teacher's kernels wait for the input with an event and
  the student's stream waits for the teacher's with another, no host sync (``stream``);
- at most two batches in flight (the current one and the next); the autocast and grad mode of
  the caller are the worker's too.

Results do not depend on it: the teacher computes the same outputs for the same inputs, and
the student's step is the same step, so a run with the split ``1+1`` ends with the same
weights as the sequential run at one student thread and one teacher thread
(``tests/test_overlap.py``). Which split is fastest depends on the models and the machine, so
``overlap: auto`` measures each candidate on the run's first batch (:func:`choose_split`,
forward + backward, the task's state restored after) and keeps the sequential path unless an
overlapped one is :data:`~kdkit.teachers.autotune.MARGIN` faster; the choice is recorded
(``choices.json``, the checkpoint) and kept on resume: a split changes the student's thread
count, and with it the float summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from kdkit.errors import KDError

if TYPE_CHECKING:
    from kdkit.teachers.autotune import Choice

__all__ = [
    "Split",
    "TeacherWorker",
    "Pending",
    "Overlap",
    "choose_split",
    "plan_first_batch",
    "resumed_records",
    "split_candidates",
]

log = logging.getLogger(__name__)

KEY = "train.overlap"
_END = object()
#: what a run recorded before ``train.overlap`` existed ran: the teacher before the student
SEQUENTIAL = {"value": "off", "skipped": {"overlap": "a run from before train.overlap"}}


def resumed_records(records: dict[str, Any] | None) -> dict[str, Any]:
    """A resumed run's records with its split: the recorded one, or ``off`` for a run that
    has none (started before this option: measuring now could change its thread count and
    with it the float summation order of the rest of the run)."""
    records = dict(records or {})
    records.setdefault(KEY, SEQUENTIAL)
    return records


@dataclasses.dataclass(frozen=True)
class Split:
    """Who gets which threads: ``teacher`` threads for the worker (0: no worker, the teacher
    runs in the step), ``student`` threads for the loop's own thread (0: leave as is);
    ``stream`` runs the worker on its own CUDA stream."""

    teacher: int = 0
    student: int = 0
    stream: bool = False

    @property
    def overlapped(self) -> bool:
        return self.stream or self.teacher > 0

    @property
    def name(self) -> str:
        if self.stream:
            return "stream"
        return f"{self.teacher}+{self.student}" if self.overlapped else "off"

    @classmethod
    def parse(cls, name: str) -> Split:
        """``off``, ``stream`` or ``T+S`` (teacher and student threads)."""
        if name in ("off", "stream"):
            return cls(stream=name == "stream")
        t, plus, s = str(name).partition("+")
        if plus and t.isdigit() and s.isdigit() and int(t) >= 1 and int(s) >= 1:
            return cls(int(t), int(s))
        raise KDError(f"overlap split must be 'off', 'stream' or 'T+S' (threads), got {name!r}")


def split_candidates(device: torch.device, budget: int, option: Any) -> tuple[list[str], dict]:
    """The splits worth timing for a thread ``budget``, and why others are left out.
    ``option``: ``"auto"`` (sequential first), True (overlapped ones only)."""
    if device.type == "cuda":
        return (["stream"] if option is True else ["off", "stream"]), {}
    if budget < 2 and option != True:  # noqa: E712 (True, not a truthy string)
        return ["off"], {"overlap": f"{budget} thread: nothing to run beside the student"}
    teacher = sorted({1, budget // 2} & set(range(1, budget))) or [1]
    splits = [f"{t}+{max(budget - t, 1)}" for t in teacher]
    return (splits if option is True else ["off", *splits]), {}


class Pending:
    """A teacher result computed on the worker: :meth:`result` waits for it (on CUDA the
    caller's stream waits for the worker's, the host does not)."""

    def __init__(self, future: Any, device: torch.device) -> None:
        self._future, self._device, self._value = future, device, _END

    def result(self) -> Any:
        if self._value is _END:
            value, done = self._future.result()
            if done is not None:
                stream = torch.cuda.current_stream(self._device)
                stream.wait_event(done)
                for t in _tensors(value):  # used here now: not reused by the worker's stream
                    t.record_stream(stream)
            self._value = value
        return self._value


class TeacherWorker:
    """One thread that runs submitted calls in order: with ``threads`` PyTorch threads (CPU),
    on its own stream (CUDA). ``submit(fn)`` returns a :class:`Pending`."""

    def __init__(self, device: torch.device, threads: int = 0) -> None:
        self.device, self.threads = torch.device(device), threads
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, "kdkit-teacher", initializer=self._begin)

    def _begin(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's (OpenMP's count is per thread)

    def submit(self, fn: Callable[[], Any]) -> Pending:
        ready = None
        if self._stream is not None:  # the input was made on the caller's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        modes = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        modes = [(d, dt) for d, dt in modes if torch.is_autocast_enabled(d)]
        grad = torch.is_grad_enabled()
        return Pending(self._pool.submit(self._run, fn, modes, grad, ready), self.device)

    def _run(self, fn: Callable[[], Any], modes: list, grad: bool, ready: Any) -> tuple:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            for device_type, dtype in modes:  # the caller's autocast, in this thread too
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            if self._stream is None:
                return fn(), None
            stack.enter_context(torch.cuda.stream(self._stream))
            self._stream.wait_event(ready)
            value = fn()
            done = torch.cuda.Event()
            done.record(self._stream)
            return value, done

    def close(self) -> None:
        """Wait for the call running now (calls not started are dropped), end the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _started(inputs: Any) -> bool:
    """Whether ``inputs`` carries teacher work started on the worker."""
    return isinstance(getattr(inputs, "teacher", None), Pending)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class Overlap:
    """The loop's overlapped teacher: the ``overlap`` option, the split chosen for the run
    (:meth:`plan`), and :meth:`batches`, which the epoch loop iterates."""

    def __init__(self, option: Any, device: torch.device) -> None:
        self.option, self.device = option, torch.device(device)
        self.choice: Choice | None = None
        self._open: Iterator | None = None

    @property
    def split(self) -> Split:
        return Split.parse(self.choice.value) if self.choice is not None else Split()

    def plan(self, task: Any, example: Any, autocast: Callable, recorded: Any = None) -> Choice:
        """The split for this run: ``recorded`` (resume), or chosen on ``example``."""
        if self.choice is None or recorded is not None:
            self.choice = choose_split(
                task, example, autocast=autocast, device=self.device, option=self.option,
                recorded=recorded,
            )  # fmt: skip
        return self.choice

    def batches(
        self, raw: Iterable, prepare: Callable, task: Any, autocast: Callable
    ) -> Iterator[tuple[Any, Any]]:
        """``(batch, input)`` pairs; overlapped, each next batch's input is made and its teacher
        started (``task.teacher_ahead``) before the current pair is yielded. Sequential, the
        input is None (the step makes it)."""
        split = self.split
        if not split.overlapped:
            return ((b, None) for b in raw)
        self.close()
        self._open = self._ahead(raw, prepare, task, autocast, split)
        return self._open

    def _ahead(self, raw, prepare, task, autocast, split: Split) -> Iterator[tuple[Any, Any]]:
        worker = TeacherWorker(self.device, split.teacher)
        budget = torch.get_num_threads()

        def start(batch: Any) -> Any:
            inputs = prepare(batch)
            with autocast():
                return task.teacher_ahead(inputs, worker)

        try:
            if split.student:
                torch.set_num_threads(split.student)
            batches = iter(raw)
            current = next(batches, _END)
            inputs = start(current) if current is not _END else None
            while current is not _END:
                upcoming = next(batches, _END)
                # a step with no teacher started for it (e.g. distillation starting at this
                # epoch) runs its teacher itself: the next one starts after it, never beside
                # it (a teacher's feature hooks and an ONNX session are not for two threads)
                beside = upcoming is not _END and _started(inputs)
                following = start(upcoming) if beside else None
                yield current, inputs
                if upcoming is not _END and not beside:
                    following = start(upcoming)
                current, inputs = upcoming, following
        finally:  # also when the loop stopped early: the worker's last calls end first
            worker.close()
            torch.set_num_threads(budget)

    def close(self) -> None:
        """End an epoch's overlapped batches that were not run to the end."""
        if self._open is not None:
            self._open.close()
            self._open = None


@contextlib.contextmanager
def _restored(task: Any, device: torch.device) -> Iterator[None]:
    """Weights, buffers (BatchNorm statistics), gradients and RNG as they were."""
    saved = {k: v.detach().clone() for k, v in task.state_dict().items()}
    grads = [(p, p.grad) for p in task.parameters()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for k, v in task.state_dict().items():
                v.copy_(saved[k])
        for p, g in grads:
            p.grad = g


def _timed_steps(task: Any, example: Any, autocast: Callable, split: Split, device):
    """``(step, stop)``: one training step's forward + backward as the split runs it."""
    if not split.overlapped:

        def step() -> None:
            with autocast():
                out = task.step(example)
            out.loss.backward()

        return step, lambda: None
    worker = TeacherWorker(device, split.teacher)
    budget = torch.get_num_threads()
    if split.student:
        torch.set_num_threads(split.student)
    with autocast():
        queue = [task.teacher_ahead(example, worker)]

    def step() -> None:  # steady state: the next batch's teacher beside this step
        with autocast():
            queue.append(task.teacher_ahead(example, worker))
            out = task.step(queue.pop(0))
        out.loss.backward()

    def stop() -> None:
        worker.close()
        torch.set_num_threads(budget)

    return step, stop


class _Probe:
    """A worker that runs nothing: whether the task has teacher work to run ahead."""

    threads, device, submitted = 0, torch.device("cpu"), False

    def submit(self, fn: Callable[[], Any]) -> Any:
        self.submitted = True
        return None


def choose_split(
    task: Any,
    example: Any,
    *,
    autocast: Callable = contextlib.nullcontext,
    device: torch.device,
    option: Any = "auto",
    recorded: dict[str, Any] | None = None,
) -> Choice:
    """``overlap``'s split for ``task`` on ``example`` (a model input, as the step gets it):
    the split ``option`` names, off (``option`` False), ``recorded`` (resume), off (nothing to
    run ahead, one thread, ``KDKIT_AUTOTUNE=off``), or the fastest candidate of
    :func:`split_candidates`."""
    # the teachers floor, imported here: kdkit.Trainer loads no teacher backend (front hall)
    from kdkit.teachers import autotune
    from kdkit.teachers.autotune import Choice

    if isinstance(option, str) and option != "auto":  # a split by name: not measured
        return Choice(KEY, Split.parse(option).name, skipped={"auto": "the split was given"})
    if option is False:
        return Choice(KEY, "off", skipped={"overlap": "overlap: false"})
    if recorded is not None:  # what auto chose when the run started
        return Choice.recorded(KEY, recorded)
    probe = _Probe()
    task.teacher_ahead(example, probe)
    if not probe.submitted:
        return Choice(KEY, "off", skipped={"overlap": "no teacher to run ahead"})
    names, skipped = split_candidates(device, torch.get_num_threads(), option)
    if option == "auto" and not autotune.autotune_enabled():
        skipped.update({n: "KDKIT_AUTOTUNE=off" for n in names[1:]})
        names = names[:1]
    choice = Choice(KEY, names[0], skipped=skipped)
    if len(names) > 1:
        start = time.perf_counter()
        was_training = task.training
        task.train()
        with _restored(task, device):
            for name in names:
                step, stop = _timed_steps(task, example, autocast, Split.parse(name), device)
                try:
                    choice.seconds[name] = autotune.measure(name, step, device)
                finally:
                    stop()
        task.train(was_training)
        choice.value = autotune.pick_fastest(choice.seconds)
        choice.cost_s = time.perf_counter() - start
    log.info("%s", choice.line())
    return choice


def plan_first_batch(trainer: Any, recorded: dict[str, Any] | None = None) -> list[Choice]:
    """:meth:`kdkit.Trainer.plan`: the task's choices (``task.settle``: an ``auto`` teacher's
    backend) then the ``overlap`` split, on the first training batch as the step sees it (drawn
    with the RNG forked: a shuffling loader draws its order from it). Under torchrun, rank 0's
    choices are every rank's (every rank measures: a SyncBatchNorm step is collective)."""
    from kdkit.train import distributed

    if trainer.choices and not recorded:
        return trainer.choices
    choices = _plan(trainer, recorded)
    if distributed.is_distributed() and any(c.measured for c in choices):
        records = distributed.on_main(lambda: {c.key: c.to_dict() for c in choices})
        if not distributed.is_main():
            choices = _plan(trainer, records)
    return choices


def _plan(trainer: Any, recorded: dict[str, Any] | None) -> list[Choice]:
    device = trainer.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = next(iter(trainer.train_loader), None)
    if batch is None:
        raise KDError("the training loader yielded no batch")
    example = trainer.inputs(batch, trainer.epoch)
    autocast, recorded = trainer.precision.autocast, dict(recorded or {})
    task = trainer.task
    choices = task.settle(example, inputs=trainer.inputs, autocast=autocast, recorded=recorded)
    fmt, example = _memory_format(trainer, example, autocast, recorded)
    choices = [*choices, *fmt, trainer.overlap.plan(task, example, autocast, recorded.get(KEY))]
    trainer.choices = choices
    return choices


def _memory_format(trainer: Any, example: Any, autocast: Callable, recorded: dict) -> tuple:
    """An :class:`~kdkit.data.pipeline.InputPipeline` left at ``channels_last="auto"`` (the
    Python API's default) gets the memory format ``kdkit train`` would choose, measured on the
    same first batch (:func:`~kdkit.teachers.autotune.choose_channels_last`), so the API's
    default runs as fast as the CLI's. Returns ``([choice] or [], the example as the step will
    now see it)``."""
    inputs, student = trainer.inputs, getattr(trainer.task, "student", None)
    if getattr(inputs, "channels_last", None) != "auto":
        return [], example
    x = getattr(example, "x", None)
    if not isinstance(student, torch.nn.Module) or not isinstance(x, torch.Tensor):
        inputs.channels_last = False  # nothing to measure: the format stays as it was
        return [], example
    from kdkit.teachers.autotune import Choice, choose_channels_last
    from kdkit.train import distributed

    if distributed.is_distributed():  # DDP has wrapped the student: its layout is settled
        inputs.channels_last = False
        why = "under DDP pass channels_last=True or False to the InputPipeline"
        return [Choice("train.channels_last", False, skipped={"true": why})], example
    record = recorded.get("train.channels_last")
    choice = choose_channels_last(student, x, recorded=record, autocast=autocast)
    inputs.channels_last = bool(choice.value)
    if inputs.channels_last:
        student.to(memory_format=torch.channels_last)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            example = dataclasses.replace(example, x=x)
    return [choice], example
