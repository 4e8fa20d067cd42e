"""The cache's CLI: ``kdkit precompute`` and ``kdkit cache verify/info/check`` on a tiny cache
(tests/_cache_setup.py), from a checkpoint, an ONNX file and Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cache_setup import MEAN, SIZE, STD, N, make_cache, shard_path, tiny_dataset, tiny_teacher

from kdkit.cache import CachedTeacher, read_meta
from kdkit.cli import main as cli_main
from kdkit.data.views import ViewSampler, prepare_input
from kdkit.errors import KDError


def test_cli_verify_and_info(tmp_path, capsys):
    make_cache(tmp_path)
    assert cli_main(["cache", "verify", str(tmp_path)]) == 0
    assert cli_main(["cache", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "40 x 3 views" in out and "bytes per sample-view" in out
    path = shard_path(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    assert cli_main(["cache", "verify", str(tmp_path)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_cli_precompute_and_check_a_checkpoint_teacher(tmp_path, capsys, monkeypatch):
    import kdkit.run.cache_job as cache_job

    (tmp_path / "tiny_teacher.py").write_text(
        "from _cache_setup import tiny_teacher\n\ndef build():\n    return tiny_teacher()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(cache_job, "named_dataset", lambda spec: (tiny_dataset(), MEAN, STD))
    ckpt = tmp_path / "teacher.pt"
    torch.save({"student": tiny_teacher().state_dict()}, ckpt)  # a demo-style checkpoint
    out = tmp_path / "cache"
    arch = "python:tiny_teacher:build"  # the test's own code: needs --trust-code
    teacher_args = ["--teacher", str(ckpt), "--arch", arch, "--device", "cpu", "--trust-code"]
    args = ["precompute", *teacher_args, "--data", "tiny", "--views", "2", "--pad", "1"]
    args += ["--topk", "3", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    meta = read_meta(out)
    assert (meta["num_samples"], meta["num_views"], meta["topk"]) == (N, 2, 3)
    assert meta["views"]["crop"] == "pad" and meta["views"]["size"] == [SIZE, SIZE]
    assert meta["source"]["data"] == "tiny"
    assert cli_main(["cache", "check", str(out), *teacher_args, "--n-probe", "16"]) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    torch.save({"student": tiny_teacher(seed=1).state_dict()}, ckpt)  # the teacher moved on
    assert cli_main(["cache", "check", str(out), *teacher_args]) == 2
    assert "disagrees with the live teacher" in capsys.readouterr().err
    wrong = ["--teacher", str(ckpt), "--arch", "kdkit.models:fmnist_student"]
    assert cli_main(["cache", "check", str(out), *wrong]) == 2
    assert "the weights do not fit SmallCNN" in capsys.readouterr().err


def test_cli_loads_fashion_mnist_with_its_statistics():
    from kdkit.data import FASHION_MNIST_MEAN
    from kdkit.run.cache_job import named_dataset as load_data

    with pytest.raises(KDError, match="unknown dataset 'mnist'"):
        load_data("mnist:train")
    try:
        dataset, mean, _ = load_data("fashion-mnist:test")
    except KDError as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    assert len(dataset) == 10000 and mean == FASHION_MNIST_MEAN


def test_cli_precompute_from_an_onnx_teacher(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    import kdkit.run.cache_job as cache_job
    from kdkit.export import export_onnx

    monkeypatch.setattr(cache_job, "named_dataset", lambda spec: (tiny_dataset(), MEAN, STD))
    onnx_path = tmp_path / "teacher.onnx"
    export_onnx(tiny_teacher(), onnx_path, (1, SIZE, SIZE))
    out = tmp_path / "cache"
    args = ["precompute", "--teacher", str(onnx_path), "--data", "tiny", "--views", "2"]
    assert cli_main([*args, "--pad", "1", "--dtype", "fp32", "--out", str(out)]) == 0
    index, view = torch.arange(N), torch.arange(N) % 2
    views = ViewSampler.from_config(read_meta(out)["views"])
    x = prepare_input(tiny_dataset().images, index, view, views, MEAN, STD, "cpu")
    got = CachedTeacher(out)(x, index=index, view=view).logits
    torch.testing.assert_close(got, tiny_teacher()(x), atol=1e-4, rtol=1e-4)
    assert cli_main(["cache", "check", str(out), "--teacher", str(onnx_path)]) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
