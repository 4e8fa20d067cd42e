"""Hostile values (issue 23): every value is checked before it reaches torch.

Config values that used to reach torch (a traceback from ``kdkit train``) or pass silently,
YAML that hangs or silently drops a section, and checkpoints whose checksum holds but whose
plain fields are nonsense. Config rows use ``--print-config``: a value it accepts is one
``kdkit train`` would build with, so accepting a bad one is ``silent``. Rows and verdicts:
tests/_hostile/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _hostile import Case, Fx, hang_post, in_thread, judge_row, params

from kdkit.errors import KDError

pytestmark = pytest.mark.usefixtures("one_thread")


def _set(*pairs: str):
    def argv(fx: Fx) -> list:
        out = ["train", fx.cfg, "--run-dir", fx.root / "work" / "never", "--print-config"]
        for pair in pairs:
            out += ["--set", pair]
        return out

    return argv


def _yaml_file(fx: Fx, name: str, text: str) -> Path:
    path = fx.root / "work" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


_BOMB = "".join(
    f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, a in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


def _bomb(fx: Fx) -> None:
    path = _yaml_file(fx, "bomb.yaml", "name: x\n" + _BOMB)
    assert path.stat().st_size < 1024
    from kdkit.cli import main

    rc = in_thread(
        fx.hung,
        "yaml-alias-bomb-print-config",
        lambda: main(["train", str(path), "--print-config"]),
    )
    if rc == 2:
        raise KDError("refused: alias")  # the one line itself is checked by yaml-alias-bomb-lib
    return rc


def _dup(fx: Fx, text: str) -> list:
    base = yaml.safe_dump(yaml.safe_load(fx.cfg.read_text()))
    return ["train", _yaml_file(fx, "dup.yaml", base + text), "--print-config"]


def _big(fx: Fx) -> list:
    text = fx.cfg.read_text() + "#" + "x" * (2 << 20) + "\n"
    return ["train", _yaml_file(fx, "big.yaml", text), "--print-config"]


def _large_config_c_loader(fx: Fx) -> bool:
    from kdkit.config import _yaml, read_yaml

    data = yaml.safe_load(fx.cfg.read_text())
    data["student"]["kwargs"] = {"num_classes": 2, "in_channels": 3}
    extra = {f"k{i}": list(range(20)) for i in range(2000)}  # ~200 KB of plain values
    path = _yaml_file(fx, "large.yaml", yaml.safe_dump({**data, "extra": extra}))
    loaded = read_yaml(path)
    c_loader = not yaml.__with_libyaml__ or _yaml._Loader is yaml.CSafeLoader
    return c_loader and loaded["extra"]["k1999"] == list(range(20))


# -- checkpoints whose checksum holds -------------------------------------------------------
def _sealed(fx: Fx, name: str, **changes) -> Path:
    """The run's best.pt with changed plain fields and a recomputed checksum."""
    from kdkit.load import checksum

    state = torch.load(fx.run / "best.pt", weights_only=True)
    state.update(changes)
    state["checksum"] = checksum(state)
    run = fx.root / "work" / name
    run.mkdir(parents=True, exist_ok=True)
    torch.save(state, run / "best.pt")
    return run / "best.pt"


def _export(fx: Fx, ckpt: Path) -> list:
    return ["export", ckpt, "--onnx", fx.root / "work" / f"{ckpt.parent.name}.onnx", "--no-verify"]


def _config_with(fx: Fx, **train) -> dict:
    cfg = yaml.safe_load((fx.run / "config.yaml").read_text())
    cfg["train"].update(train)
    return cfg


