"""Reading a top-k cache: rows found by their hash, checked, decoded into a :class:`TopKTarget`.

A training batch's rows are looked up by :func:`~kdkit.lm.cache.format.row_hash` (their ids,
trained flags and documents), so order, shuffling and val splits do not matter, and a row the
cache does not hold (another tokenizer, chat template, truncation or packing) is an error, never
a silently wrong target. The stored ids of a found row are compared too (a hash collision would
be caught). Each shard's sha256 is verified the first time a process reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit._io import sha256_file
from kdkit.errors import KDError
from kdkit.lm.cache.codec import decode_logp, unpack_ids
from kdkit.lm.cache.format import data_settings, differences, read_manifest, row_hash
from kdkit.lm.cache.target import TopKTarget
from kdkit.lm.data import TokenRow

__all__ = ["TopKCache", "CachedAligner"]

_INDEX_KEYS = ("row_offsets", "token_offsets", "row_hash")
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header


_NP_DTYPES = {
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}


def _memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every array of a safetensors file as a read-only ``np.memmap`` (the format is an
    8-byte header length, a JSON header of dtype / shape / byte offsets, then the raw data):
    a batch reads the pages of its rows only, and DataLoader workers share them."""
    import json
    import math
    import os

    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(file_size - 8, _MAX_HEADER):  # read nothing it cannot hold
                raise KDError(
                    f"{path}: its header declares {size:,} bytes but the file holds "
                    f"{file_size:,}: not a whole safetensors shard (damaged or edited)"
                )
            header = json.loads(f.read(size))
        data_size = file_size - 8 - size
        arrays = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            dtype = np.dtype(_NP_DTYPES[meta["dtype"]])
            count = (end - begin) // dtype.itemsize
            if not (0 <= begin <= end <= data_size) or count != math.prod(meta["shape"]):
                raise KDError(
                    f"{path}: array {name!r} lies outside the file or does not match its "
                    "shape (damaged or edited)"
                )
            arrays[name] = (
                np.memmap(
                    path, dtype=dtype, mode="r", offset=8 + size + begin, shape=(count,)
                ).reshape(meta["shape"])
                if count
                else np.zeros(meta["shape"], dtype)
            )
        return arrays
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise KDError(f"cannot read {path}: {err}".splitlines()[0]) from None


class _Shard:
    """One shard file: its small index arrays in memory, the rest memory-mapped."""

    def __init__(self, path: Path, sha256: str) -> None:
        self.path, self.sha256 = path, sha256
        self._arrays: dict[str, np.ndarray] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            if not self.path.is_file():
                raise KDError(f"the cache is missing {self.path.name} ({self.path.parent})")
            if sha256_file(self.path) != self.sha256:
                raise KDError(
                    f"{self.path} does not match its checksum in the manifest (damaged or "
                    "replaced); capture it again"
                )
            self._arrays = _memmap_safetensors(self.path)
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen lazily
        return {"path": self.path, "sha256": self.sha256, "_arrays": None}


