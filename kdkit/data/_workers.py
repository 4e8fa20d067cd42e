"""Stop a DataLoader's persistent workers now, not whenever the loader happens to be freed.

``torch.utils.data.DataLoader`` has no public ``close()``: its workers stop when its cached
iterator is freed. A loader kept alive by a reference cycle is freed only by the cyclic GC,
and one still alive at interpreter exit leaves each persistent worker to notice on its own
(measured: 10.3 s to exit with 2 workers, against 0.14 s for a loader freed by refcount).
kdkit's loaders hold no cycles, and their ``close()`` calls :func:`stop_workers`.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

__all__ = ["stop_workers"]


def stop_workers(loader: DataLoader) -> None:
    """Shut down ``loader``'s worker processes (a no-op without workers or when stopped);
    the next ``iter(loader)`` starts new ones."""
    iterator = getattr(loader, "_iterator", None)
    loader._iterator = None  # the persistent-workers iterator the DataLoader caches
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
