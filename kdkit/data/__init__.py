"""Datasets and loaders: items are ``(uint8 image, int64 label or -1, dataset index)``.

In-memory data (Fashion-MNIST, any :class:`ArrayDataset`) goes through :class:`FastLoader`,
which batches by tensor indexing; image folders go through :class:`ImageFolderManager`'s torch
DataLoaders. Normalisation happens on the device with :func:`to_float`.
"""

from kdkit._lazy import lazy_face

#: public name -> module (loaded on first use: ``import kdkit.data`` costs no torch)
_PUBLIC = {
    "FASHION_MNIST_CLASSES": "kdkit.data.fashion_mnist",
    "FASHION_MNIST_MEAN": "kdkit.data.fashion_mnist",
    "FASHION_MNIST_STD": "kdkit.data.fashion_mnist",
    "IMAGENET_MEAN": "kdkit.data.folder",
    "IMAGENET_STD": "kdkit.data.folder",
    "ArrayDataset": "kdkit.data.arrays",
    "Batch": "kdkit.data.arrays",
    "FastLoader": "kdkit.data.arrays",
    "ImageFolderDataset": "kdkit.data.folder",
    "ImageFolderManager": "kdkit.data.folder",
    "concat": "kdkit.data.split",
    "DecodedImageDataset": "kdkit.data.decode",
    "DevicePrefetcher": "kdkit.data.prefetch",
    "EncodedImageDataset": "kdkit.data.decode",
    "ImageBytesLoader": "kdkit.data.bytes_loader",
    "ImageDecoder": "kdkit.data.decode",
    "holdout": "kdkit.data.split",
    "load_fashion_mnist": "kdkit.data.fashion_mnist",
    "load_stl10": "kdkit.data.stl10",
    "STL10_CLASSES": "kdkit.data.stl10",
    "split_labeled": "kdkit.data.split",
    "to_float": "kdkit.data.arrays",
    "ViewSampler": "kdkit.data.views",
    "Views": "kdkit.data.views",
    "prepare_input": "kdkit.data.views",
    "WithIndex": "kdkit.data.indexed",
}

__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_face(__name__, _PUBLIC)
