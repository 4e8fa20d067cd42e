"""The image side's leftovers (issue 40): a config that is not UTF-8, class counts and channel
statistics that cannot fit the model or the images, ``kdkit eval`` of a checkpoint whose
recorded config is malformed, ``kdkit eval`` of a ``val: {split: F}`` run (``--data
val.image_folder=DIR`` scores DIR; images added to the folder since do not move the split onto
trained images), losses at extreme temperatures against float64 references, and integer pixel
tensors that are not uint8. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from _hostile import (
    CLASSES,
    MEAN,
    STD,
    Case,
    Fx,
    cli_rows,
    dataset,
    judge_row,
    memory_cap,
    params,
    run_config,
    write_yaml,
)
from PIL import Image

import kdkit

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(fx: Fx, name: str, cfg: dict) -> list:
    return [
        "train",
        write_yaml(fx.root / "work" / f"{name}.yaml", cfg),
        "--run-dir",
        fx.root / "work" / f"{name}-run",
    ]


def _cfg(fx: Fx, **sections) -> dict:
    cfg = run_config(fx.tree, fx.weights)
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value}
    return cfg


def _latin1(fx: Fx) -> list:
    text = yaml.safe_dump(_cfg(fx)).replace("name: tiny", "name: caf\u00e9")
    path = fx.root / "work" / "latin1.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text.encode("latin-1"))
    return ["train", path, "--print-config"]


def _classes(fx: Fx, name: str, n: int, model: str = "kdkit:fmnist_student") -> list:
    kwargs = (
        {"num_classes": n}
        if model == "torchvision:resnet18"
        else {"num_classes": n, "in_channels": 3}
    )
    return _train(fx, name, _cfg(fx, student={"model": model, "kwargs": kwargs}))


@contextlib.contextmanager
def _fmnist():
    """kdkit's Fashion-MNIST loader gives 20 grey images (no download)."""
    import kdkit.data

    real = kdkit.data.load_fashion_mnist
    kdkit.data.load_fashion_mnist = lambda split="train", *a, **k: dataset()
    try:
        yield
    finally:
        kdkit.data.load_fashion_mnist = real


def _grey(fx: Fx, name: str, **data) -> list:
    model = {"model": "kdkit:fmnist_student", "kwargs": {}}
    cfg = run_config(fx.tree, fx.weights)
    cfg.update(teacher=None, student=model)
    cfg["data"] = {
        "train": {"fashion_mnist": "train"},
        "val": {"split": 0.2},
        "batch_size": 4,
        **data,
    }
    return _train(fx, name, cfg)


# -- kdkit eval ----------------------------------------------------------------------------------
def _sealed(fx: Fx, name: str, **changes) -> Path:
    """The run's best.pt with changed plain fields and a recomputed checksum."""
    from kdkit.load import checksum

    state = torch.load(fx.run / "best.pt", weights_only=True)
    state.update(changes)
    state["checksum"] = checksum(state)
    out = fx.root / "work" / name / "best.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def _recorded(fx: Fx, name: str, edit) -> list:
    cfg = torch.load(fx.run / "best.pt", weights_only=True)["config"]
    edit(cfg)
    return ["eval", _sealed(fx, name, config=cfg)]


def _split_run(fx: Fx, name: str) -> tuple[Path, Path]:
    """A run of its own images (4 a class) validated on ``val: {split: 0.5}``."""
    from kdkit.cli import main

    tree = fx.root / "work" / f"{name}-images"
    shutil.rmtree(tree, ignore_errors=True)
    from _hostile import image_tree

    image_tree(tree, n_train=4, n_val=3)
    cfg = run_config(tree, fx.weights)
    cfg["data"]["val"] = {"split": 0.5}
    run = fx.root / "work" / f"{name}-run"
    argv = _train(fx, name, cfg)
    assert main([str(argv[0]), str(argv[1]), "--run-dir", str(run)]) == 0
    return run, tree


