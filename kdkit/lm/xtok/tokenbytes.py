"""The bytes of every token id of a tokenizer, as one table built once.

Alignment works on byte offsets, and a fast tokenizer's ``offset_mapping`` cannot give them:
it counts characters, and a byte-level BPE that splits one multi-byte character across two
tokens gives both tokens the character's whole span (measured on ``"café"``: ``Ã`` and ``©``
both get ``(21, 22)``). The bytes a token stands for are a property of the id alone, so they are
read once from the vocabulary into a flat ``uint8`` array with per-id offsets; a row's byte
lengths are then one gather (``lengths[ids]``) and its text one ``np.repeat``, with no
``decode`` and no per-token Python.

The pieces are read by :func:`kdkit.lm.tokenizer.token_pieces`, the rules bits per byte reads
too (one table: byte-level BPE's alphabet undone, SentencePiece's ``▁`` and ``<0xNN>`` byte
fallback, WordPiece's ``##``). Special tokens (``<|endoftext|>``, BOS, chat markers) stand
for no text: length 0, and a *class* (``"bos"``, ``"eos"`` or their string) that lets two
tokenizers recognize each other's specials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdkit.errors import KDError
from kdkit.lm.tokenizer import byte_decoder, is_byte_level, token_pieces, tokenizer_json

__all__ = [
    "TokenBytes",
    "align_tables",
    "byte_decoder",
    "check_alignable",
    "kind_tables",
    "token_bytes",
]


@dataclass(frozen=True)
class TokenBytes:
    """Per-id bytes of one tokenizer.

    Attributes:
        flat: ``uint8`` every token's bytes, concatenated by id.
        starts: ``int64 [V]`` where each id's bytes start in ``flat``.
        lengths: ``int64 [V]`` each id's byte length (0 for specials and unused ids).
        special_class: ``{id: class}`` for special tokens: ``"bos"``, ``"eos"``, ``"pad"`` or
            the token's string (chat markers), so two tokenizers can match each other's.
        byte_level: the vocabulary is byte-level BPE (else SentencePiece-style pieces).
        bos_id / eos_id: the tokenizer's BOS / EOS ids or None; ``adds_bos``: it prepends BOS.
        prepends_space: it writes a space before every text (SentencePiece's dummy prefix,
            Metaspace ``prepend_scheme``: Llama-2, Mistral, Gemma), a byte the text does not
            have: the alignment takes it off at the first text token of each run
            (:func:`kdkit.lm.xtok.align.position_keys`).
        lead: ``int64 [V]`` 1 where an id's first byte is a space that can be that dummy
            prefix (only when ``prepends_space``; else None): the one table the alignment, the
            teacher's tokens of a row and the map read the prefix from.
        probe: the bytes of the tokens of ``"a b"`` (:func:`check_alignable` reads them).
    """

    flat: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    special_class: dict[int, str]
    byte_level: bool
    bos_id: int | None
    eos_id: int | None
    adds_bos: bool
    prepends_space: bool = False
    lead: np.ndarray | None = None
    probe: bytes = b"a b"

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    def piece(self, token_id: int) -> bytes:
        """The bytes of one id (for building maps and reports, not for the hot path)."""
        s = int(self.starts[token_id])
        return self.flat[s : s + int(self.lengths[token_id])].tobytes()

    def text_bytes(self, ids: np.ndarray) -> bytes:
        """The text bytes of a sequence of ids (specials add nothing), without a Python loop
        over tokens: one ``np.repeat`` of starts and a gather."""
        ids = np.asarray(ids, dtype=np.int64)
        lens = self.lengths[ids]
        total = int(lens.sum())
        if total == 0:
            return b""
        first = np.repeat(self.starts[ids] - (np.cumsum(lens) - lens), lens)
        return self.flat[first + np.arange(total)].tobytes()


def kind_tables(a: TokenBytes, b: TokenBytes) -> tuple[np.ndarray, np.ndarray]:
    """Per-id ``int64`` kinds of two tokenizers on one scale: 0 = text, and one shared number
    per special class, so a ``"bos"`` / ``"eos"`` / ``"<|im_start|>"`` of either side is the
    same number (a class only one side has gets a number the other side never shows)."""
    classes: dict[str, int] = {}
    out = []
    for table in (a, b):
        kinds = np.zeros(table.size, dtype=np.int64)
        for tid, cls in table.special_class.items():
            kinds[tid] = classes.setdefault(cls, len(classes) + 1)
        out.append(kinds)
    return out[0], out[1]


def _special_classes(tokenizer: Any) -> dict[int, str]:
    roles = {}
    for role in ("pad", "bos", "eos"):  # later roles win: eos over a bos that is the same id
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            roles[int(tid)] = role
    out: dict[int, str] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for tid, tok in decoder.items():
        if getattr(tok, "special", True):
            out[int(tid)] = roles.get(int(tid), str(tok))
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        out.setdefault(int(tid), roles.get(int(tid), tokenizer.convert_ids_to_tokens(int(tid))))
    return out


def _adds_bos(tokenizer: Any, bos: int | None) -> bool:
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and int(ids[0]) == bos


def token_bytes(tokenizer: Any) -> TokenBytes:
    """Build the table of a Hugging Face fast tokenizer (once per tokenizer object)."""
    cached = getattr(tokenizer, "_kdkit_token_bytes", None)
    if cached is not None:
        return cached
    byte_level = is_byte_level(tokenizer_json(tokenizer))  # as token_pieces reads them
    specials = _special_classes(tokenizer)
    pieces = token_pieces(tokenizer)  # the rules bits per byte reads too
    for tid in specials:
        if tid < len(pieces):
            pieces[tid] = b""
    size = len(pieces)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=size)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = None if bos is None else int(bos)
    probe = tokenizer("a b", add_special_tokens=False)["input_ids"]
    probed = b"".join(pieces[int(i)] for i in probe)
    prepends = probed == b" a b"
    first_byte = flat[np.minimum(starts, max(len(flat) - 1, 0))] if len(flat) else lengths * 0
    table = TokenBytes(
        flat=flat,
        starts=starts,
        lengths=lengths,
        special_class=specials,
        byte_level=byte_level,
        bos_id=bos if bos is not None and specials.get(bos) == "bos" else None,
        eos_id=None if eos is None else int(eos),
        adds_bos=_adds_bos(tokenizer, bos) and specials.get(bos) == "bos",
        prepends_space=prepends,
        lead=((lengths > 0) & (first_byte == 0x20)).astype(np.int64) if prepends else None,
        probe=probed,
    )
    try:
        object.__setattr__(tokenizer, "_kdkit_token_bytes", table)
    except (AttributeError, TypeError):  # pragma: no cover - a tokenizer without a __dict__
        pass
    return table


def check_alignable(table: TokenBytes, who: str) -> None:
    """Refuse a tokenizer whose token bytes are not the text it encodes: ``"a b"`` must read
    back as ``"a b"`` or, with a dummy prefix (:attr:`TokenBytes.prepends_space`, taken off by
    the alignment), ``" a b"``; anything else (a normalizer that rewrites text, a prefix other
    than one space) would shift the byte offsets, and the pairs would compare different text."""
    if table.probe not in (b"a b", b" a b"):
        raise KDError(
            f"the {who} tokenizer encodes 'a b' as tokens whose bytes are {table.probe!r}, not the "
            "text (or one space before it, SentencePiece's dummy prefix): cross-tokenizer "
            "alignment reads byte offsets from the tokens, so it is refused; use a tokenizer "
            "whose tokens spell the text"
        )


def align_tables(
    a: TokenBytes, b: TokenBytes
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The per-id tables :func:`kdkit.lm.xtok.align.align_many` reads for two tokenizers:
    ``(lengths, kinds)`` (:func:`kind_tables`), plus ``lead`` for one with a dummy prefix."""
    ka, kb = kind_tables(a, b)
    ta = (a.lengths, ka) if a.lead is None else (a.lengths, ka, a.lead)
    tb = (b.lengths, kb) if b.lead is None else (b.lengths, kb, b.lead)
    return ta, tb