class TopKCache:
    """An opened ``kdkit lm capture`` folder.

    Args:
        cache_dir: the folder.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        cap = self.manifest["capture"]
        self.k, self.bits, self.encoding = cap["k"], cap["id_bits"], cap["encoding"]
        self.temperature = float(cap["temperature"])
        self.vocab = int(self.manifest["teacher"]["vocab"])
        self.shards = [_Shard(self.dir / s["file"], s["sha256"]) for s in self.manifest["shards"]]
        self._index: dict[int, tuple[int, int]] | None = None
        self._prior: torch.Tensor | None = None

    def tokenizer(self, *, trust_code: bool = False) -> Any:
        """The tokenizer the cache was captured with (saved beside the shards); ``trust_code``
        lets that folder run code of its own (``auto_map``), else such a folder is refused."""
        from kdkit.lm.models import load_tokenizer_folder

        return load_tokenizer_folder(self.dir / "tokenizer", required=True, trust_code=trust_code)

    # -- checks against a run ----------------------------------------------------------------
    def check_run(self, data_cfg: Any, tokenizer: Any, student_rows: int) -> None:
        """Refuse a run this cache was not made for, naming every difference and its key."""
        from kdkit.lm.cache.format import tokenizer_fingerprint

        changed = differences(self.manifest["data"], data_settings(data_cfg))
        if changed:
            raise KDError(
                f"the teacher cache {self.dir} was captured with other data settings ("
                + "; ".join(f"data.{c}" for c in changed)
                + "); set them as captured, or capture again with this config"
            )
        mine = tokenizer_fingerprint(tokenizer)
        theirs = self.manifest["tokenizer"]
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise KDError(
                f"the teacher cache {self.dir} was captured with another tokenizer (differs in "
                f"{', '.join(diff)}); train with the tokenizer it was captured with"
            )
        if student_rows < self.vocab:
            raise KDError(
                f"the student's head has {student_rows} rows < the cache's vocabulary "
                f"{self.vocab}: its top-k ids would fall outside the student's head"
            )

    # -- lookup -----------------------------------------------------------------------------
    def _rows(self) -> dict[int, tuple[int, int]]:
        if self._index is None:
            index: dict[int, tuple[int, int]] = {}
            for s, shard in enumerate(self.shards):
                for r, h in enumerate(shard.arrays()["row_hash"].tolist()):
                    index.setdefault(int(h), (s, r))
            self._index = index
        return self._index

    def entries(self, row: TokenRow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [E, k], logp [E, k], tail [E])`` of ``row`` (its trained positions)."""
        where = self._rows().get(row_hash(row))
        if where is None:
            raise KDError(
                f"a batch row ({len(row)} tokens) is not in the teacher cache {self.dir}: it was "
                "captured with another tokenizer, chat template, max_length, truncation or "
                "packing; capture again with this config (kdkit lm capture)"
            )
        arrays = self.shards[where[0]].arrays()
        r = where[1]
        t0, t1 = arrays["token_offsets"][r : r + 2].tolist()
        if not np.array_equal(arrays["token_ids"][t0:t1], row.input_ids.numpy()):
            raise KDError(
                f"a batch row's ids differ from the cached row with its hash ({self.dir})"
            )
        e0, e1 = arrays["row_offsets"][r : r + 2].tolist()
        ids = unpack_ids(arrays["topk_ids"], self.bits, e0 * self.k, (e1 - e0) * self.k)
        logp = decode_logp(arrays, self.encoding, slice(e0, e1))
        tail = np.asarray(arrays["tail_logmass"][e0:e1], dtype=np.float32)
        return ids.reshape(e1 - e0, self.k), logp, tail

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    def row(self, index: int) -> TokenRow:
        """Corpus row ``index`` rebuilt from the cache (ids, trained flags, documents)."""
        rows = self.manifest["shard_rows"]
        arrays = self.shards[index // rows].arrays()
        r = index % rows
        t0, t1 = arrays["token_offsets"][r : r + 2].tolist()
        packed = arrays["token_trainable"][t0 // 8 : -(-t1 // 8)]  # this row's bytes only
        bits = np.unpackbits(packed, bitorder="little")[t0 % 8 : t0 % 8 + (t1 - t0)]
        return TokenRow(
            torch.from_numpy(arrays["token_ids"][t0:t1].astype(np.int64)),
            torch.from_numpy(bits.astype(bool)),
            torch.from_numpy(arrays["token_doc"][t0:t1].astype(np.int64)),
        )

    def prior(self) -> torch.Tensor:
        """The teacher's mean next-token distribution over the whole corpus (float32 ``[V]``):
        the shape the ``prior`` tail policy gives the mass outside each token's top k."""
        if self._prior is None:
            total = sum(s.arrays()["teacher_mass"].astype(np.float64) for s in self.shards)
            total = np.maximum(total, 0.0) + 1e-12  # every id keeps a little mass
            self._prior = torch.from_numpy((total / total.sum()).astype(np.float32))
        return self._prior

    def target(
        self, rows: list[TokenRow], policy: str = "bucket", labels: torch.Tensor | None = None
    ) -> TopKTarget:
        """The cached targets of ``rows``' trained positions, concatenated in row order
        (``labels``: their next tokens, for the ``label`` policy)."""
        parts = [self.entries(r) for r in rows]
        return TopKTarget(
            torch.from_numpy(np.concatenate([p[0] for p in parts])),
            torch.from_numpy(np.concatenate([p[1] for p in parts])),
            torch.from_numpy(np.concatenate([p[2] for p in parts])),
            self.vocab,
            policy=policy,
            capture_temperature=self.temperature,
            prior=self.prior() if policy == "prior" else None,
            labels=labels,
        )

    # -- as a target source of the LM task (kdkit.lm.serve.ServedTeacher is the other) --------
    #: a cache holds the rows it captured, nothing else (a served teacher scores any row)
    fixed_rows = True

    def collate(self, aligner: Any, policy: str = "bucket") -> CachedAligner:
        return CachedAligner(aligner, self, policy)

    def loader(self, loader: Any) -> Any:
        """The loader itself: its collate already attaches each batch's targets."""
        return loader

    def target_of(self, batch: Any) -> TopKTarget:
        """A batch without targets (not collated by :meth:`collate`) is refused: a cache scores
        no new rows."""
        raise KDError(
            "this batch carries no cached teacher targets: collate with the cache's "
            "collate (TopKCache.collate(aligner))"
        )

    def run_fingerprints(self) -> dict[str, str]:
        """What a run's checkpoints record of this cache (``--resume`` compares them)."""
        return {
            "cache": str(self.manifest.get("manifest_sha256")),
            "teacher": str(self.manifest.get("teacher", {}).get("weights_sha256")),
        }


@dataclass(frozen=True)
class CachedAligner:
    """A ``collate_fn``: the :class:`~kdkit.lm.align.Aligner`'s batch with its cached teacher
    targets attached (``batch.teacher``), decoded in the DataLoader's workers."""

    aligner: Any
    cache: TopKCache
    policy: str = "bucket"

    def __call__(self, rows: list[TokenRow]) -> Any:
        batch = self.aligner(rows)
        labels = batch.labels[batch.mask] if self.policy == "label" else None
        target = self.cache.target(list(rows), self.policy, labels)
        if target.shape[0] != batch.n_tokens:
            raise KDError(
                f"the teacher cache holds {target.shape[0]} entries for this batch, which trains "
                f"{batch.n_tokens} tokens: data.loss_on differs from the capture's"
            )
        return replace(batch, teacher=target)
