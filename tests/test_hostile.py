"""Hostile-but-realistic inputs, one table row per case (issue 10: trust).

Every row runs one bad input (or one fault) and asserts its verdict:

- ``clear``: a :class:`KDError` (library) or exit code 2 with exactly one line on stderr and
  no traceback (CLI, run in-process through ``kdkit.cli.main``), whose message matches the
  row's pattern (it names the argument or file and the fix);
- ``correct``: the input is legitimate or recoverable and the result is right.

Anything else is a failure, classified as ``confusing`` (a raw exception or a message that
does not say what is wrong), ``silent`` (no error and a wrong result), ``crash`` (a CLI
traceback), ``late`` (the demo started its work before checking), ``loss`` (a good file
destroyed) or ``ran code`` (a file made kdkit run code it named). With ``KDKIT_HOSTILE_TALLY=path.json`` the verdicts are written there (used to count
main before and after the fixes).

Fixtures (tiny models and files) are built once for the module; the whole file runs in well
under a minute on one core.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdkit
from kdkit.cli import main as cli_main
from kdkit.data import ArrayDataset, FastLoader
from kdkit.errors import KDError
from kdkit.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT = {"factory": "kdkit.models:fmnist_student", "kwargs": {}}  # the legacy spec form
PWN = ["sh", "-c", "id > PWNED"]
SIZE = 28
MEAN, STD = (0.5,), (0.25,)
VERDICTS: dict[str, str] = {}


# -- verdicts -------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    run: Callable[[Any], Any]  # library: a callable; CLI: returns argv
    match: str = ""  # regex the one-line message must contain (clear cases)
    expect: str = "clear"  # or "correct": run returns True when the result is right
    cli: bool = False
    post: Callable[[Any], str | None] | None = None  # "loss" / "ran code" / None
    marks: list = field(default_factory=list)


def _lib_verdict(case: Case, fx: Any) -> tuple[str, str]:
    try:
        result = case.run(fx)
    except KDError as err:
        if case.expect == "correct":
            return "confusing", f"KDError: {err}"
        return "clear", str(err)
    except Exception as err:  # noqa: BLE001 - classifying is the point
        return "confusing", f"{type(err).__name__}: {err}"
    if case.expect == "correct":
        return ("correct" if result is not False else "silent"), ""
    return "silent", f"no error (returned {result!r})"


def _cli_verdict(case: Case, fx: Any, capsys) -> tuple[str, str]:
    argv = [str(a) for a in case.run(fx)]
    capsys.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse in an older main
        rc = exc.code if isinstance(exc.code, int) else 2
    except _WorkStarted:
        capsys.readouterr()
        return "late", "the work started before the input was checked"
    except Exception as err:  # noqa: BLE001 - an uncaught exception is a CLI traceback
        capsys.readouterr()
        return "crash", f"{type(err).__name__}: {err}"
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc == 0:
        return ("correct", "") if case.expect == "correct" else ("silent", "exit code 0")
    if rc == 2 and len(lines) == 1 and "Traceback" not in err:
        return "clear", lines[0]
    return "confusing", f"exit {rc}: {err[-400:]}"


def _judge(case: Case, fx: Any, capsys) -> tuple[str, str]:
    verdict, message = _cli_verdict(case, fx, capsys) if case.cli else _lib_verdict(case, fx)
    if case.post is not None:
        worse = case.post(fx)
        if worse:
            return worse, message
    return verdict, message


# -- fixtures -------------------------------------------------------------------------------
def _student():
    from kdkit.models import fmnist_student

    torch.manual_seed(0)
    return fmnist_student().eval()


def _dataset(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset(images, labels)


def _blobs(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for c in range(classes):
        r, col = divmod(c, 2)
        x[y == c, :, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 150
    return ArrayDataset(x, y)


def _net(width=8, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


def _trainer(checkpoint_dir=None, student=None, teacher=None, optimizer=None, **kw):
    student = student if student is not None else _net()
    criterion = kw.pop("criterion", kdkit.SoftTargetKL(2.0) if teacher is not None else None)
    balancer = kw.pop("balancer", None)
    loader = kw.pop("loader", FastLoader(_blobs(), 32, seed=0))
    d = kdkit.Distiller(student, teacher, criterion, balancer)
    return kdkit.Trainer(
        d,
        loader,
        epochs=kw.pop("epochs", 1),
        checkpoint_dir=checkpoint_dir,
        optimizer=optimizer,
        device="cpu",
        progress=False,
        **kw,
    )


def _flip_exponents(src: Path, dst: Path, n: int = 100) -> None:
    """Flip the top exponent bit of ``n`` float32 weights, keeping the file's other fields."""
    state = torch.load(src, weights_only=True)
    weight = state["student"]["fc.weight"] if "fc.weight" in state["student"] else None
    if weight is None:
        weight = next(v for v in state["student"].values() if v.is_floating_point())
    bits = weight.view(torch.int32).reshape(-1)
    bits[:n] ^= 1 << 30
    torch.save(state, dst)