CASES: list[Case] = [
    # devices
    Case("config-device-foo", _set("train.device=foo"), "train.device.*not a device", cli=True),
    Case("config-device-cpu-colon-x", _set("train.device=cpu:x"), "train.device.*not a device", cli=True),
    Case("config-device-cuda-7", _set("train.device=cuda:7"), "train.device.*CUDA", cli=True),
    # optimizer and scheduler arguments
    Case("config-sgd-momentum-negative", _set("train.optimizer.name=SGD", "train.optimizer.args.momentum=-1"), "momentum", cli=True),
    Case("config-adamw-betas-above-one", _set("train.optimizer.args.betas=[2, 3]"), "beta", cli=True),
    Case("config-adamw-eps-string", _set("train.optimizer.args.eps=tiny"), "train.optimizer", cli=True),
    Case("config-lr-inf", _set("train.optimizer.lr=.inf"), "train.optimizer.lr", cli=True),
    Case("config-steplr-step-size-zero", _set("train.scheduler.name=StepLR", "train.scheduler.args.step_size=0"), "train.scheduler.args.*StepLR", cli=True),
    Case("config-steplr-step-size-string", _set("train.scheduler.name=StepLR", "train.scheduler.args.step_size=ten"), "train.scheduler.args", cli=True),
    Case("config-exponentiallr-gamma-string", _set("train.scheduler.name=ExponentialLR", "train.scheduler.args.gamma=x"), "train.scheduler.args", cli=True),
    Case("config-cosine-t-max-zero", _set("train.scheduler.name=CosineAnnealingLR", "train.scheduler.args.T_max=0"), "train.scheduler.args", cli=True),
    Case("config-onecycle-filled-in", _set("train.scheduler.name=OneCycleLR"), expect="correct", cli=True),
    Case("config-max-grad-norm-inf", _set("train.max_grad_norm=.inf"), "max_grad_norm", cli=True),
    # sizes, workers, seeds, strides
    Case("config-image-size-100000", _set("data.image_size=100000"), "data.image_size", cli=True),
    Case("config-workers-10000", _set("data.workers=10000"), "data.workers", cli=True),
    Case("config-seed-2-to-the-80", _set(f"train.seed={2**80}"), "train.seed", cli=True),
    Case("config-data-seed-negative", _set("data.seed=-5"), "data.seed", cli=True),
    Case("config-pad-larger-than-image", _set("data.views={crop: pad, pad: 1000}"), "data.views.pad", cli=True),
    # mean / std, weights, names
    Case("config-std-zero", _set("data.std=[0, 1, 1]"), "data.std.*> 0", cli=True),
    Case("config-mean-nan", _set("data.mean=[.nan, 0, 0]"), "data.mean", cli=True),
    Case("config-student-weight-inf", _set("distill.student_weight=.inf"), "student_weight", cli=True),
    Case("config-name-empty", _set("name="), "'name'", cli=True),
    Case("config-name-with-slash", _set("name=../../etc"), "'name'", cli=True),
    # YAML
    Case("yaml-alias-bomb-print-config", _bomb, "alias", post=hang_post("yaml-alias-bomb-print-config")),
    Case("yaml-alias-bomb-lib", lambda fx: __import__("kdkit").config.read_yaml(_yaml_file(fx, "bomb2.yaml", "name: x\n" + _BOMB)), "alias bomb"),
    Case("yaml-duplicate-key", lambda fx: _dup(fx, "name: other\n"), "duplicate key 'name'", cli=True),
    Case("yaml-duplicate-section", lambda fx: _dup(fx, "train: {epochs: 9}\n"), "duplicate key 'train'", cli=True),
    Case("yaml-recursive-alias", lambda fx: ["train", _yaml_file(fx, "rec.yaml", "name: &a [*a]\n"), "--print-config"], "recursive alias", cli=True),
    Case("yaml-2-mb-file", _big, "at most", cli=True),
    Case("yaml-set-alias-bomb", lambda fx: [*_set()(fx), "--set", "name=" + _BOMB.replace("\n", ", ").join("{}")], "alias|'name'", cli=True),
    Case("yaml-large-config-c-loader", _large_config_c_loader, expect="correct"),
    # checkpoints: sealed but nonsensical plain fields
    Case("ckpt-input-shape-negative-export", lambda fx: _export(fx, _sealed(fx, "c1", input_shape=[0, -3])), "'input_shape'", cli=True),
    Case("ckpt-input-shape-string-export", lambda fx: _export(fx, _sealed(fx, "c2", input_shape="3x16x16")), "'input_shape'", cli=True),
    Case("ckpt-std-zero-eval", lambda fx: ["eval", _sealed(fx, "c3", std=[0.0, 0.0, 0.0])], "'std'", cli=True),
    Case("ckpt-mean-nan-export", lambda fx: _export(fx, _sealed(fx, "c4", mean=[float("nan")] * 3)), "'mean'", cli=True),
    Case("ckpt-config-a-string-eval", lambda fx: ["eval", _sealed(fx, "c5", config="oops")], "'config'", cli=True),
    Case("ckpt-epoch-negative-load", lambda fx: __import__("kdkit").load_model(_sealed(fx, "c6", epoch=-4)), "'epoch'"),
    Case("eval-data-other-channels", lambda fx: ["eval", _sealed(fx, "c7", input_shape=[1, 16, 16])], r"trained on inputs of shape \[1, 16, 16\].*\[3, 16, 16\]", cli=True),
    # issue 21: eval scores at the size the checkpoint records (--data image_size=N overrides, warned)
    Case("eval-data-other-size", lambda fx: ["eval", _sealed(fx, "c8", input_shape=[3, 32, 32])], expect="correct", cli=True),
    Case("eval-same-data-scores", lambda fx: ["eval", fx.run], expect="correct", cli=True),
    # the library: LoopOptions(device=...)
    Case("trainer-device-foo", lambda fx: __import__("kdkit").LoopOptions(device="foo"), "not a device"),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_values(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
