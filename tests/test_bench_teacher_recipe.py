"""benchmarks/bench_teacher_recipe.py: its recipes parse, and one trains end to end on a tiny
synthetic split into a teacher checkpoint that ``kdkit.load_model`` reads back."""

import json

import pytest
import torch
from _scripts import benchmark_module

from kdkit.data.arrays import ArrayDataset


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_teacher_recipe")


def test_recipes_parse(bench):
    assert bench.parse_recipe("sgd-e40") == {"optimizer": "sgd", "epochs": 40}
    assert bench.parse_recipe("adamw") == {"optimizer": "adamw", "epochs": 40}
    for bad in ("adam-e2", "sgd-x3", "sgd-eX"):
        with pytest.raises(SystemExit):
            bench.parse_recipe(bad)


def test_a_recipe_trains_into_a_loadable_teacher(bench, tmp_path, monkeypatch, one_thread):
    import kdkit

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 1, 28, 28), dtype=torch.uint8, generator=g)
    tiny = ArrayDataset(images, torch.arange(80) % 10)
    monkeypatch.setattr(bench, "load_fashion_mnist", lambda split: tiny)
    monkeypatch.setattr(bench, "holdout", lambda d, n, seed: (d, d))
    r = bench.train("sgd-e1", 0, tmp_path)
    assert len(r["val_top1"]) == 1 and 0 <= r["test_top1"] <= 100
    model, _ = kdkit.load_model(r["path"])
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(r) + "\n")
    assert "Chosen on validation: sgd-e1" in bench.table(log)