@dataclass
class Fixtures:
    root: Path
    ckpt: Path
    teacher_ckpt: Path
    legacy_ckpt: Path
    pwned: Path
    pwned_python: Path
    markdown: Path
    onnx: Path
    truncated_onnx: Path
    corrupt_onnx: Path
    a_file: Path
    cache: Path
    cache_topk: Path
    dataset: Any
    teacher_net: nn.Module
    weights_only: Path
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread):
    from kdkit.cache import precompute
    from kdkit.export import export_onnx

    root = tmp_path_factory.mktemp("hostile")
    model = _student()
    sd = model.state_dict()
    ckpt = save_checkpoint(
        root / "best.pt", {"student": sd, "student_spec": STUDENT, "input_shape": [1, SIZE, SIZE]}
    )
    teacher_ckpt = root / "teacher.pt"
    teacher_state = {
        "role": "teacher",
        "teacher": sd,
        "teacher_spec": {"model": "kdkit:fmnist_student", "kwargs": {}},
        "input_shape": [1, SIZE, SIZE],
    }
    save_checkpoint(teacher_ckpt, teacher_state)
    legacy = {"format": "kdkit-checkpoint", "version": 1, "student": sd, "student_spec": STUDENT}
    torch.save({**legacy, "input_shape": [1, SIZE, SIZE]}, root / "legacy.pt")
    pwned_spec = {"factory": "subprocess:call", "kwargs": {"args": PWN}}
    pwned = save_checkpoint(root / "pwned.pt", {"student": sd, "student_spec": pwned_spec,
                                                "input_shape": [1, SIZE, SIZE]})  # fmt: skip
    pwned_python = save_checkpoint(
        root / "pwned_python.pt",
        {"student": sd, "student_spec": {"model": "python:subprocess:call", "kwargs": {"args": PWN}},
         "input_shape": [1, SIZE, SIZE]},
    )  # fmt: skip
    markdown = root / "README.pt"
    markdown.write_text("# my model\n\nTrained for 3 epochs.\n")
    onnx = root / "student.onnx"
    export_onnx(model, onnx, (1, SIZE, SIZE))
    data = onnx.read_bytes()
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (root / "corrupt.onnx").write_bytes(os.urandom(4096))
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    dataset = _dataset()
    teacher_net = _student()
    cache = precompute(teacher_net, dataset, root / "cache", shard_size=8, progress=False,
                       mean=MEAN, std=STD, dtype="fp32")  # fmt: skip
    cache_topk = precompute(teacher_net, dataset, root / "cache_topk", shard_size=8, topk=3,
                            progress=False, mean=MEAN, std=STD)  # fmt: skip
    weights_only = root / "weights.pt"
    torch.save(sd, weights_only)
    fixtures = Fixtures(
        root, ckpt, teacher_ckpt, root / "legacy.pt", pwned, pwned_python, markdown, onnx,
        root / "truncated.onnx", root / "corrupt.onnx", a_file, cache, cache_topk, dataset,
        teacher_net, weights_only,
    )  # fmt: skip
    mp = pytest.MonkeyPatch()
    import kdkit.run.cache_job as cache_job

    mp.setattr(cache_job, "named_dataset", _fake_load_data)
    import kdkit.data

    mp.setattr(kdkit.data, "load_fashion_mnist", _work_started)  # the demo's first work
    mp.chdir(root)  # PWNED would be written here
    yield fixtures
    mp.undo()
    tally = os.environ.get("KDKIT_HOSTILE_TALLY")
    if tally:
        Path(tally).write_text(json.dumps(VERDICTS, indent=1, sort_keys=True))


class _WorkStarted(Exception):
    """Raised where the demo would start its real work: a check that comes after it is late
    (it would fail only after minutes of training)."""


def _work_started(*args, **kwargs):
    raise _WorkStarted


def _fake_load_data(spec: str):
    name = spec.partition(":")[0]
    if name != "fashion-mnist":
        raise KDError(f"unknown dataset {name!r}; available: ['fashion-mnist']")
    return _dataset(), MEAN, STD


def _pwned(fx) -> str | None:
    marker = fx.root / "PWNED"
    if marker.exists():
        marker.unlink()
        return "ran code"
    return None


def _copy(fx, src: Path, name: str) -> Path:
    dst = fx.root / "work" / name
    dst.parent.mkdir(exist_ok=True)
    if src.is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _edited_cache(fx, name: str, edit: Callable[[dict], None], src: Path | None = None) -> Path:
    out = _copy(fx, src or fx.cache, name)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


def _shift(meta: dict) -> None:
    """The boundary between shards 0 and 1 moved by 5 rows: the ranges stay contiguous and
    cover the dataset, but rows 8..12 would be read from the wrong shard and position."""
    meta["shards"][0]["stop"] += 5
    meta["shards"][1]["start"] += 5


def _swap(meta: dict) -> None:
    s = meta["shards"]
    s[0]["files"], s[1]["files"] = s[1]["files"], s[0]["files"]


