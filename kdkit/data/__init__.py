"""Datasets and loaders: items are ``(uint8 image, int64 label or -1, dataset index)``.

In-memory data (Fashion-MNIST, any :class:`ArrayDataset`) goes through :class:`FastLoader`,
which batches by tensor indexing; image folders go through :class:`ImageFolderManager`'s torch
DataLoaders. Normalisation happens on the device with :func:`to_float`.
"""

from kdkit.data.arrays import ArrayDataset, Batch, FastLoader, to_float
from kdkit.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
)
from kdkit.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageFolderManager,
    ImageNetManager,
)
from kdkit.data.split import concat, holdout, split_labeled
from kdkit.data.views import Views, ViewSampler, prepare_input

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "Batch",
    "FastLoader",
    "ImageFolderDataset",
    "ImageFolderManager",
    "ImageNetManager",
    "concat",
    "holdout",
    "load_fashion_mnist",
    "split_labeled",
    "to_float",
    "ViewSampler",
    "Views",
    "prepare_input",
]
