"""Byte-level BPE tokenizers trained offline, and the fingerprint that names a tokenizer.

No wheel ships language-model weights or a usable LM tokenizer and nothing may download at run
time, so tests, demos and from-scratch students train their own: ``tokenizers``' byte-level BPE
(GPT-2's scheme: every byte is in the base alphabet, so any UTF-8 text encodes without an unknown
token). Measured here: vocab 8192 on 200 Python-docs files trains in 5.1 s; vocab 300 on a
40 KB stdlib file in 0.05 s. Training is deterministic for the same texts in the same order
(checked by ``tests/test_lm_data.py``).

The folder is a ``save_pretrained`` folder: ``transformers.AutoTokenizer`` loads it (offline,
no folder code) with eos/bos/pad set and a ChatML template whose assistant turns sit inside
``{% generation %}`` so ``return_assistant_tokens_mask`` (``loss_on: assistant``) works without
the incremental fallback of :mod:`kdkit.lm.data`.

:func:`token_byte_lengths` gives each token id the number of UTF-8 bytes of text it stands for:
bits per byte (the held-out score that compares models across tokenizers) divides the summed
cross-entropy by the bytes of the scored tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from kdkit.errors import KDError
from kdkit.lm._hf import require

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "pad_id",
    "byte_decoder",
    "is_byte_level",
    "tokenizer_fingerprint",
    "token_byte_lengths",
    "token_pieces",
    "tokenizer_json",
    "train_bpe_tokenizer",
]

log = logging.getLogger(__name__)

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")

# ChatML; the assistant content and its <|im_end|> are the trained span (generation tags).
# Newlines are written as expressions: HF renders with trim_blocks, which eats a literal newline
# after a block tag such as {% endgeneration %}.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _texts(items: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    for item in items:
        if isinstance(item, str):
            yield item
            continue
        path = Path(item)
        if not path.is_file():
            raise KDError(f"tokenizer training file {str(path)!r} does not exist")
        yield path.read_text(encoding="utf-8", errors="replace")


def train_bpe_tokenizer(
    texts_or_files: Iterable[str | os.PathLike[str]],
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    chat_template: str | None = CHATML_TEMPLATE,
    split_digits: bool = False,
    bos_token: str | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer offline and save it as a ``save_pretrained`` folder.

    ``str`` items are training text; ``Path`` (``os.PathLike``) items are UTF-8 files read whole.
    The first special token is eos and bos, the second pad (``("<|endoftext|>", "<|pad|>",
    ...)``). Returns ``out_dir``; files are written to a temporary folder first and moved in.

    Two switches make tokenizers that differ the way real ones do (the cross-tokenizer tests,
    :mod:`kdkit.lm.xtok`): ``split_digits`` cuts every digit into its own token (Qwen3, Llama-2)
    and ``bos_token`` is a separate special token that the tokenizer prepends to every encoded
    text (Llama-3's ``<|begin_of_text|>``).
    """
    tk = require("tokenizers")
    special_tokens = list(special_tokens)
    if len(special_tokens) < 2:
        raise KDError("special_tokens needs at least an eos token and a pad token")
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise KDError(f"vocab_size {vocab_size} is below the 256 bytes + specials; use >= {floor}")
    if bos_token is not None and bos_token not in special_tokens:
        special_tokens.append(bos_token)
    tok = tk.Tokenizer(tk.models.BPE())
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(texts_or_files), trainer)
    if bos_token is not None:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A $B",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))],
        )
    fast = require("transformers").PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=special_tokens[0],
        bos_token=bos_token or special_tokens[0],
        pad_token=special_tokens[1],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-tokenizer-") as tmp:
        fast.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(Path(tmp) / name, out / name)
    log.info("trained a byte-level BPE tokenizer (vocab %d) into %s", tok.get_vocab_size(), out)
    return out