def _resealed(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    """An edit whose author also recomputed the meta checksum (so only the layout checks
    can catch it)."""

    def run(meta: dict) -> None:
        edit(meta)
        try:
            from kdkit.cache.store import seal_meta
        except ImportError:  # a kdkit without meta checksums
            return
        sealed = seal_meta({k: v for k, v in meta.items() if k != "meta_sha256"})
        meta.clear()
        meta.update(sealed)

    return run


# -- CLI cases ------------------------------------------------------------------------------
def _export(fx, *extra, ckpt=None):
    out = fx.root / "work" / "out.onnx"
    return ["export", str(ckpt or fx.ckpt), "--onnx", str(out), *extra]


def _keeps_good_onnx(fx) -> str | None:
    good = fx.root / "work" / "good.onnx"
    return None if good.read_bytes() == fx.onnx.read_bytes() else "loss"


def _export_over_good(fx, *extra):
    good = _copy(fx, fx.onnx, "good.onnx")
    return ["export", str(fx.ckpt), "--onnx", str(good), *extra]


def _flipped(fx) -> Path:
    dst = fx.root / "work" / "flipped.pt"
    dst.parent.mkdir(exist_ok=True)
    _flip_exponents(fx.ckpt, dst)
    return dst


def _edited_ckpt(fx, name: str, **changes) -> Path:
    state = torch.load(fx.ckpt, weights_only=True)
    state.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        state.pop(key)
    dst = fx.root / "work" / name
    dst.parent.mkdir(exist_ok=True)
    torch.save(state, dst)
    return dst


def _sealed_ckpt(fx, name: str, **changes) -> Path:
    """Raw checkpoint contents with a valid checksum (where this kdkit has checksums)."""
    state = torch.load(fx.ckpt, weights_only=True)
    state.update(changes)
    try:
        from kdkit.load import checksum

        state["checksum"] = checksum(state)
    except ImportError:
        pass
    dst = fx.root / "work" / name
    dst.parent.mkdir(exist_ok=True)
    torch.save(state, dst)
    return dst


def _resaved(fx, name: str, **changes) -> Path:
    """A well-formed checkpoint (valid checksum) with changed contents."""
    state = {"student": _student().state_dict(), "student_spec": STUDENT,
             "input_shape": [1, SIZE, SIZE], **changes}  # fmt: skip
    return save_checkpoint(fx.root / "work" / name, state)


def _bench(fx, *extra, teacher=None, student=None):
    out = fx.root / "work" / "bench"
    return [
        "bench", "--teacher", str(teacher or fx.ckpt), "--student", str(student or fx.ckpt),
        "--batch-sizes", "1", "--repeats", "1", "--backends", "eager", "--out", str(out), *extra,
    ]  # fmt: skip


def _precompute(fx, *extra, teacher=None):
    out = fx.root / "work" / "pc"
    return ["precompute", "--teacher", str(teacher or fx.onnx), "--out", str(out),
            "--no-progress", "--device", "cpu", *extra]  # fmt: skip


def _check(fx, *extra, teacher=None, cache=None):
    return ["cache", "check", str(cache or fx.cache), "--teacher", str(teacher or fx.onnx),
            "--data", "fashion-mnist:train", "--device", "cpu", *extra]  # fmt: skip


def _demo(*extra):
    return ["demo", "--quick", "--no-progress", *extra]


def _truncated_ckpt(fx) -> Path:
    dst = fx.root / "work" / "torn.pt"
    dst.parent.mkdir(exist_ok=True)
    data = fx.ckpt.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def _random_pt(fx) -> Path:
    dst = fx.root / "work" / "random.pt"
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(os.urandom(2048))
    return dst


def _no_cuda(case: Case) -> Case:
    case.marks.append(
        pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    )
    return case


CLI: list[Case] = [
    # export: the checkpoint
    Case("export-missing-checkpoint", lambda fx: _export(fx, ckpt=fx.root / "nope.pt"), "no checkpoint"),
    Case("export-directory-without-checkpoint", lambda fx: _export(fx, ckpt=_empty_dir(fx)), "no checkpoint|best.pt"),
    Case("export-markdown-as-checkpoint", lambda fx: _export(fx, ckpt=fx.markdown), "not a readable checkpoint"),
    Case("export-truncated-checkpoint", lambda fx: _export(fx, ckpt=_truncated_ckpt(fx)), "not a readable checkpoint"),
    Case("export-random-bytes-checkpoint", lambda fx: _export(fx, ckpt=_random_pt(fx)), "not a readable checkpoint"),
    Case("export-plain-state-dict", lambda fx: _export(fx, ckpt=fx.weights_only), "not a kdkit checkpoint"),
    Case("export-flipped-exponent-bits", lambda fx: _export(fx, ckpt=_flipped(fx)), "fails its checksum"),
    Case("export-pwned-legacy-factory", lambda fx: _export(fx, ckpt=fx.pwned), "would import 'subprocess'.*trust", post=_pwned),
    Case("export-pwned-python-spec", lambda fx: _export(fx, ckpt=fx.pwned_python), "would import 'subprocess'.*trust", post=_pwned),
    Case("export-newer-format-version", lambda fx: _export(fx, ckpt=_edited_ckpt(fx, "v99.pt", version=99)), "newer kdkit"),
    Case("export-unknown-role", lambda fx: _export(fx, ckpt=_sealed_ckpt(fx, "coach.pt", role="coach")), "role 'coach'"),
    Case("export-unknown-kdkit-model", lambda fx: _export(fx, ckpt=_resaved(fx, "unk.pt", student_spec={"model": "kdkit:fmnist_studnet"})), "did you mean.*fmnist_student"),
    Case("export-spec-bad-kwargs", lambda fx: _export(fx, ckpt=_resaved(fx, "kw.pt", student_spec={"model": "kdkit:fmnist_student", "kwargs": {"bogus": 1}})), "kwargs"),
    Case("export-spec-unknown-prefix", lambda fx: _export(fx, ckpt=_resaved(fx, "pre.pt", student_spec={"model": "hub:resnet"})), "unknown model prefix"),
    Case("export-weights-of-other-model", lambda fx: _export(fx, ckpt=_resaved(fx, "other.pt", student_spec={"model": "kdkit:fmnist_teacher"})), "do not fit"),
    Case("export-no-spec", lambda fx: _export(fx, ckpt=_resaved(fx, "nospec.pt", student_spec=None)), "student_spec"),
    # export: the options and the output
    Case("export-opset-5-keeps-good-file", lambda fx: _export_over_good(fx, "--opset", "5"), "opset", post=_keeps_good_onnx),
    Case("export-opset-99", lambda fx: _export(fx, "--opset", "99"), "opset"),
    Case("export-opset-not-a-number", lambda fx: _export(fx, "--opset", "seventeen"), "--opset"),
    Case("export-onnx-under-a-file", lambda fx: ["export", fx.ckpt, "--onnx", fx.a_file / "x.onnx"], "is a file"),
    Case("export-onnx-in-proc", lambda fx: ["export", fx.ckpt, "--onnx", "/proc/kdkit-nope/x.onnx"], "cannot write"),
    Case("export-onnx-is-directory", lambda fx: ["export", fx.ckpt, "--onnx", fx.root], "directory"),
    Case("export-input-shape-zero", lambda fx: _export(fx, "--input-shape", "0", "28", "28"), "input-shape|input_shape"),
    Case("export-input-shape-wrong-channels", lambda fx: _export(fx, "--input-shape", "3", "28", "28"), "export.*failed|does not run"),
    Case("export-atol-negative", lambda fx: _export(fx, "--atol", "-1"), "--atol|atol"),
    Case("export-atol-nan", lambda fx: _export(fx, "--atol", "nan"), "--atol|atol"),
    Case("export-missing-onnx-option", lambda fx: ["export", fx.ckpt], "--onnx"),
    Case("export-teacher-role-checkpoint", lambda fx: _export(fx, ckpt=fx.teacher_ckpt), expect="correct"),
    # bench
    Case("bench-device-foo", lambda fx: _bench(fx, "--device", "foo"), "not a device"),
    Case("bench-threads-negative", lambda fx: _bench(fx, "--threads", "-1"), "--threads"),
    Case("bench-threads-zero", lambda fx: _bench(fx, "--threads", "0"), "--threads"),
    Case("bench-repeats-zero", lambda fx: _bench(fx, "--repeats", "0"), "--repeats"),
    Case("bench-batch-size-zero", lambda fx: _bench(fx, "--batch-sizes", "0"), "--batch-sizes"),
    Case("bench-input-shape-negative", lambda fx: _bench(fx, "--input-shape", "-1", "28", "28"), "input-shape"),
    Case("bench-out-in-proc", lambda fx: _bench(fx, "--out", "/proc/kdkit-nope"), "cannot write"),
    Case("bench-out-is-a-file", lambda fx: _bench(fx, "--out", fx.a_file), "is an existing file|not a directory"),
    Case("bench-teacher-missing", lambda fx: _bench(fx, teacher=fx.root / "nope.pt"), "no model file"),
    Case("bench-teacher-truncated-onnx", lambda fx: _bench(fx, "--backends", "ort", "--input-shape", "1", "28", "28", teacher=fx.truncated_onnx), "ONNX"),
    Case("bench-teacher-corrupt-onnx", lambda fx: _bench(fx, "--backends", "ort", "--input-shape", "1", "28", "28", teacher=fx.corrupt_onnx), "ONNX"),
    Case("bench-onnx-input-shape-mismatch", lambda fx: _bench(fx, "--backends", "ort", "--input-shape", "3", "32", "32", teacher=fx.onnx, student=fx.onnx), "does not run on input"),
    Case("bench-markdown-as-checkpoint", lambda fx: _bench(fx, teacher=fx.markdown), "not a readable checkpoint"),
    Case("bench-pwned-checkpoint", lambda fx: _bench(fx, teacher=fx.pwned), "would import 'subprocess'", post=_pwned),
    Case("bench-python-spec-string", lambda fx: _bench(fx, teacher="python:os:getcwd"), "would import 'os'"),
    Case("bench-legacy-spec-string-untrusted", lambda fx: _bench(fx, teacher="os:getcwd"), "unknown model prefix|would import"),
    Case("bench-unknown-kdkit-model", lambda fx: _bench(fx, teacher="kdkit:nope"), "no model 'nope'"),
    Case("bench-bad-student-refused-before-teacher-runs", lambda fx: _bench(fx, student=fx.corrupt_onnx.with_suffix(".pt")), "no model file"),
    Case("bench-backend-foo", lambda fx: _bench(fx, "--backends", "foo"), "invalid choice"),
    _no_cuda(Case("bench-device-cuda-without-gpu", lambda fx: _bench(fx, "--device", "cuda"), "CUDA")),
    # precompute
    Case("precompute-views-negative", lambda fx: _precompute(fx, "--views", "-2"), "--views"),
    Case("precompute-topk-zero", lambda fx: _precompute(fx, "--topk", "0"), "--topk"),
    Case("precompute-topk-above-classes", lambda fx: _precompute(fx, "--topk", "999"), "topk"),
    Case("precompute-batch-size-zero", lambda fx: _precompute(fx, "--batch-size", "0"), "--batch-size|batch_size"),
    Case("precompute-shard-size-zero", lambda fx: _precompute(fx, "--shard-size", "0"), "--shard-size|shard_size"),
    Case("precompute-flip-p-2", lambda fx: _precompute(fx, "--views", "2", "--flip-p", "2"), "flip"),
    Case("precompute-scale-zero", lambda fx: _precompute(fx, "--views", "2", "--scale", "0", "1"), "scale"),
    Case("precompute-out-under-a-file", lambda fx: ["precompute", "--teacher", fx.onnx, "--out", fx.a_file / "c"], "is a file"),
    Case("precompute-teacher-missing", lambda fx: _precompute(fx, teacher=fx.root / "nope.onnx"), "no .*ONNX file|no teacher file"),
    Case("precompute-teacher-truncated-onnx", lambda fx: _precompute(fx, teacher=fx.truncated_onnx), "ONNX"),
    Case("precompute-markdown-teacher", lambda fx: _precompute(fx, teacher=fx.markdown), "not a readable checkpoint"),
    Case("precompute-pwned-teacher", lambda fx: _precompute(fx, teacher=fx.pwned), "would import 'subprocess'", post=_pwned),
    Case("precompute-arch-python-untrusted", lambda fx: _precompute(fx, "--arch", "python:os:getcwd", teacher=fx.weights_only), "would import 'os'"),
    Case("precompute-arch-unknown", lambda fx: _precompute(fx, "--arch", "kdkit:nope", teacher=fx.weights_only), "no model 'nope'"),
    Case("precompute-device-foo", lambda fx: _precompute(fx, "--device", "foo"), "not a device"),
    Case("precompute-unknown-dataset", lambda fx: _precompute(fx, "--data", "mnist"), "unknown dataset"),
    Case("precompute-dtype-fp8", lambda fx: _precompute(fx, "--dtype", "fp8"), "invalid choice"),
    # cache
    Case("cache-verify-missing-dir", lambda fx: ["cache", "verify", fx.root / "nope"], "not a teacher cache"),
    Case("cache-verify-not-a-cache", lambda fx: ["cache", "verify", fx.root], "not a teacher cache"),
    Case("cache-verify-meta-not-json", lambda fx: ["cache", "verify", _edited_cache_text(fx, "nojson", "{oops")], "not valid JSON"),
    Case("cache-verify-meta-is-a-directory", lambda fx: ["cache", "verify", _meta_dir(fx)], "not a teacher cache|cannot read"),
    Case("cache-verify-ranges-shifted", lambda fx: ["cache", "verify", _edited_cache(fx, "shift", _shift)], "checksum|covers"),
    Case("cache-verify-ranges-shifted-resealed", lambda fx: ["cache", "verify", _edited_cache(fx, "shift2", _resealed(_shift))], "covers"),
    Case("cache-verify-shards-swapped", lambda fx: ["cache", "verify", _edited_cache(fx, "swap", _swap)], "checksum|swapped"),
    Case("cache-verify-shards-swapped-resealed", lambda fx: ["cache", "verify", _edited_cache(fx, "swap2", _resealed(_swap))], "swapped"),
    Case("cache-verify-meta-field-edited", lambda fx: ["cache", "verify", _edited_cache(fx, "fp", lambda m: m.update(teacher_fingerprint="0" * 64))], "checksum"),
    Case("cache-verify-format-version-99", lambda fx: ["cache", "verify", _edited_cache(fx, "v99", lambda m: m.update(format_version=99))], "format_version"),
    Case("cache-verify-truncated-shard", lambda fx: ["cache", "verify", _damaged_shard(fx, "trunc", truncate=True)], "truncated"),
    Case("cache-verify-flipped-shard-bytes", lambda fx: ["cache", "verify", _damaged_shard(fx, "flip", truncate=False)], "checksum"),
    Case("cache-info-not-a-cache", lambda fx: ["cache", "info", fx.root], "not a teacher cache"),
    Case("cache-check-n-probe-zero", lambda fx: _check(fx, "--n-probe", "0"), "--n-probe"),
    Case("cache-check-n-probe-negative", lambda fx: _check(fx, "--n-probe", "-3"), "--n-probe"),
    Case("cache-check-max-disagreement-2", lambda fx: _check(fx, "--max-disagreement", "2"), "--max-disagreement"),
    Case("cache-check-pwned-teacher", lambda fx: _check(fx, teacher=fx.pwned), "would import 'subprocess'", post=_pwned),
    Case("cache-check-markdown-teacher", lambda fx: _check(fx, teacher=fx.markdown), "not a readable checkpoint"),
    Case("cache-check-device-foo", lambda fx: _check(fx, "--device", "foo"), "not a device"),
    Case("cache-check-edited-cache", lambda fx: _check(fx, cache=_edited_cache(fx, "chk", _shift)), "checksum|covers"),
    # demo (refused before any data loading or training)
    Case("demo-out-under-a-file", lambda fx: _demo("--out", fx.a_file / "demo"), "is a file"),
    Case("demo-out-in-proc", lambda fx: _demo("--out", "/proc/kdkit-nope"), "cannot write"),
    Case("demo-n-labeled-negative", lambda fx: _demo("--n-labeled", "-5"), "n_labeled"),
    Case("demo-kd-epochs-zero", lambda fx: _demo("--kd-epochs", "0"), "kd_epochs"),
    Case("demo-temperature-zero", lambda fx: _demo("--temperature", "0"), "temperature"),
    Case("demo-temperature-nan", lambda fx: _demo("--temperature", "nan"), "temperature"),
    Case("demo-temperature-negative", lambda fx: _demo("--temperature", "-1"), "temperature"),
    # train / eval (their own tests cover more; these are the file-trust paths)
    Case("eval-markdown-as-checkpoint", lambda fx: ["eval", fx.markdown], "not a readable checkpoint"),
    Case("eval-missing-checkpoint", lambda fx: ["eval", fx.root / "nope.pt"], "no checkpoint"),
    Case("eval-pwned-checkpoint", lambda fx: ["eval", fx.pwned], "would import 'subprocess'|holds no run config", post=_pwned),
    Case("train-missing-config", lambda fx: ["train", fx.root / "nope.yaml"], "no config file"),
    Case("train-markdown-as-config", lambda fx: ["train", fx.markdown], "config"),
    # the command itself
    Case("unknown-command", lambda fx: ["distill"], "invalid choice"),
    Case("no-command", lambda fx: [], "required"),
]  # fmt: skip
for _c in CLI:
    _c.cli = True


def _empty_dir(fx) -> Path:
    path = fx.root / "work" / "empty_run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _edited_cache_text(fx, name: str, text: str) -> Path:
    out = _copy(fx, fx.cache, name)
    (out / "meta.json").write_text(text)
    return out


def _meta_dir(fx) -> Path:
    out = _copy(fx, fx.cache, "metadir")
    (out / "meta.json").unlink()
    (out / "meta.json").mkdir()
    return out


def _damaged_shard(fx, name: str, truncate: bool) -> Path:
    out = _copy(fx, fx.cache, name)
    shard = out / "shard-00001.values.npy"
    data = bytearray(shard.read_bytes())
    if truncate:
        shard.write_bytes(bytes(data[: len(data) - 40]))
    else:
        data[-9] ^= 0x40
        shard.write_bytes(bytes(data))
    return out


# -- library cases ----------------------------------------------------------------------------
def _load_model(path, **kw):
    load_model = getattr(kdkit, "load_model", None)
    if load_model is None:  # a kdkit without roles: the closest it has
        kw.pop("role", None)
        return kdkit.load_student(path, **kw)
    return load_model(path, **kw)


def _same_weights(module: nn.Module) -> bool:
    ref = _student().state_dict()
    return all(torch.equal(v, ref[k]) for k, v in module.state_dict().items())


def _resume_other_architecture(fx):
    d = fx.root / "work" / "arch"
    _trainer(d).fit()
    _trainer(d, student=_net(width=16)).fit(resume=True)


def _resume_other_optimizer(fx):
    d = fx.root / "work" / "opt"
    _trainer(d).fit()

    def sgd(p):
        return torch.optim.SGD(p, lr=0.1, momentum=0.9)

    _trainer(d, optimizer=sgd).fit(resume=True)


def _resume_flipped(fx):
    d = fx.root / "work" / "flipres"
    _trainer(d).fit()
    state = torch.load(d / "last.pt", weights_only=True)
    bits = state["student"]["4.weight"].view(torch.int32).reshape(-1)
    bits[:20] ^= 1 << 30
    torch.save(state, d / "last.pt")
    _trainer(d, epochs=2).fit(resume=True)


def _resume_typo(fx):
    (fx.root / "work" / "runs").mkdir(parents=True, exist_ok=True)
    _trainer(fx.root / "work" / "runs" / "typo-dir", epochs=1).fit(resume=True)


def _resume_auto(fx):
    d = fx.root / "work" / "auto"
    hist = _trainer(d).fit(resume="auto")
    return len(hist) == 1 and (d / "last.pt").is_file()


def _full_disk(fx):
    """A write that fails with ENOSPC must leave the previous checkpoint intact."""
    import errno

    from kdkit import _io

    path = fx.root / "work" / "disk" / "last.pt"
    save_checkpoint(path, {"student": {"w": torch.ones(2)}, "epoch": 1})
    before = path.read_bytes()
    real = torch.save

    def full(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "save", full)
    try:
        save_checkpoint(path, {"student": {"w": torch.zeros(2)}, "epoch": 2})
    except KDError as err:
        assert "intact" in str(err)  # a clear message, and true:
        assert path.read_bytes() == before
        assert not [p for p in path.parent.iterdir() if _io.TMP_MARKER in p.name]
        raise
    finally:
        mp.undo()


def _umask_checkpoint(fx):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(fx.root / "work" / "mode.pt", {"student": {"w": torch.ones(1)}})
    finally:
        os.umask(old)
    return stat.S_IMODE(path.stat().st_mode) == 0o644


def _stale_temps_cleaned(fx):
    d = fx.root / "work" / "stale"
    d.mkdir(parents=True, exist_ok=True)
    legacy = d / ".last.pt.abc123.tmp"  # kdkit 0.1's mkstemp name
    current = d / ".last.pt.kdkit-tmp-999999999"  # a killed writer (no such pid)
    legacy.write_bytes(b"x" * 100)
    current.write_bytes(b"x" * 100)
    save_checkpoint(d / "last.pt", {"student": {"w": torch.ones(1)}})
    return not legacy.exists() and not current.exists()


def _cache_from_other_split(fx):
    """A cache of one dataset used with another dataset of the same length."""
    from kdkit.cache import CachedTeacher

    other = _dataset(seed=1)  # same size, other images: another split
    cached = CachedTeacher(fx.cache)
    _trainer(student=_student().train(), teacher=cached, loader=FastLoader(other, 10),
             mean=MEAN, std=STD)  # fmt: skip


def _cache_length_mismatch(fx):
    from kdkit.cache import CachedTeacher

    cached = CachedTeacher(fx.cache)
    loader = FastLoader(_dataset(n=12), 6)
    _trainer(student=_student().train(), teacher=cached, loader=loader, mean=MEAN, std=STD)


def _cache_same_dataset_trains(fx):
    from kdkit.cache import CachedTeacher

    trainer = _trainer(student=_student().train(), teacher=CachedTeacher(fx.cache),
                       loader=FastLoader(fx.dataset, 10), mean=MEAN, std=STD)  # fmt: skip
    return len(trainer.fit()) == 1


def _cached(fx, name, edit):
    from kdkit.cache import CachedTeacher

    CachedTeacher(_edited_cache(fx, name, edit))


def _student_as_own_teacher(fx):
    s = _net()
    kdkit.Distiller(s, s, kdkit.SoftTargetKL())
    # accepted: report whether the user's student was frozen in place (silent damage)
    return all(p.requires_grad for p in s.parameters()) and s.training and None


def _teacher_shares_parameters(fx):
    s = _net()
    kdkit.Distiller(s, nn.Sequential(s, nn.Identity()), kdkit.SoftTargetKL())


def _step(labels, teacher=None, x=None):
    d = kdkit.Distiller(_net(), teacher if teacher is not None else _net(seed=1),
                        kdkit.SoftTargetKL(2.0))  # fmt: skip
    x = x if x is not None else torch.randn(4, 1, 8, 8)
    return d.step(x, labels)


def _unlabeled_rows_train(fx):
    out = _step(torch.full((4,), -1))
    return "student" not in out.components and torch.isfinite(out.loss).item()


def _teacher_other_dtype(fx):
    _step(torch.zeros(4, dtype=torch.long), teacher=_net(seed=1).double())


def _teacher_other_device(fx):
    _step(torch.zeros(4, dtype=torch.long), teacher=_net(seed=1).to("meta"))


def _kl_masked_class(fx):
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    t[:, 2] = float("-inf")
    loss = kdkit.SoftTargetKL(temperature=2.0)(s, t)
    loss.backward()
    p = torch.softmax(t[:, [0, 1, 3, 4]] / 2, 1)
    log_q = torch.log_softmax(s.detach() / 2, 1)[:, [0, 1, 3, 4]]
    ref = (p * (p.log() - log_q)).sum(1).mean() * 4
    return torch.isfinite(s.grad).all().item() and math.isclose(
        loss.item(), ref.item(), rel_tol=1e-5
    )


def _dkd_masked_class(fx):
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    t[:, 4] = float("-inf")
    loss = kdkit.DKD(temperature=2.0)(s, t, labels=torch.tensor([0, 1, -1]))
    loss.backward()
    return bool(torch.isfinite(loss).item() and torch.isfinite(s.grad).all().item())


def _topk_negative(fx):
    from kdkit.losses import topk_to_logits

    topk_to_logits(torch.randn(2, 3), torch.tensor([[0, -1, 2], [1, 2, 3]]), 5)


def _hardlabel_negative(fx):
    from kdkit.teachers.base import TopK

    kdkit.HardLabel()(torch.randn(2, 5), TopK(torch.tensor([[3.0, 1.0]] * 2),
                                              torch.tensor([[-2, 1]] * 2)))  # fmt: skip


def _kl_topk_negative(fx):
    from kdkit.teachers.base import TopK

    t = TopK(torch.randn(2, 3), torch.tensor([[0, -1, 2], [1, 2, 3]]))
    kdkit.SoftTargetKL(2.0)(torch.randn(2, 5), t)


def _image_tree(fx, name: str) -> Path:
    from PIL import Image

    root = fx.root / "work" / name
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    return root


def _hidden_folder_skipped(fx):
    root = _image_tree(fx, "imgs")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    m = kdkit.ImageFolderManager(root, size=8, batch_size=2, workers=0)
    return m.classes == ["cat", "dog"] and m.train_dataset.samples[0][1] == 0


def _empty_image_counted(fx, caplog):
    root = _image_tree(fx, "imgs_empty")
    (root / "train" / "dog" / "broken.png").write_bytes(b"")
    with caplog.at_level("WARNING"):
        m = kdkit.ImageFolderManager(root, size=8, batch_size=2, workers=0)
    ok = len(m.train_dataset) == 4 and re.search(r"skipped 1 empty", caplog.text) is not None
    return bool(ok)


def _only_hidden_class_folder(fx):
    root = _image_tree(fx, "imgs_hidden_only")
    shutil.rmtree(root / "train" / "dog")
    (root / "train" / "dog" / ".cache").mkdir(parents=True)
    (root / "train" / "dog" / ".cache" / "a.png").write_bytes(b"x")
    kdkit.ImageFolderManager(root, size=8, batch_size=2, workers=0)


class _Stop(Exception):
    pass


def _metrics_mid_epoch_resume(fx):
    ref_dir, run_dir = fx.root / "work" / "m_ref", fx.root / "work" / "m_run"
    common = {"checkpoint_every": 1, "seed": 3, "loader": None}

    def make(d, callbacks=()):
        kw = dict(common, loader=FastLoader(_blobs(), 16, seed=0), callbacks=callbacks)
        return _trainer(d, teacher=_net(seed=2), epochs=1, **kw)

    make(ref_dir).fit()

    def stop_at_3(trainer, out):
        if trainer.step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        make(run_dir, [stop_at_3]).fit()
    make(run_dir).fit(resume=True)
    ref = list(csv.DictReader((ref_dir / "metrics.csv").open()))
    got = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return len(got) == 1 and math.isclose(float(got[0]["loss_total"]),
                                          float(ref[0]["loss_total"]), rel_tol=1e-5)  # fmt: skip


def _metrics_new_column(fx):
    d = fx.root / "work" / "m_col"
    balancer = kdkit.LossBalancer(start_epoch=1)
    _trainer(d, teacher=_net(seed=2), epochs=2, balancer=balancer).fit()
    rows = list(csv.DictReader((d / "metrics.csv").open()))
    header = next(csv.reader((d / "metrics.csv").open()))
    return (
        "loss_output" in header
        and rows[0]["loss_output"] in ("", None)
        and float(rows[1]["loss_output"]) >= 0
        and [int(r["epoch"]) for r in rows]
        == [1, 2]  # counted from 1, as in the logs and the report
        and all(r["lr"] not in ("", None) for r in rows)
    )


def _export_keeps_good_file(fx):
    from kdkit.export import export_onnx

    good = _copy(fx, fx.onnx, "good_lib.onnx")
    try:
        export_onnx(_student(), good, (1, SIZE, SIZE), opset=5)
    finally:
        if good.read_bytes() != fx.onnx.read_bytes():
            raise AssertionError("the good .onnx was replaced by a refused export")


def _export_drifting_keeps_good_file(fx):
    """Verification fails (the model is not deterministic): the old file stays."""
    from kdkit.export import export_onnx

    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1) + torch.randn_like(x.flatten(1))

    good = _copy(fx, fx.onnx, "good_drift.onnx")
    try:
        export_onnx(Noisy(), good, (1, 4, 4))
    finally:
        if good.read_bytes() != fx.onnx.read_bytes():
            raise AssertionError("the good .onnx was replaced by an unverified export")


