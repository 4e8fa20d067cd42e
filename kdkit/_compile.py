"""``torch.compile`` as kdkit uses it: the batch dimension static.

By default Dynamo compiles for the first shape it sees and, on the first call with another
shape (a partial last batch, a probe batch), recompiles with a *dynamic* batch dimension;
every later call then runs the dynamic-shape kernels, slower than static ones, and a
resnet152 pays the compile twice. ``dynamic=False`` keeps one static graph per batch size
(a partial last batch adds one; ``drop_last`` avoids it: the run builder drops it when
``train.compile`` is on). Warm a compiled model under the autocast state and shapes of
training (the Trainer's dry run does): Dynamo guards on both.
"""

from __future__ import annotations

from torch import nn

__all__ = ["compile_static"]


def compile_static(module: nn.Module) -> nn.Module:
    """``torch.compile(module, dynamic=False)`` (see the module docstring)."""
    import torch

    return torch.compile(module, dynamic=False)