def pad_id(tokenizer: Any) -> int:
    """The id padded rows are filled with: the tokenizer's pad token, else its eos token.

    Padding is masked out of every loss and score, so any id would do; it must only be a real
    id of the vocabulary. Id 0 is a real id (``pad or eos`` would take it for missing).
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise KDError(
        f"the tokenizer ({type(tokenizer).__name__}) has neither a pad nor an eos token, so "
        "padded rows have no id; add one (tokenizer.add_special_tokens({'pad_token': ...}) "
        "and save_pretrained)"
    )


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None:
        raise KDError(f"{type(tokenizer).__name__} is not a fast tokenizer (no tokenizer.json)")
    data = json.loads(backend.to_str())
    data.pop("truncation", None)  # call-time settings, not what the tokens mean
    data.pop("padding", None)
    return data


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: tokenizer.json (less padding/truncation state),
    the special tokens and the chat template. Equal fingerprints tokenize alike."""
    h = hashlib.sha256(json.dumps(tokenizer_json(tokenizer), sort_keys=True).encode())
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's inverse byte-to-unicode map: a byte-level BPE token is spelt one character per
    byte (printable bytes as themselves, the other 68 as ``chr(256 + n)``, e.g. space ``Ġ``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _components(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The normalizer / pre-tokenizer / decoder steps of a tokenizer.json by type (Sequences
    walked), e.g. ``{"ByteLevel": {...}, "Metaspace": {...}}``."""
    found: dict[str, dict[str, Any]] = {}
    todo = [data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.setdefault(node["type"], node)
            todo.extend(node.values())
    return found


def is_byte_level(data: dict[str, Any]) -> bool:
    """Whether a tokenizer.json reads its pieces in GPT-2's byte alphabet (a ``ByteLevel``
    normalizer, pre-tokenizer or decoder step): how :func:`token_pieces` reads them."""
    return "ByteLevel" in _components(data)


def token_pieces(tokenizer: Any) -> list[bytes]:
    """Per id, the UTF-8 bytes of text it stands for, read once from the fast tokenizer's
    tokenizer.json (no ``decode``): the one set of rules behind :func:`token_byte_lengths` (bits
    per byte) and :func:`kdkit.lm.xtok.tokenbytes.token_bytes` (cross-tokenizer alignment).

    - byte-level BPE (GPT-2, Llama-3, Qwen): GPT-2's byte alphabet undone (``Ġ`` = space); a
      character outside it is its own UTF-8;
    - SentencePiece (Metaspace, Llama-2, Gemma): ``▁`` (or the Metaspace replacement) is a
      space, ``<0xNN>`` (byte fallback) one byte;
    - WordPiece: ``##`` (the continuing-subword prefix) and an end-of-word suffix are no text;
      the whitespace its pre-tokenizer drops is in no token, and a normalizer's output
      (lower-cased, accents stripped) is what is read;
    - special tokens (bos, eos, pad, chat markers, the tokenizer's special ids): ``b""``; a
      non-special added token: its content; the unknown token: ``b""`` (the text it replaced is
      not in the id); ids no token has: ``b""``.

    A space the tokenizer writes before every text (SentencePiece's dummy prefix) is read as the
    space it spells: an id reads alike wherever it stands (the alignment and bits per byte take
    that space off a text's first token: :attr:`kdkit.lm.xtok.tokenbytes.TokenBytes.lead`)."""
    data = tokenizer_json(tokenizer)
    model = data.get("model") or {}
    steps = _components(data)
    byte_level = is_byte_level(data)
    space = (steps.get("Metaspace") or {}).get("replacement") or "▁"
    fallback = bool(model.get("byte_fallback"))
    prefix = model.get("continuing_subword_prefix") or ""
    suffix = model.get("end_of_word_suffix") or ""
    table = byte_decoder()

    def read(piece: str) -> bytes:
        m = _BYTE_PIECE.fullmatch(piece) if fallback else None
        if m:
            return bytes([int(m.group(1), 16)])
        if prefix and piece.startswith(prefix):
            piece = piece[len(prefix) :]
        if suffix and piece.endswith(suffix):
            piece = piece[: -len(suffix)]
        if not byte_level:
            return piece.replace(space, " ").encode()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:  # a character outside the byte alphabet: its own UTF-8
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)

    vocab = model.get("vocab") or {}
    items = vocab.items() if isinstance(vocab, dict) else ((p, i) for i, (p, _) in enumerate(vocab))
    pieces = {int(i): read(p) for p, i in items}
    unk = vocab.get(model.get("unk_token")) if isinstance(vocab, dict) else model.get("unk_id")
    if isinstance(unk, int):
        pieces[unk] = b""
    for added in data.get("added_tokens") or []:
        pieces[int(added["id"])] = b"" if added.get("special") else added["content"].encode()
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        pieces[int(tid)] = b""
    out = [b""] * max([len(tokenizer), *(i + 1 for i in pieces)])
    for tid, piece in pieces.items():
        out[tid] = piece
    return out


def token_byte_lengths(tokenizer: Any) -> torch.Tensor:
    """``[ids]`` int64: the UTF-8 bytes of text each token id stands for (:func:`token_pieces`'
    rules; the sum over a text's tokens is its byte count, a dummy prefix counted as the space
    it spells: evaluation takes it off, :func:`kdkit.run.lm_vocab.eval_byte_lengths`). Built
    once per call, never decodes; the same numbers as
    :attr:`kdkit.lm.xtok.tokenbytes.TokenBytes.lengths`."""
    return torch.tensor([len(p) for p in token_pieces(tokenizer)], dtype=torch.long)
