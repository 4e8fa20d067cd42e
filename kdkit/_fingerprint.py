"""The fingerprint of a model's weights (ground floor).

Teachers, the teacher cache, the ONNX exporter and int8 calibration all name "this model with
these weights" the same way, so it lives below all of them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kdkit.capture import unwrap

__all__ = ["module_fingerprint"]


def module_fingerprint(model: nn.Module) -> str:
    """sha256 over the class name and every parameter/buffer (name, shape, dtype, bytes)."""
    h = hashlib.sha256(type(unwrap(model)).__qualname__.encode())
    for name, tensor in unwrap(model).state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