def _pickled_code(fx):
    class Evil:
        def __reduce__(self):
            return (os.system, ("id > PWNED",))

    path = fx.root / "work" / "evil.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save({"format": "kdkit-checkpoint", "version": 1, "student": Evil()}, path)
    _load_model(path)


def _trust_code_loads(fx):
    path = _resaved(fx, "trusted.pt", student={},
                    student_spec={"model": "python:torch.nn:Identity"})  # fmt: skip
    module, _ = _load_model(path, trust_code=True)
    return isinstance(module, nn.Identity)


def _bench_threads(fx):
    from kdkit.bench import bench_model

    bench_model(_net(), (1, 8, 8), batch_sizes=(1,), backends=("eager",), repeats=1, threads=-1)


def _bench_device(fx):
    from kdkit.bench import bench_model

    bench_model(_net(), (1, 8, 8), batch_sizes=(1,), backends=("eager",), device="foo")


def _teacher_list_with_pwned(fx):
    kdkit.teacher([fx.onnx, fx.pwned])


LIB: list[Case] = [
    # 1. files never run code
    Case("teacher-from-pwned-checkpoint", lambda fx: kdkit.teacher(fx.pwned), "would import 'subprocess'.*trust_code", post=_pwned),
    Case("teacher-from-pwned-python-spec", lambda fx: kdkit.teacher(fx.pwned_python), "would import 'subprocess'", post=_pwned),
    Case("load-model-pwned", lambda fx: _load_model(fx.pwned), "would import 'subprocess'", post=_pwned),
    Case("load-student-pwned", lambda fx: kdkit.load_student(fx.pwned), "would import 'subprocess'", post=_pwned),
    Case("teacher-list-with-pwned-member", _teacher_list_with_pwned, "would import 'subprocess'", post=_pwned),
    Case("pickled-code-in-checkpoint", _pickled_code, "not a readable checkpoint", post=_pwned),
    Case("trust-code-allows-python-spec", _trust_code_loads, expect="correct"),
    # roles
    Case("load-student-on-teacher-file", lambda fx: kdkit.load_student(fx.teacher_ckpt), "holds a teacher"),
    Case("load-model-teacher-role", lambda fx: _same_weights(_load_model(fx.teacher_ckpt, role="teacher")[0]), expect="correct"),
    Case("load-model-any-role", lambda fx: _load_model(fx.teacher_ckpt)[1].get("role") == "teacher", expect="correct"),
    Case("load-model-unknown-role-arg", lambda fx: _load_model(fx.ckpt, role="coach"), "role"),
    Case("legacy-v1-checkpoint-loads", lambda fx: _same_weights(_load_model(fx.legacy_ckpt)[0]), expect="correct"),
    Case("teacher-from-teacher-checkpoint", lambda fx: kdkit.teacher(fx.teacher_ckpt) is not None, expect="correct"),
    # 3. damaged or foreign files
    Case("flipped-exponent-bits-refused", lambda fx: _load_model(_flipped(fx)), "fails its checksum"),
    Case("flipped-bits-refused-on-resume", _resume_flipped, "fails its checksum"),
    Case("resume-into-other-architecture", _resume_other_architecture, "cannot resume.*student"),
    Case("resume-into-other-optimizer", _resume_other_optimizer, "cannot resume.*(SGD|optimizer)"),
    Case("resume-true-without-checkpoint", _resume_typo, "no checkpoint.*resume='auto'"),
    Case("resume-auto-starts-fresh", _resume_auto, expect="correct"),
    Case("resume-bad-value", lambda fx: _trainer(fx.root / "work" / "rb").fit(resume="yes"), "resume"),
    Case("checkpoint-dir-is-a-file", lambda fx: _trainer(fx.a_file), "is an existing file|not a directory"),
    Case("checkpoint-dir-not-writable", lambda fx: _trainer("/proc/kdkit-nope"), "cannot write"),
    Case("full-disk-keeps-last-checkpoint", _full_disk, "intact"),
    Case("checkpoint-permissions-follow-umask", _umask_checkpoint, expect="correct"),
    Case("stale-temps-removed-on-next-write", _stale_temps_cleaned, expect="correct"),
    Case("cache-from-other-split", _cache_from_other_split, "dataset_fingerprint"),
    Case("cache-length-mismatch", _cache_length_mismatch, "num_samples"),
    Case("cache-same-dataset-trains", _cache_same_dataset_trains, expect="correct"),
    Case("cache-ranges-shifted", lambda fx: _cached(fx, "l_shift", _shift), "checksum|covers"),
    Case("cache-ranges-shifted-resealed", lambda fx: _cached(fx, "l_shift2", _resealed(_shift)), "covers"),
    Case("cache-shards-swapped", lambda fx: _cached(fx, "l_swap", _swap), "checksum|swapped"),
    Case("cache-shards-swapped-resealed", lambda fx: _cached(fx, "l_swap2", _resealed(_swap)), "swapped"),
    Case("cache-num-samples-edited-resealed", lambda fx: _cached(fx, "l_n", _resealed(lambda m: m.update(num_samples=24))), "shards|covers"),
    Case("cache-shard-file-path-traversal", lambda fx: _cached(fx, "l_trav", _resealed(lambda m: m["shards"][0]["files"]["values"].update(file="../../best.pt"))), "swapped or renamed|expected"),
    Case("cache-shape-edited-resealed", lambda fx: _cached(fx, "l_shape", _resealed(lambda m: m["shards"][0]["files"]["values"].update(shape=[8, 1, 5]))), "shape"),
    Case("cache-num-classes-not-int", lambda fx: _cached(fx, "l_nc", _resealed(lambda m: m.update(num_classes="10"))), "num_classes"),
    Case("cache-index-out-of-range", lambda fx: kdkit.CachedTeacher(fx.cache)(torch.zeros(1), index=torch.tensor([99])), "out of range"),
    # 4. library boundaries
    Case("student-as-its-own-teacher", _student_as_own_teacher, "teacher is the student"),
    Case("teacher-shares-student-parameters", _teacher_shares_parameters, "shares its parameters"),
    Case("teacher-other-dtype", _teacher_other_dtype, "teacher cannot run on this batch"),
    Case("teacher-other-device", _teacher_other_device, "teacher cannot run on this batch"),
    Case("float-labels", lambda fx: _step(torch.tensor([0.0, 1.0, 2.0, 1.0])), "integer class ids"),
    Case("label-minus-five", lambda fx: _step(torch.tensor([0, -5, 1, 2])), r"-1 for unlabeled.*\[-5"),
    Case("label-past-the-classes", lambda fx: _step(torch.tensor([0, 1, 4, 2])), r"\[0, 4\)"),
    Case("bool-labels", lambda fx: _step(torch.tensor([True, False, True, False])), "integer class ids"),
    Case("all-unlabeled-rows", _unlabeled_rows_train, expect="correct"),
    Case("temperature-nan", lambda fx: kdkit.SoftTargetKL(temperature=float("nan")), "temperature"),
    Case("temperature-inf", lambda fx: kdkit.SoftTargetKL(temperature=float("inf")), "temperature"),
    Case("temperature-zero", lambda fx: kdkit.SoftTargetKL(temperature=0.0), "temperature"),
    Case("temperature-negative", lambda fx: kdkit.SoftTargetKL(temperature=-4.0), "temperature"),
    Case("temperature-string", lambda fx: kdkit.SoftTargetKL(temperature="4"), "temperature"),
    Case("dkd-temperature-nan", lambda fx: kdkit.DKD(temperature=float("nan")), "temperature"),
    Case("dkd-beta-negative", lambda fx: kdkit.DKD(beta=-1.0), "beta"),
    Case("kl-teacher-minus-inf-logit", _kl_masked_class, expect="correct"),
    Case("dkd-teacher-minus-inf-logit", _dkd_masked_class, expect="correct"),
    Case("topk-negative-index", _topk_negative, "indices must be >= 0"),
    Case("hardlabel-topk-negative-index", _hardlabel_negative, "class"),
    Case("kl-topk-negative-index", _kl_topk_negative, "indices must be >= 0"),
    Case("export-opset-5-keeps-good-file-lib", _export_keeps_good_file, "opset"),
    Case("export-unfaithful-keeps-good-file", _export_drifting_keeps_good_file, "differs from PyTorch"),
    Case("export-under-a-file", lambda fx: kdkit.export_onnx(_student(), fx.a_file / "m.onnx", (1, 28, 28)), "is a file"),
    Case("export-atol-nan-lib", lambda fx: kdkit.export_onnx(_student(), fx.root / "work" / "n.onnx", (1, 28, 28), atol=float("nan")), "atol"),
    Case("bench-threads-negative-lib", _bench_threads, "threads"),
    Case("bench-device-foo-lib", _bench_device, "not a device"),
    Case("image-folder-hidden-folder-skipped", _hidden_folder_skipped, expect="correct"),
    Case("image-folder-class-with-only-hidden-files", _only_hidden_class_folder, "holds no images"),
    Case("metrics-after-mid-epoch-resume", _metrics_mid_epoch_resume, expect="correct"),
    Case("metrics-new-loss-column-at-start-epoch", _metrics_new_column, expect="correct"),
]  # fmt: skip

CASES = CLI + LIB


def _param(case: Case):
    return pytest.param(case, id=case.id, marks=case.marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile(case: Case, fx, capsys):
    verdict, message = _judge(case, fx, capsys)
    VERDICTS[case.id] = (
        verdict if verdict != "clear" or re.search(case.match, message) else ("clear (unmatched)")
    )
    want = "correct" if case.expect == "correct" else "clear"
    assert verdict == want, f"{case.id}: {verdict}: {message}"
    if want == "clear":
        assert re.search(case.match, message), f"{case.id}: message does not say: {message}"


def test_empty_image_files_are_counted(fx, caplog):
    """Needs caplog, so it is a row of its own (not in the table's count)."""
    assert _empty_image_counted(fx, caplog)


def test_the_table_is_large_enough():
    assert len(CASES) >= 120 and len(CLI) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_trainer_keeps_user_student_trainable_after_refusal():
    s = _net()
    with pytest.raises(KDError):
        kdkit.Distiller(s, s)
    assert all(p.requires_grad for p in s.parameters()) and s.training
    kdkit.Distiller(s, copy.deepcopy(s), kdkit.SoftTargetKL())  # the fix the message suggests
    assert all(p.requires_grad for p in s.parameters())
