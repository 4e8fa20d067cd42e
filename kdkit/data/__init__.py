"""Datasets and loaders: items are ``(uint8 image, int64 label or -1, dataset index)``.

In-memory data (Fashion-MNIST, any :class:`ArrayDataset`) goes through :class:`FastLoader`,
which batches by tensor indexing; image folders go through :class:`ImageFolderManager`'s torch
DataLoaders. Normalisation happens on the device with :func:`to_float`.
"""

from kdkit.data.arrays import ArrayDataset, Batch, FastLoader, to_float
from kdkit.data.bytes_loader import ImageBytesLoader
from kdkit.data.decode import DecodedImageDataset, EncodedImageDataset, ImageDecoder
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
)
from kdkit.data.indexed import WithIndex
from kdkit.data.prefetch import DevicePrefetcher
from kdkit.data.split import concat, holdout, split_labeled
from kdkit.data.stl10 import STL10_CLASSES, load_stl10
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
    "concat",
    "DecodedImageDataset",
    "DevicePrefetcher",
    "EncodedImageDataset",
    "ImageBytesLoader",
    "ImageDecoder",
    "holdout",
    "load_fashion_mnist",
    "load_stl10",
    "STL10_CLASSES",
    "split_labeled",
    "to_float",
    "ViewSampler",
    "Views",
    "prepare_input",
    "WithIndex",
]
