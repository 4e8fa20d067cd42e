"""The on-disk format ``kdkit-lm-topk/1``: a manifest and memory-mappable shards.

A cache folder holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files (safetensors: no
pickle, memory-mapped reads). Row ``r`` of the corpus (the rows the config's data section gives,
training rows then separate val rows, in order) is in shard ``r // shard_rows``. Per shard:

==================  ==========  =============================================================
array               dtype       meaning
==================  ==========  =============================================================
``row_offsets``     int64 R+1   entry range of each row (entries = the row's trained positions)
``token_offsets``   int64 R+1   token range of each row in ``token_ids``
``token_ids``       uint32 T    the exact ids the entries align to (after template, truncation,
                                packing)
``token_trainable`` uint8       each token's trained flag, 1 bit (``np.packbits``, little)
``token_doc``       uint16 T    each token's document index within its row (packing)
``row_hash``        uint64 R    :func:`row_hash` of each row's ids, trained flags and documents
``topk_ids``        uint8       the top-k ids of every entry, bit-packed, ``id_bits`` each
``topk_logp``       float16     ``f16``: ``[E, k]`` log-probabilities, sorted
``topk_top`` ...    ...         ``q8``: ``topk_top`` f16 [E], ``topk_scale`` f16 [E],
                                ``topk_q`` uint8 [E, k-1] (offsets below the top)
``tail_logmass``    float16 E   ``log(1 - sum of the top-k p)``
==================  ==========  =============================================================

Alignment: entry ``j`` of a row is ``p(x[j+1] | x[<=j])`` at each position ``j`` the
:class:`~kdkit.lm.align.Aligner` trains (its ``mask``), in position order. The manifest holds the
teacher's fingerprint, the tokenizer's, the capture settings, the data settings and each
finished shard's sha256 and counts; ``complete`` is set by the last shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdkit._io import read_json, sha256_bytes
from kdkit.errors import KDError
from kdkit.lm.data import TokenRow

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "DATA_KEYS",
    "row_hash",
    "shard_name",
    "tokenizer_fingerprint",
    "read_manifest",
    "data_settings",
    "check_layout",
]

FORMAT = "kdkit-lm-topk"
VERSION = 1
MANIFEST = "manifest.json"
ALIGNMENT = "next_token: entry j of a row is p(x[j+1] | x[<=j]) at each trained position j"
#: the data settings a cache is bound to, with the config key that sets each
DATA_KEYS = ("format", "max_length", "pack", "loss_on", "overflow", "truncation")


def row_hash(row: TokenRow) -> int:
    """64-bit hash of a row's ids, trained flags and document ids (what the entries depend on)."""
    h = hashlib.blake2b(digest_size=8)
    for t in (row.input_ids, row.trainable, row.doc_ids):
        h.update(t.numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What makes two tokenizers give the same ids: vocabulary content, special ids, template.

    ``vocab_sha256`` (content, not file bytes: a re-saved tokenizer.json with other formatting is
    the same tokenizer) is what caches are matched on.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "vocab_sha256": sha256_bytes(json.dumps(vocab, ensure_ascii=False).encode()),
        "vocab_size": len(tokenizer),
        "special_ids": specials,
        "chat_template_sha256": sha256_bytes(str(template).encode()),
    }


def data_settings(data_cfg: Any) -> dict[str, Any]:
    """The ``data:`` keys a cache's rows depend on (``DATA_KEYS``): ``overflow`` for plain text
    only, ``truncation`` for the other formats only (a key that does not apply is left out,
    so ``kdkit cache info`` never reports a setting the rows did not use)."""
    text = getattr(data_cfg, "format", "text") == "text"
    skip = "truncation" if text else "overflow"
    return {k: getattr(data_cfg, k, None) for k in DATA_KEYS if k != skip}


def read_manifest(cache_dir: str | Path, *, complete: bool = True) -> dict[str, Any]:
    """The manifest of ``cache_dir``, checked for format, version and (``complete``) a finished
    capture; a one-line :class:`KDError` naming the cause otherwise."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise KDError(
            f"{cache_dir} is not an LM teacher cache (no {MANIFEST}); make one with "
            "kdkit lm capture CONFIG.yaml --out DIR"
        )
    manifest = read_json(path, "the cache is damaged")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KDError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise KDError(
            f"{path} is format version {manifest.get('version')!r}; this kdkit reads {VERSION}"
        )
    sealed = manifest.get("manifest_sha256")
    if sealed != manifest_digest(manifest):
        raise KDError(f"{path} was edited after capture (its manifest_sha256 does not match)")
    check_layout(manifest, path)
    if complete and not manifest.get("complete"):
        raise KDError(
            f"the cache {cache_dir} is unfinished ({len(manifest.get('shards', []))} of "
            f"{manifest.get('num_shards')} shards); run kdkit lm capture again to finish it"
        )
    return manifest


def check_layout(manifest: Mapping[str, Any], path: Path) -> None:
    """The shard list a reader follows: shard ``i`` is the file :func:`shard_name` (i) of the
    manifest's own folder (never ``../`` or an absolute path, even in a manifest resealed
    after an edit) holding rows ``[i * shard_rows, ...)`` with plain counts and a checksum."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    shards, rows, per = manifest.get("shards"), manifest.get("num_rows"), manifest.get("shard_rows")
    if not (isinstance(shards, list) and count(rows) and count(per) and per > 0):
        raise KDError(f"{path}: its shard list, num_rows or shard_rows is malformed (edited?)")
    for i, shard in enumerate(shards):
        name = shard.get("file") if isinstance(shard, dict) else None
        if name != shard_name(i):
            where = str(name)
            outside = isinstance(name, str) and (
                Path(name).is_absolute() or Path(name).name != name or name in (".", "..")
            )
            raise KDError(
                f"{path}: shard {i} is {where!r}"
                + (", a path outside the cache folder" if outside else "")
                + f"; a manifest lists only its own folder's {shard_name(i)} (edited?)"
            )
        span = [i * per, min((i + 1) * per, rows)]
        ok = shard.get("rows") == span and count(shard.get("entries")) and count(shard.get("bytes"))
        if not ok or not isinstance(shard.get("sha256"), str):
            raise KDError(f"{path}: shard {i}'s rows, counts or checksum are malformed (edited?)")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {**manifest, "manifest_sha256": manifest_digest(manifest)}


def differences(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """``key: cache X, config Y`` for every key of ``want`` whose value differs."""
    return [f"{k}: cache {have.get(k)!r}, here {v!r}" for k, v in want.items() if have.get(k) != v]


def as_u64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64)
