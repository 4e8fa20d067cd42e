"""The front hall between the two tasks: one table, one validation, one path rule, one loop.

Written the way a user meets each promise: a config run through ``kdkit train``, a checkpoint
or cache handed to a verb, the first release's calls in a script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _images import make_photos, tiny_model
from torch import nn

import kdkit
from kdkit.cli import main
from kdkit.errors import KDDeprecationWarning, KDError
from kdkit.run.recipes import RECIPES, recipe_for, recipe_for_cache, recipe_for_run

ROOT = Path(__file__).resolve().parents[1]


def _image_config(photos, root: Path) -> dict:
    return {
        "name": "tiny",
        "teacher": None,
        "student": tiny_model(),
        "data": {
            "train": {"image_folder": str(photos.train)},
            "val": {"image_folder": str(photos.val)},
            "image_size": 16,
            "batch_size": 4,
            "workers": 0,
        },
        "train": {"epochs": 1, "device": "cpu", "progress": False},
        "run_dir": str(root / "run"),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos"), broken=False)


# -- the table ---------------------------------------------------------------------------------
def test_one_recipe_per_task_found_from_a_config_a_checkpoint_or_a_cache(tmp_path):
    from kdkit.config import SCHEMAS, parse

    assert set(RECIPES) == set(SCHEMAS) == {"classify", "lm"}
    image = parse(
        {"student": "kdkit:fmnist_student", "data": {"train": {"fashion_mnist": "train"}}}
    )
    assert image.task == "classify" and recipe_for(image) is RECIPES["classify"]
    assert recipe_for({"config": {"task": "lm"}}) is RECIPES["lm"]
    assert recipe_for({"student": {}}) is RECIPES["classify"]  # a checkpoint without a config
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "meta.json").write_text("{}")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "manifest.json").write_text("{}")
    assert recipe_for_cache(tmp_path / "img") is RECIPES["classify"]
    assert recipe_for_cache(tmp_path / "lm") is RECIPES["lm"]
    with pytest.raises(KDError, match="not a teacher cache"):
        recipe_for_cache(tmp_path)
    with pytest.raises(KDError, match="no task 'llm'.*did you mean 'lm'"):
        recipe_for("llm")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: lm\n")
    assert recipe_for_run(tmp_path / "run") is RECIPES["lm"]
    assert recipe_for_run(tmp_path / "student.onnx") is RECIPES["classify"]


def test_the_demo_choices_are_the_recipes_demos():
    from kdkit.cli._demo import _DEMOS

    assert set(_DEMOS) == {r.demo_name for r in RECIPES.values()}


def test_a_job_a_task_does_not_have_is_one_line_naming_the_task(tmp_path, capsys):
    with pytest.raises(KDError, match="kdkit predict is not a job of task: lm runs"):
        RECIPES["lm"].predict("run", {})
    with pytest.raises(KDError, match="--hf writes a language model"):
        RECIPES["classify"].export("run", {"hf": "out"})


# -- validate once, one path rule ----------------------------------------------------------------
def _count_validations(monkeypatch) -> dict[str, int]:
    """Counters on the task's checks and on the dummy optimizer + scheduler validation builds;
    ``kdkit train`` is stopped after validation, before anything is built."""
    import kdkit.config._checks as checks
    import kdkit.config._tasks as tasks
    import kdkit.run.job as job

    counts = {"check": 0, "optimizer": 0}
    for task, schema in list(tasks.SCHEMAS.items()):

        def check(cfg, check_paths, _inner=schema.check):
            counts["check"] += 1
            _inner(cfg, check_paths)

        monkeypatch.setitem(
            tasks.SCHEMAS, task, tasks.TaskSchema(schema.config, check, schema.paths)
        )
    real = checks._try_optimizer_and_scheduler

    def try_optimizer(t):
        counts["optimizer"] += 1
        real(t)

    monkeypatch.setattr(checks, "_try_optimizer_and_scheduler", try_optimizer)

    def stop(cfg, **_):
        raise SystemExit("stopped before building")

    monkeypatch.setattr(job, "_train_run", stop)
    return counts


def test_kdkit_train_validates_an_image_config_once(photos, tmp_path, monkeypatch):
    path = tmp_path / "img.yaml"
    path.write_text(yaml.safe_dump(_image_config(photos, tmp_path)))
    counts = _count_validations(monkeypatch)
    with pytest.raises(SystemExit, match="stopped"):
        main(["train", str(path)])
    assert counts == {"check": 1, "optimizer": 1}


def test_a_task_lm_config_reads_paths_from_its_folder_and_validates_once(tmp_path, monkeypatch):
    """The image rule, now every task's: relative paths from the config file's folder (an
    input found only in the working directory is taken from there, with a warning)."""
    pytest.importorskip("transformers")
    from _lm_fixtures import tiny_llama

    folder = tmp_path / "configs"
    folder.mkdir()
    tiny_llama().config.save_pretrained(folder / "student")
    (folder / "text.txt").write_text("some text to train on\n" * 50)
    cfg = {
        "task": "lm",
        "student": {"model": "hf-config:student", "tokenizer": None},
        "data": {"text_files": ["*.txt"], "max_length": 16},
        "train": {"progress": False},
    }
    (folder / "lm.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from kdkit.config import load_resolved

    resolved = load_resolved(folder / "lm.yaml")
    assert resolved.student.model == f"hf-config:{folder / 'student'}"
    assert resolved.data.text_files == (str(folder / "*.txt"),)
    assert resolved.run_dir == str(elsewhere / "runs" / "lm")  # the default: the working dir's
    counts = _count_validations(monkeypatch)
    with pytest.raises(SystemExit, match="stopped"):
        main(["train", str(folder / "lm.yaml")])
    assert counts == {"check": 1, "optimizer": 1}


def test_an_lm_input_found_only_in_the_working_directory_is_taken_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    from kdkit.config import load_resolved

    (tmp_path / "configs").mkdir()
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("text\n")
    cfg = {
        "task": "lm",
        "student": {"model": "hf-config:student"},
        "data": {"text_files": ["notes.txt"]},
    }
    (tmp_path / "configs" / "lm.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        resolved = load_resolved(tmp_path / "configs" / "lm.yaml")
    assert resolved.student.model == f"hf-config:{tmp_path / 'student'}"
    assert resolved.data.text_files == (str(tmp_path / "notes.txt"),)
    assert "relative paths are read from the config's folder" in caplog.text


# -- the loop's contract: a Task base class, nothing legacy on the main path -------------------
class _Mean(kdkit.task.Task):
    """A task written against the base class alone: a step, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def step(self, batch):
        loss = ((batch.x.flatten(1)[:, :3] - self.w) ** 2).mean()
        return kdkit.task.StepOutput(loss, {"mse": loss.detach()}, count=len(batch.x))