def _eval_json(argv: list) -> dict:
    import io

    from kdkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in argv] + ["--json"]) == 0
    return json.loads(out.getvalue())


def _best_val_top1(run: Path) -> float:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return max(float(r["val_top1"]) for r in rows)


def _eval_other_folder(fx: Fx) -> bool:
    """``--data val.image_folder=DIR`` on a split run scores DIR's 6 images."""
    run, tree = _split_run(fx, "valdir")
    other = fx.root / "work" / "valdir-other"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(tree / "val", other)
    Image.new("RGB", (16, 16), (0, 0, 250)).save(other / CLASSES[1] / "extra.png")
    scores = _eval_json(["eval", run, "--data", f"val.image_folder={other}"])["student"]
    return scores.get("images", 7) == 7


def _eval_after_images_added(fx: Fx) -> bool:
    """Images added to the training folder after the run: eval scores the split it trained
    with (the same top-1 as its best epoch), not a new carve of the larger folder."""
    run, tree = _split_run(fx, "added")
    for cls in CLASSES:
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 200, 9)).save(tree / "train" / cls / f"new{i}.png")
    scores = _eval_json(["eval", run])["student"]
    return abs(scores["top1"] - _best_val_top1(run)) < 1e-9 and scores.get("images", 4) == 4


# -- losses at extreme temperatures, integer pixels ----------------------------------------------
def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(32, 10, generator=g, dtype=torch.float64) * 5
    t = s + torch.randn(32, 10, generator=g, dtype=torch.float64) * 0.5
    return s, t, torch.randint(0, 10, (32,), generator=g)


def _dkd_ref(s, t, target, alpha, beta, temp) -> float:
    """DKD in float64 from its definition (log space, the target class removed for NCKD)."""
    zs, zt = s / temp, t / temp
    mask = F.one_hot(target, s.shape[1]).bool()
    lp, lq = F.log_softmax(zt, 1), F.log_softmax(zs, 1)
    lp_gt, lq_gt = lp[mask], lq[mask]
    zt_n, zs_n = zt[~mask].view(len(s), -1), zs[~mask].view(len(s), -1)
    lp_rest = torch.logsumexp(zt_n, 1) - torch.logsumexp(zt, 1)
    lq_rest = torch.logsumexp(zs_n, 1) - torch.logsumexp(zs, 1)

    def term(lp_, lq_):  # p (log p - log q), 0 where p underflows to 0
        return torch.where(lp_.exp() == 0, 0.0, lp_.exp() * (lp_ - lq_))

    tckd = term(lp_gt, lq_gt) + term(lp_rest, lq_rest)
    ln_p, ln_q = F.log_softmax(zt_n, 1), F.log_softmax(zs_n, 1)
    d = zt_n - zs_n
    nckd = (ln_p.exp() * d).sum(1) - torch.logsumexp(ln_q + d, 1)  # KL = E_p[d] - log E_q[e^d]
    return float((alpha * tckd + beta * nckd).mean()) * temp**2


def _dkd_at(temp: float) -> bool:
    s, t, y = _pair()
    ref = _dkd_ref(s, t, y, 1.0, 8.0, temp)
    got = kdkit.DKD(1.0, 8.0, temp)(s.float(), t.float(), labels=y).item()
    return got >= 0 and abs(got - ref) <= 1e-3 * abs(ref) + 1e-9


def _probs_at(temp: float) -> bool:
    """``teacher_probs=True`` with float64 probabilities: the exact KL times T^2."""
    s, t, _ = _pair()
    lp, lq = F.log_softmax(t / temp, 1), F.log_softmax(s / temp, 1)
    d = (t - s) / temp
    ref = float(((lp.exp() * d).sum(1) - torch.logsumexp(lq + d, 1)).mean()) * temp**2
    got = kdkit.SoftTargetKL(temp, teacher_probs=True)(s.float(), lp.exp()).item()
    return got >= 0 and abs(got - ref) <= 1e-3 * abs(ref) + 1e-9


