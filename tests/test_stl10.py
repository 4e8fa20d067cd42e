"""load_stl10 on small files written in the official binary layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit import KDError
from kdkit.data import ArrayDataset, FastLoader, load_stl10


def _write(folder, split: str, n: int, seed: int, labels: bool = True) -> np.ndarray:
    """Write ``n`` random images (and labels 1..10) as STL-10 does; return (N, 3, H, W)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
    # official order: per image, per channel, column-major (x varies slowest within a column)
    images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
    if labels:
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    return images


@pytest.fixture
def stl(tmp_path):
    folder = tmp_path / "stl10_binary"  # torchvision's layout: root/stl10_binary/
    folder.mkdir()
    arrays = {
        "train": _write(folder, "train", 12, 0),
        "test": _write(folder, "test", 7, 1),
        "unlabeled": _write(folder, "unlabeled", 5, 2, labels=False),
    }
    return tmp_path, folder, arrays


def test_shapes_labels_and_pixels(stl):
    root, folder, arrays = stl
    train = load_stl10(root, "train")
    assert isinstance(train, ArrayDataset) and train.images.shape == (12, 3, 96, 96)
    assert train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(arrays["train"]))
    assert train.labels.tolist() == [i % 10 for i in range(12)]
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    test = load_stl10(folder, "test")  # the folder itself works too
    assert torch.equal(test.images, torch.from_numpy(arrays["test"]))
    unl = load_stl10(root, "unlabeled")
    assert unl.images.shape == (5, 3, 96, 96) and set(unl.labels.tolist()) == {-1}
    both = load_stl10(root, "train+unlabeled")
    assert len(both) == 17 and both.labels[:12].tolist() == train.labels.tolist()
    assert both.labels[12:].tolist() == [-1] * 5 and both.indices.tolist() == list(range(17))


def test_memory_mapped_and_loadable(stl):
    root, _, arrays = stl
    train = load_stl10(root, "train")
    # a transposed view of the mapped file, not a decoded copy; writes never reach the file
    size = (root / "stl10_binary" / "train_X.bin").stat().st_size
    assert not train.images.is_contiguous() and train.images.untyped_storage().nbytes() == size
    before = (root / "stl10_binary" / "train_X.bin").read_bytes()
    train.images[0].zero_()
    assert (root / "stl10_binary" / "train_X.bin").read_bytes() == before
    train = load_stl10(root, "train")
    # the fingerprint streams chunks but equals the in-memory dataset's
    copy = ArrayDataset(train.images.contiguous().clone(), train.labels)
    assert train.fingerprint() == copy.fingerprint()
    images, labels, index = next(iter(FastLoader(train, 5, shuffle=True, seed=0)))
    assert images.shape == (5, 3, 96, 96)
    assert torch.equal(images, torch.from_numpy(arrays["train"])[index])
    assert torch.equal(labels, train.labels[index])


def test_truncated_and_missing_files(stl):
    root, folder, _ = stl
    path = folder / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KDError, match=r"train_X\.bin has .* 331,776 were expected"):
        load_stl10(root, "train")
    unl = folder / "unlabeled_X.bin"
    unl.write_bytes(unl.read_bytes()[:-1])
    with pytest.raises(KDError, match=r"unlabeled_X\.bin .* 110,592 were expected"):
        load_stl10(root, "unlabeled")
    (folder / "test_y.bin").unlink()
    with pytest.raises(KDError, match=r"test_y\.bin"):
        load_stl10(root, "test")
    with pytest.raises(KDError, match="split must be one of"):
        load_stl10(root, "val")
    with pytest.raises(KDError, match="no STL-10 binary files"):
        load_stl10(root / "nowhere", "train")


def test_stl10_is_a_kdkit_train_data_source(stl):
    from pathlib import Path

    from kdkit.config import load_config
    from kdkit.run.data import build_data

    root, _, _ = stl
    recipe = Path(__file__).parents[1] / "configs" / "stl10_clip_resnet18.yaml"
    cfg = load_config(
        recipe,
        [f"data.train.root={root}", f"data.val.root={root}", "data.batch_size=4"],
    )
    data = build_data(cfg.data, seed=0)
    assert data.input_shape == (3, 96, 96) and data.classes[0] == "airplane"
    assert len(data.train_dataset) == 12 + 5 and len(data.val_loader.dataset) == 7
    labels = torch.cat([b[1] for b in data.train_loader])
    assert int((labels == -1).sum()) == 5
    with pytest.raises(KDError, match="stl10 needs root"):
        load_config(recipe, ["data.train.root=null"], check_paths=False)


def test_precompute_from_a_stl10_config(stl, tmp_path, capsys):
    import yaml

    from kdkit.cli import main

    root, _, _ = stl
    tiny = {"model": "kdkit:fmnist_student", "kwargs": {"in_channels": 3}}
    from kdkit.models import fmnist_student

    weights = tmp_path / "teacher.pt"  # a fixed teacher (a random one differs every build)
    torch.save(fmnist_student(in_channels=3).state_dict(), weights)
    cfg = {
        "teacher": {**tiny, "weights": str(weights)},
        "student": tiny,
        "data": {
            "train": {"stl10": "train+unlabeled", "root": str(root)},
            "batch_size": 8,
            "views": {"crop": "pad", "num_views": 1},
        },
        "train": {"device": "cpu"},
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "stl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["precompute", str(path), "--no-progress"]) == 0
    assert "17 samples x 1 views, full fp16 logits" in capsys.readouterr().out
    assert main(["cache", "check", str(path)]) == 0
