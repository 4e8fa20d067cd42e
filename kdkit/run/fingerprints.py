"""What a run depends on beyond its config, recorded in its checkpoints and compared on
``--resume`` (:func:`kdkit.train.resume.check_same_run`): a weights file, cache or image
folder replaced between epochs is refused instead of silently changing the run."""

from __future__ import annotations

from typing import Any

from kdkit.errors import KDError

__all__ = ["run_fingerprints", "lm_run_fingerprints"]


def run_fingerprints(teacher: Any, dataset: Any) -> dict[str, str]:
    """What a run depends on beyond its config, compared on resume: the teacher's weights
    (a module's weights hash: a weights file replaced between epochs differs), a cache's
    sealed meta, and the training set where it has a cheap ``fingerprint()``."""
    from kdkit.cache import CachedTeacher
    from kdkit.cache.store import teacher_fingerprint

    out: dict[str, str] = {}
    if teacher is not None:
        try:
            out["teacher"] = teacher_fingerprint(teacher)
        except (KDError, TypeError, AttributeError):
            pass
    if isinstance(teacher, CachedTeacher):
        out["cache"] = str(teacher.meta.get("meta_sha256") or teacher.fingerprint())
    if callable(getattr(dataset, "fingerprint", None)):
        out["dataset"] = str(dataset.fingerprint())
    elif isinstance(getattr(dataset, "samples", None), list):  # image files: a stat each
        out["dataset"] = _listing_fingerprint(dataset.samples)
    return out


def lm_run_fingerprints(teacher: Any, tokenizer: Any, corpus: str) -> dict[str, str]:
    """What a ``task: lm`` run depends on beyond its config, compared on resume as for image
    runs: the ``tokenizer`` (tokenizer.json, special tokens, chat template: a tokenizer
    retrained to the same size differs), the ``teacher``'s weights (a model's, or for a
    top-k cache the weights it was captured from, and the cache's sealed manifest as
    ``cache``; for a served teacher its weights and its fingerprint as ``served``) and the
    ``corpus`` (the rows tokenized from the data files: ``corpus``, the
    datasets' fingerprint)."""
    from kdkit._fingerprint import module_fingerprint
    from kdkit.lm.tokenizer import tokenizer_fingerprint

    out = {"corpus": corpus}
    try:
        out["tokenizer"] = tokenizer_fingerprint(tokenizer)
    except KDError:  # not a fast tokenizer: its vocabulary, ids and specials
        from kdkit.lm.cache.format import tokenizer_fingerprint as vocab_fingerprint

        out["tokenizer"] = str(sorted(vocab_fingerprint(tokenizer).items()))
    if callable(getattr(teacher, "run_fingerprints", None)):  # a top-k cache, a served teacher
        out.update(teacher.run_fingerprints())
    elif teacher is not None:
        out["teacher"] = module_fingerprint(teacher)
    return out


def _listing_fingerprint(samples: list) -> str:
    """sha256 over each file's path, size, mtime and label: cheap (no reads), and an image
    added, removed, relabeled or rewritten changes it."""
    import hashlib
    import os

    h = hashlib.sha256(b"kdkit-file-listing-v1")
    for path, label in samples:
        try:
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}|{label};".encode())
        except OSError:
            h.update(f"{path}|missing|{label};".encode())
    return h.hexdigest()