def test_a_task_with_only_a_step_trains_and_a_duck_typed_one_is_refused():
    x = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8)
    loader = [(x, torch.zeros(8, dtype=torch.long))] * 4
    trainer = kdkit.Trainer(_Mean(), loader, epochs=2, device="cpu", progress=False)
    history = trainer.fit()
    assert [row["epoch"] for row in history] == [0, 1] and "loss_mse" in history[0]
    assert trainer.task.w.abs().sum() > 0  # it learned
    with pytest.raises(KDError, match="subclass of kdkit.task.Task"):
        kdkit.Trainer(nn.Linear(2, 2), loader)


def test_the_loop_loads_no_cache_no_teacher_backend_and_no_torchvision():
    code = textwrap.dedent(
        """
        import sys, kdkit
        assert not [m for m in sys.modules if m.startswith("torch")], "import kdkit: no torch"
        kdkit.Trainer
        bad = sorted(m for m in sys.modules if m.startswith(("kdkit.cache", "torchvision",
                     "kdkit.train.legacy", "kdkit.run")) or m.startswith("kdkit.teachers."))
        print(sum(m.startswith("kdkit") for m in sys.modules), bad)
        assert not bad, bad
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr


# -- round-1 contracts, as users' code calls them ----------------------------------------------
def test_round_one_calls_still_work():
    from kdkit.data import FastLoader
    from kdkit.data.arrays import ArrayDataset
    from kdkit.models import fmnist_student

    assert kdkit.teachers.OnnxTeacher.__name__ == "OnnxTeacher"  # subpackages are attributes
    assert callable(kdkit.cache.precompute) and callable(kdkit.data.ViewSampler)
    student, teacher = fmnist_student(), fmnist_student()
    with pytest.warns(KDDeprecationWarning, match="criterion=.*pairs="):
        d = kdkit.Distiller(student, teacher, criterion=kdkit.SoftTargetKL(temperature=2.0))
    assert isinstance(d.pair_list[0].loss, kdkit.SoftTargetKL)
    data = ArrayDataset(
        torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    )
    trainer = kdkit.Trainer(d, FastLoader(data, 8), epochs=3, device="cpu", progress=False)
    trainer.epochs = 1
    assert len(trainer.fit()) == 1
    with pytest.raises(KDError, match="epochs must be an integer >= 1"):
        trainer.epochs = 0


def test_checkpoints_name_the_best_score_and_older_ones_still_resume(tmp_path):
    from kdkit.data import FastLoader
    from kdkit.data.arrays import ArrayDataset
    from kdkit.load import load_checkpoint, save_checkpoint
    from kdkit.models import fmnist_student

    data = ArrayDataset(
        torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    )
    loader = FastLoader(data, 8)

    def trainer(epochs):
        d = kdkit.Distiller(fmnist_student(), None)
        return kdkit.Trainer(d, loader, loader, epochs=epochs, device="cpu", progress=False,
                             checkpoint_dir=tmp_path)  # fmt: skip

    trainer(1).fit()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["best_metric"] == "top1" and "best_top1" not in state
    state["best_top1"] = state.pop("best_score")  # a checkpoint of the previous release
    state = {k: v for k, v in state.items() if k not in ("format", "version", "checksum")}
    save_checkpoint(tmp_path / "last.pt", state)
    resumed = trainer(2)
    resumed.fit(resume=True)
    assert resumed.best_score >= state["best_top1"]
    assert json.loads(json.dumps(resumed.best_top1)) == resumed.best_score  # the older name
