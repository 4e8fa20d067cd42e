"""InputPipeline (kdkit/data/pipeline.py): a raw batch -> one step's ModelInput."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kdkit.data import ArrayDataset, ViewSampler
from kdkit.data.pipeline import InputPipeline, ModelInput
from kdkit.errors import KDError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return x, torch.arange(n) % 3, torch.arange(10, 10 + n)


def _normalized(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.double() / 255 - mean) / std


def test_uint8_becomes_float_once_and_is_normalized_with_the_given_mean_and_std():
    x, y, idx = _batch()
    before = x.clone()
    out = InputPipeline(None, MEAN, STD)((x, y, idx))
    assert isinstance(out, ModelInput) and out.x.dtype == torch.float32 and len(out) == 4
    torch.testing.assert_close(out.x.double(), _normalized(x), rtol=0, atol=1e-6)
    assert torch.equal(x, before)  # scaled on a copy: the loader's batch is untouched
    floats = InputPipeline(None, MEAN, STD)(x.float() / 255)  # float: already in [0, 1]
    torch.testing.assert_close(floats.x, out.x)
    assert torch.equal(InputPipeline()(x).x, x.float() / 255)  # no mean/std: [0, 1] only


class _Copies(TorchFunctionMode):
    """The dtype of every tensor ``.to(device)`` moves."""

    def __init__(self):
        super().__init__()
        self.moved: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and (len(args) > 1 or "device" in kwargs):
            self.moved.append(args[0].dtype)
        return func(*args, **kwargs)


def test_images_cross_to_the_device_as_uint8_once():
    """A quarter of float32's bytes over the bus; the division happens on the device."""
    x, _, _ = _batch()
    with _Copies() as copies:
        InputPipeline(None, MEAN, STD, device="cpu")(x)
    assert copies.moved[0] == torch.uint8
    assert copies.moved.count(torch.uint8) == 1


def test_the_same_seed_epoch_and_index_give_the_same_view():
    sampler = ViewSampler(seed=3, num_views=4, crop="pad", pad=2, size=8, flip_p=0.5)
    pipe = InputPipeline(sampler, MEAN, STD)
    x, y, idx = _batch(8)
    a, again = pipe((x, y, idx), epoch=1), pipe((x, y, idx), epoch=1)
    assert torch.equal(a.x, again.x) and torch.equal(a.view_ids, again.view_ids)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    shuffled = pipe((x[order], y[order], idx[order]), epoch=1)  # another batch order
    assert torch.equal(shuffled.x, a.x[order]) and torch.equal(shuffled.view_ids, a.view_ids[order])
    fresh = InputPipeline(ViewSampler(seed=3, num_views=4, crop="pad", pad=2, size=8), MEAN, STD)
    assert torch.equal(fresh((x, y, idx), epoch=1).x, a.x)  # a new pipeline, the same views
    assert torch.equal(pipe((x, y, idx), epoch=2).view_ids, (a.view_ids + 1) % 4)
    assert not torch.equal(pipe((x, y, idx), epoch=2).x, a.x)
    other_seed = InputPipeline(ViewSampler(seed=4, num_views=4, crop="pad", pad=2, size=8))
    assert not torch.equal(
        other_seed((x, y, idx), epoch=1).x, InputPipeline(sampler)((x, y, idx), 1).x
    )


def test_evaluation_skips_the_views():
    sampler = ViewSampler(seed=3, num_views=4, crop="pad", pad=2, size=8)
    x, y, idx = _batch()
    out = InputPipeline(sampler, MEAN, STD)((x, y, idx), epoch=5, augment=False)
    assert out.view_ids is None
    torch.testing.assert_close(out.x.double(), _normalized(x), rtol=0, atol=1e-6)


def test_labels_are_checked_on_the_host_and_labeled_is_a_host_bool():
    """The images go to the device (``meta`` here: no values there to read), the labels,
    index and view ids stay on the CPU, and whether any row is labeled is a Python bool."""
    x, _, idx = _batch()
    pipe = InputPipeline(None, MEAN, STD, device="meta")
    out = pipe((x, torch.tensor([-1, 2, -1, -1]), idx))
    assert out.x.device.type == "meta" and out.x.shape == (4, 3, 8, 8)
    assert out.labels.device.type == "cpu" and out.index.device.type == "cpu"
    assert out.labeled is True
    unlabeled = pipe((x, torch.full((4,), -1), idx))
    assert unlabeled.labeled is False
    assert pipe(x).labels is None and pipe(x).labeled is False  # images only
    with pytest.raises(KDError, match=r"-1 for unlabeled rows; got values in \[-5, 1\]"):
        pipe((x, torch.tensor([0, -5, 1, 1]), idx))
    with pytest.raises(KDError, match="integer class ids"):
        pipe((x, torch.tensor([0.0, 1.0, 1.0, 0.0]), idx))


def test_channels_last_and_the_device_follow_the_trainer():
    x, y, idx = _batch()
    out = InputPipeline(None, MEAN, STD, channels_last=True)((x, y, idx))
    assert out.x.is_contiguous(memory_format=torch.channels_last)
    assert not InputPipeline(None, MEAN, STD)((x, y, idx)).x.is_contiguous(
        memory_format=torch.channels_last
    )
    pipe = InputPipeline()
    assert pipe.to("meta") is pipe and pipe(x).x.device.type == "meta"


def test_malformed_batches_are_refused_with_the_fix():
    x, y, idx = _batch()
    sampler = ViewSampler(seed=0, num_views=2, crop="pad", pad=1, size=8)
    with pytest.raises(KDError, match=r"views need dataset indices: yield \(x, y, index\)"):
        InputPipeline(sampler)((x, y))
    with pytest.raises(KDError, match="batches must be images"):
        InputPipeline()((x, y, idx, idx))
    mixing = ViewSampler(seed=0, num_views=2, crop="pad", pad=1, size=8, mixup=0.4)
    with pytest.raises(KDError, match="mixup/cutmix views need a training loader with a .dataset"):
        InputPipeline(mixing)((x, y, idx))
    dataset = ArrayDataset(torch.zeros(16, 3, 8, 8, dtype=torch.uint8), torch.zeros(16).long())
    mixed = InputPipeline(mixing, dataset=dataset)((x, y, idx))  # partners from the dataset
    assert mixed.x.shape == (4, 3, 8, 8) and torch.isfinite(mixed.x).all()
