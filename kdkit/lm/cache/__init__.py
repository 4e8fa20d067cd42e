"""The offline LM teacher: a verified top-k cache (``kdkit lm capture``), read by the fused loss.

- :mod:`~kdkit.lm.cache.format`: the on-disk format ``kdkit-lm-topk/1`` and its manifest;
- :mod:`~kdkit.lm.cache.capture`: the teacher over the corpus, once, resumable;
- :mod:`~kdkit.lm.cache.reader`: rows found by hash, checked and decoded for each batch;
- :mod:`~kdkit.lm.cache.target`: :class:`TopKTarget`, every tail policy exact;
- :mod:`~kdkit.lm.cache.inspect`: ``kdkit lm cache info | verify | check``.
"""

from kdkit.lm.cache.capture import capture
from kdkit.lm.cache.reader import CachedAligner, TopKCache
from kdkit.lm.cache.target import TAIL_POLICIES, TopKTarget

__all__ = ["TAIL_POLICIES", "CachedAligner", "TopKCache", "TopKTarget", "capture"]
