"""A run's and a cache's own files (issue 40): every file kdkit keeps in a run directory
(``choices.json``, ``classes.json``, ``extended.json``, ``config.yaml``, ``metrics.csv``,
``report.md``, ``last.pt`` / ``best.pt``) or a cache folder (manifests, shards, the saved
tokenizer) is an input no command may write over, whichever run or cache the command was
given. Each row names such a file as an output; the file must be left as it was. Rows and
verdicts: tests/_hostile/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _hostile import Case, Fx, cli_rows, judge_row, params

pytestmark = pytest.mark.usefixtures("one_thread")

_KEPT: dict[str, bytes] = {}  # row -> the bytes of the file it must not change


def _keep(row: str, path: Path) -> Path:
    _KEPT[row] = path.read_bytes()
    return path


def _intact(row: str, path_of):
    def post(fx: Fx) -> str | None:
        path = path_of(fx)
        return None if path.is_file() and path.read_bytes() == _KEPT[row] else "loss"

    return post


def _run(fx: Fx, name: str) -> Path:
    """A copy of the room's finished image run, with the records ``auto`` choices and
    ``--resume`` with more epochs leave (choices.json, extended.json)."""
    dst = fx.root / "work" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(fx.run, dst)
    choice = {"value": "torch", "seconds_per_batch": {"torch": 0.01}, "skipped": {}, "cost_s": 0.1}
    (dst / "choices.json").write_text(json.dumps({"teacher.backend": choice}) + "\n")
    (dst / "extended.json").write_text(json.dumps([{"from": 1, "to": 2}]) + "\n")
    return dst


def _export_over(name: str, other_run: bool = False):
    """``kdkit export RUN --onnx RUN/NAME`` (or into another run's NAME)."""
    row = f"export-onnx-over-{'other-' if other_run else ''}run-{name}"

    def argv(fx: Fx) -> list:
        run = _run(fx, f"x-{row}")
        target_run = _run(fx, f"y-{row}") if other_run else run
        return ["export", run, "--onnx", _keep(row, target_run / name)]

    path_of = lambda fx: fx.root / "work" / f"{'y' if other_run else 'x'}-{row}" / name  # noqa: E731
    return Case(row, argv, "kdkit keeps|own file|input", post=_intact(row, path_of))


def _lm_cache_file(rel: str):
    row = f"export-onnx-over-lm-cache-{rel.replace('/', '-')}"

    def argv(fx: Fx) -> list:
        cache = fx.lm.copy(fx.lm.cache, row)
        return ["export", fx.run, "--onnx", _keep(row, cache / rel)]

    return Case(
        row,
        argv,
        "kdkit keeps|own file|cache",
        post=_intact(row, lambda fx: fx.lm.root / "work" / row / rel),
    )


def _image_cache_file(fx: Fx) -> list:
    row = "export-onnx-over-image-cache-meta"
    cache = fx.root / "work" / row
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(fx.cache, cache)
    return ["export", fx.run, "--onnx", _keep(row, cache / "meta.json")]


def _init_over(fx: Fx) -> list:
    run = _run(fx, "init-over")
    return [
        "init",
        "fmnist_kd",
        "-o",
        _keep("init-force-over-run-config-yaml", run / "config.yaml"),
        "--force",
    ]


def _demo_into_run(fx: Fx) -> list:
    run = _run(fx, "demo-into")
    _keep("demo-out-is-a-run", run / "report.md")
    return ["demo", "--quick", "--no-progress", "--out", run]


def _lm_export_hf_into_cache_tokenizer(fx: Fx) -> list:
    cache = fx.lm.copy(fx.lm.cache, "hf-into-tok")
    _keep("lm-export-hf-into-cache-tokenizer", cache / "tokenizer" / "tokenizer.json")
    return ["export", fx.lm.run, "--hf", cache / "tokenizer"]


def _lm_capture_into_run(fx: Fx) -> list:
    run = fx.lm.copy(fx.lm.run, "capture-into-run")
    _keep("lm-capture-out-is-a-run", run / "config.yaml")
    return ["precompute", fx.lm.write("into-run"), "--out", run, "--no-progress"]


def _precompute_into_lm_cache(fx: Fx) -> list:
    cache = fx.lm.copy(fx.lm.cache, "precompute-into")
    _keep("precompute-out-is-an-lm-cache", cache / "manifest.json")
    return ["precompute", "--teacher", fx.onnx, "--out", cache, "--no-progress", "--device", "cpu"]


# -- the same files read back: a run's records edited by hand --------------------------------
def _resume_with(fx: Fx, name: str, file: str, text: str) -> list:
    """``kdkit train CONFIG --resume`` on a copy of the run whose ``file`` holds ``text``."""
    run = _run(fx, name)
    (run / file).write_text(text)
    return ["train", fx.cfg, "--run-dir", run, "--resume", "--set", "train.epochs=2"]


def _eval_with_classes(fx: Fx, text: str) -> list:
    """An older checkpoint (no class names inside) beside a classes.json holding ``text``."""
    import torch

    from kdkit.load import checksum

    run = _run(fx, "classes-json")
    state = torch.load(run / "best.pt", weights_only=True)
    state["classes"] = None
    state["checksum"] = checksum(state)
    torch.save(state, run / "best.pt")
    (run / "classes.json").write_text(text)
    return ["eval", run / "best.pt"]


DEEP = "[" * 100_000 + "]" * 100_000


def _path(*parts: str):
    return lambda fx: fx.root / "work" / Path(*parts)


CASES: list[Case] = cli_rows([
    _export_over("choices.json"),
    _export_over("classes.json"),
    _export_over("extended.json"),
    _export_over("metrics.csv"),
    _export_over("report.md"),
    _export_over("best.pt", other_run=True),
    _export_over("config.yaml", other_run=True),
    _export_over("choices.json", other_run=True),
    _lm_cache_file("manifest.json"),
    _lm_cache_file("shard-00000.safetensors"),
    _lm_cache_file("tokenizer/tokenizer.json"),
    Case("export-onnx-over-image-cache-meta", _image_cache_file, "kdkit keeps|own file|cache",
         post=_intact("export-onnx-over-image-cache-meta", _path("export-onnx-over-image-cache-meta", "meta.json"))),
    Case("init-force-over-run-config-yaml", _init_over, "kdkit keeps|own file|run",
         post=_intact("init-force-over-run-config-yaml", _path("init-over", "config.yaml"))),
    Case("demo-out-is-a-run", _demo_into_run, "run|report\\.md", post=_intact("demo-out-is-a-run", _path("demo-into", "report.md"))),
    Case("lm-export-hf-into-cache-tokenizer", _lm_export_hf_into_cache_tokenizer, "not empty|cache|kdkit keeps",
         post=_intact("lm-export-hf-into-cache-tokenizer", lambda fx: fx.lm.root / "work" / "hf-into-tok" / "tokenizer" / "tokenizer.json")),
    Case("lm-capture-out-is-a-run", _lm_capture_into_run, "run|not empty",
         post=_intact("lm-capture-out-is-a-run", lambda fx: fx.lm.root / "work" / "capture-into-run" / "config.yaml")),
    Case("precompute-out-is-an-lm-cache", _precompute_into_lm_cache, "cache",
         post=_intact("precompute-out-is-an-lm-cache", lambda fx: fx.lm.root / "work" / "precompute-into" / "manifest.json")),
    Case("export-onnx-new-file-in-run", lambda fx: ["export", fx.run, "--onnx", _run(fx, "newfile") / "student.onnx"], expect="correct"),
    Case("resume-choices-json-nested-deep", lambda fx: _resume_with(fx, "choices-deep", "choices.json", DEEP), "choices.json"),
    Case("resume-choices-json-a-list", lambda fx: _resume_with(fx, "choices-list", "choices.json", "[1, 2]"), "choices.json"),
    Case("resume-choices-json-record-a-string", lambda fx: _resume_with(fx, "choices-str", "choices.json", '{"teacher.backend": "torch"}'),
         "choices.json"),
    Case("resume-extended-json-garbage-still-resumes", lambda fx: _resume_with(fx, "ext-bad", "extended.json", "{oops"),
         expect="correct"),
    Case("eval-classes-json-not-names", lambda fx: _eval_with_classes(fx, '{"cat": 1}'), "classes.json"),
    Case("eval-classes-json-not-json", lambda fx: _eval_with_classes(fx, "cat, dog"), "classes.json"),
])  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_runfiles(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