def _int_pixels(dtype: torch.dtype) -> None:
    """A loader that yields integer pixels 0..255 that are not uint8."""
    from kdkit.data.pipeline import InputPipeline

    x = torch.randint(0, 256, (4, 1, 8, 8)).to(dtype)
    out = InputPipeline(None, MEAN, STD)((x, torch.zeros(4, dtype=torch.long)))
    return bool(out.x.abs().max() < 3)  # (x / 255 - 0.5) / 0.25 is within [-2, 2]


def _gz_bomb(fx: Fx) -> None:
    """A 64 KB train-images-idx3-ubyte.gz that decompresses to 80 MB of zeros."""
    import gzip

    from kdkit.data.fashion_mnist import load_fashion_mnist

    root = fx.root / "work" / "bomb"
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(
            (0x0803).to_bytes(4, "big") + (10**6).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        )
        for _ in range(80):
            f.write(bytes(1 << 20))
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x0801).to_bytes(4, "big") + (10**6).to_bytes(4, "big") + bytes(10**6))
    load_fashion_mnist("train", root=root, download=False)


CASES: list[Case] = cli_rows([
    Case("config-not-utf8", _latin1, "UTF-8"),
    Case("student-num-classes-negative", lambda fx: _classes(fx, "nc-neg", -3), "num_classes"),
    Case("student-num-classes-zero", lambda fx: _classes(fx, "nc-zero", 0), "num_classes"),
    Case("student-torchvision-num-classes-negative", lambda fx: _classes(fx, "nc-tv", -1, "torchvision:resnet18"), "num_classes"),
    Case("mean-3-values-on-grey-images", lambda fx: _grey(fx, "grey3", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
         r"data\.mean.*(3|channel)", guard=lambda fx: _fmnist()),
    Case("mean-1-value-on-grey-images", lambda fx: _grey(fx, "grey1", mean=[0.5], std=[0.25]), expect="correct",
         guard=lambda fx: _fmnist()),
    Case("eval-recorded-config-data-a-number", lambda fx: _recorded(fx, "rc1", lambda c: c.update(data=5)), "config"),
    Case("eval-recorded-config-val-a-list", lambda fx: _recorded(fx, "rc2", lambda c: c["data"].update(val=[1, 2])), "config|data.val"),
    Case("eval-recorded-config-batch-size-string", lambda fx: _recorded(fx, "rc3", lambda c: c["data"].update(batch_size="many")),
         "config|batch_size"),
    Case("eval-recorded-config-train-a-string", lambda fx: _recorded(fx, "rc4", lambda c: c.update(train="fast")), "config|train"),
    Case("eval-recorded-config-image-folder-a-number", lambda fx: _recorded(fx, "rc5", lambda c: c["data"]["train"].update(image_folder=5)),
         "config|image_folder"),
]) + [
    Case("eval-split-run-on-other-val-folder", _eval_other_folder, expect="correct"),
    Case("eval-split-run-after-images-added", _eval_after_images_added, expect="correct"),
    Case("dkd-temperature-1e3", lambda fx: _dkd_at(1e3), expect="correct"),
    Case("dkd-temperature-1e5", lambda fx: _dkd_at(1e5), expect="correct"),
    Case("dkd-temperature-1e-2", lambda fx: _dkd_at(1e-2), expect="correct"),
    Case("kl-teacher-probs-temperature-1e3", lambda fx: _probs_at(1e3), expect="correct"),
    Case("kl-teacher-probs-temperature-1e5", lambda fx: _probs_at(1e5), expect="correct"),
    Case("int64-pixels-not-taken-as-unit", lambda fx: _int_pixels(torch.int64), "uint8|int64"),
    Case("int32-pixels-not-taken-as-unit", lambda fx: _int_pixels(torch.int32), "uint8|int32"),
    Case("uint8-pixels-scaled", lambda fx: _int_pixels(torch.uint8), expect="correct"),
    Case("fashion-mnist-gz-decompression-bomb", _gz_bomb, "more than", guard=lambda fx: memory_cap(1 << 30)),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_images(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
