"""LM datasets: text, prompt/completion and chat files, tokenized once, truncated, packed.

Formats (``format``): ``text`` (plain text files, one document per file, or JSONL ``{"text"}``),
``prompt_completion`` (JSONL ``{"prompt", "completion"}``), ``chat`` (JSONL ``{"messages":
[{role, content}, ...]}``, rendered by the tokenizer's chat template; assistant spans from
``return_assistant_tokens_mask`` when the template has ``{% generation %}`` tags, else by
incremental rendering, see :mod:`kdkit.lm._chat`; ``description["assistant_mask"]`` says which).

``loss_on``: ``all`` | ``completion`` (prompt_completion) | ``assistant`` (chat; alias
``assistant_spans``). A row marks which tokens are *targets* (``trainable``); the causal shift is
left to :class:`kdkit.lm.align.Aligner`, the one place that owns it.

Text and completions end with eos (so students learn to stop); prompt and completion are
tokenized separately and concatenated, so the boundary is exact (no BPE merge across it).
For format text, ``overflow: truncate`` keeps the first ``max_length`` tokens and ``split`` cuts a
long text into ``max_length`` pieces; a prompt/completion or chat document is never split, and
``truncation`` says what to do with one that is too long (:mod:`kdkit.lm._truncate`: by default
its end is cut unless that loses more than 5% of the trainable tokens). ``pack`` fills rows of ``max_length`` with whole documents
in order (next fit; no document is split across rows) and keeps their boundaries in ``doc_ids``.

The records are read, tokenized and packed a chunk at a time, each row handed on as it is made.
With a token cache (``cache_dir``, ``data.token_cache``) the rows go straight to its file and are
read back mapped, a row at a time (:mod:`kdkit.lm._token_cache`), so a corpus larger than memory
trains; without one they are kept in a list. Either way the dataset is map-style with a known
length, and ``fingerprint`` names files, tokenizer, settings and ids (the same for both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from kdkit.errors import KDError, closest_names
from kdkit.lm._chat import assistant_mode, render_chat
from kdkit.lm._rows import TokenRow, update_digest
from kdkit.lm._sources import DatasetSource, Record, expand_paths, file_info, read_records
from kdkit.lm._token_cache import RowWriter, cache_key, open_rows
from kdkit.lm._truncate import TRUNCATIONS, Truncation, cut
from kdkit.lm.tokenizer import tokenizer_fingerprint

__all__ = ["FORMATS", "LOSS_ON", "LMDataset", "TokenRow", "load_lm_dataset"]

log = logging.getLogger(__name__)

FORMATS = ("text", "prompt_completion", "chat")
LOSS_ON = {"all": FORMATS, "completion": ("prompt_completion",), "assistant": ("chat",)}
_ALIASES = {"assistant_spans": "assistant"}
#: records (and characters) tokenized per tokenizer call: what is held as token lists at once
_CHUNK = 512
_CHUNK_CHARS = 1 << 20


class LMDataset(Dataset):
    """Tokenized rows (:class:`TokenRow`) and the ``description`` they were built from.

    ``rows`` is any sequence of rows: a list (built in memory) or the token cache's file,
    mapped (:class:`~kdkit.lm._rows.MappedRows`, read a row at a time)."""

    def __init__(
        self,
        rows: Sequence[TokenRow],
        description: dict[str, Any],
        truncation: dict[str, Any] | None = None,
    ) -> None:
        self.rows = rows
        self.description = description
        #: what truncation cost (:class:`kdkit.lm._truncate.Truncation`), None for plain text
        self.truncation = truncation

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> TokenRow:
        return self.rows[i]

    @property
    def fingerprint(self) -> str:
        """sha256 of the description (files' sha256, tokenizer, settings) and every row's ids."""
        h = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode())
        update_digest(h, self.rows)
        return h.hexdigest()


def _check_options(
    fmt: str, loss_on: str, overflow: str, max_length: int, max_positions: int | None
) -> str:
    if fmt != "text":
        overflow = "truncate"  # a prompt/completion or chat record is never split
    if fmt not in FORMATS:
        raise KDError(f"unknown data format {fmt!r}; did you mean {closest_names(fmt, FORMATS)}?")
    loss_on = _ALIASES.get(loss_on, loss_on)
    if loss_on not in LOSS_ON:
        raise KDError(
            f"unknown loss_on {loss_on!r}; did you mean {closest_names(loss_on, LOSS_ON)}?"
        )
    if fmt not in LOSS_ON[loss_on]:
        raise KDError(f"loss_on {loss_on!r} needs format {LOSS_ON[loss_on][0]!r}, not {fmt!r}")
    if overflow not in ("truncate", "split") or (overflow == "split" and fmt != "text"):
        raise KDError(f"overflow {overflow!r}: use 'truncate' ('split' works for format text only)")
    if max_length < 2:
        raise KDError(f"max_length {max_length} leaves no next-token target; use >= 2")
    if max_positions is not None and max_length > max_positions:
        raise KDError(
            f"max_length {max_length} > the model's max_position_embeddings {max_positions}; "
            f"sequences cannot be truncated to fit: set max_length <= {max_positions}"
        )
    return loss_on


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def _tokenize(
    records: list[Record], tokenizer: Any, fmt: str, loss_on: str, chat_mode: str | None
) -> list[tuple[str, list[int], list[bool]]]:
    """(where, ids, trainable) per document, before truncation."""
    eos = _eos(tokenizer)
    if fmt == "text":
        ids = tokenizer([r.fields["text"] for r in records], add_special_tokens=True)["input_ids"]
        return [
            (r.where, list(x) + eos, [True] * (len(x) + len(eos)))
            for r, x in zip(records, ids, strict=True)
        ]
    if fmt == "prompt_completion":
        prompts = tokenizer([r.fields["prompt"] for r in records], add_special_tokens=True)
        comps = tokenizer([r.fields["completion"] for r in records], add_special_tokens=False)
        docs = []
        for r, p, c in zip(records, prompts["input_ids"], comps["input_ids"], strict=True):
            c = list(c) + eos
            docs.append((r.where, list(p) + c, [loss_on == "all"] * len(p) + [True] * len(c)))
        return docs
    docs = []
    for r in records:
        ids, assistant = render_chat(tokenizer, r.fields["messages"], chat_mode or "", r.where)
        docs.append((r.where, ids, assistant if loss_on == "assistant" else [True] * len(ids)))
    return docs


def _chunks(records: Iterable[Record], places: list[str]) -> Iterator[list[Record]]:
    """``records`` in lists of ``_CHUNK`` records or ``_CHUNK_CHARS`` characters (one tokenizer
    call each), noting in ``places`` the first three files (or datasets) they come from."""
    chunk: list[Record] = []
    chars = 0
    for r in records:
        if len(places) < 3:
            place = r.where.split(":")[0].split("[")[0]
            places += [] if place in places else [place]
        chunk.append(r)
        chars += sum(len(v) for v in r.fields.values() if isinstance(v, str))
        chars += sum(len(m["content"]) for m in r.fields.get("messages", ()))
        if len(chunk) >= _CHUNK or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _pack(
    docs: Iterable[tuple[list[int], list[bool]]], max_length: int, pack: bool
) -> Iterator[tuple[list[int], list[bool], list[int]]]:
    """Rows ``(ids, trainable, doc_ids)`` as they fill (next fit: a row is given out when
    the next document does not fit), so no more than one row is held."""
    if not pack:
        for ids, tr in docs:
            yield ids, tr, [0] * len(ids)
        return
    cur_ids: list[int] = []
    cur_tr: list[bool] = []
    cur_doc: list[int] = []
    for ids, tr in docs:
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            yield cur_ids, cur_tr, cur_doc
            cur_ids, cur_tr, cur_doc = [], [], []
        d = cur_doc[-1] + 1 if cur_doc else 0
        cur_ids += ids
        cur_tr += tr
        cur_doc += [d] * len(ids)
    if cur_ids:
        yield cur_ids, cur_tr, cur_doc


def load_lm_dataset(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
    tokenizer: Any = None,
    *,
    format: str = "text",  # noqa: A002 - the config key's name
    max_length: int = 512,
    pack: bool = False,
    loss_on: str = "all",
    overflow: str = "truncate",
    max_positions: int | None = None,
    truncation: str | None = None,
    source: DatasetSource | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LMDataset:
    """Read, tokenize, truncate and (optionally) pack LM data into an :class:`LMDataset`.

    Args:
        paths: files or globs (``docs/**/*.txt``, ``chat.jsonl``); a glob matching nothing errs.
        tokenizer: the student's Hugging Face tokenizer (fast; the teacher's must be the same,
            see :func:`kdkit.lm.vocab.check_vocab`).
        format: ``text`` | ``prompt_completion`` | ``chat``.
        max_length: tokens per row (and per document).
        pack: fill rows with several documents (boundaries kept in ``doc_ids``).
        loss_on: ``all`` | ``completion`` | ``assistant``.
        overflow: ``truncate`` | ``split`` (text only) for documents over ``max_length``.
        max_positions: the model's ``max_position_embeddings`` (:func:`kdkit.lm.models.max_positions`).
        truncation: a too-long prompt/completion or chat document: None (cut its end, refused
            above 5% of the trainable tokens), ``right``, ``left``, ``drop_row`` or ``error``.
        source: a Hugging Face ``datasets`` dataset on disk instead of ``paths``.
        cache_dir: keep the rows there, keyed by the data's sha256, the tokenizer and the
            settings (:mod:`kdkit.lm._token_cache`); a second call reads them back.
    """
    loss_on = _check_options(format, loss_on, overflow, max_length, max_positions)
    if truncation is not None and truncation not in TRUNCATIONS:
        raise KDError(f"unknown truncation {truncation!r}; use one of {list(TRUNCATIONS)}")
    if truncation is not None and format == "text":
        raise KDError("truncation applies to prompt_completion and chat; text uses overflow")
    files = expand_paths(paths) if source is None else source.files()
    infos = [file_info(f) for f in files]
    settings = {"format": format, "loss_on": loss_on, "max_length": max_length, "pack": pack,
                "overflow": overflow, "truncation": truncation,
                "source": None if source is None else [source.split, list(source.fields)]}  # fmt: skip
    args = (tokenizer, format, loss_on, max_length, pack, overflow, truncation)

    def records() -> Iterator[Record]:
        return read_records(files, format) if source is None else source.records(format)

    if cache_dir is not None:
        key = cache_key(infos, tokenizer_fingerprint(tokenizer), settings)
        ds = _from_cache(Path(cache_dir), key, records, infos, args)
        if ds is not None:
            return ds
    rows: list[TokenRow] = []
    description, counts = _tokenized(records(), *args, add=lambda *r: rows.append(TokenRow.of(*r)))
    description["files"] = infos
    return LMDataset(rows, description, counts)


def _from_cache(
    folder: Path, key: str, records: Callable[[], Iterable[Record]], infos: list[Any],
    args: tuple[Any, ...],
) -> LMDataset | None:  # fmt: skip
    """The rows stored as ``key``, tokenized into the cache first when it has none (streamed:
    a row goes to disk as it is made), read back mapped; None where the disk refuses."""
    hit = open_rows(folder, key)
    fresh = hit is None
    if fresh:
        try:
            with RowWriter(folder, key) as writer:
                description, counts = _tokenized(records(), *args, add=writer.add)
                description["files"] = infos
                writer.commit({"description": description, "truncation": counts})
        except OSError as e:  # a cache is a convenience: a full disk never stops the run
            log.warning("lm data: token cache not written (%s); tokenizing in memory", e)
            return None
        hit = open_rows(folder, key)
        if hit is None:
            return None
    rows, meta = hit
    ds = LMDataset(rows, meta["description"], meta["truncation"])
    if not fresh and ds.truncation and ds.truncation["over"]:  # as the first run said it
        log.warning("lm data: %s", Truncation.of(ds.truncation).line())
    how = "written to" if fresh else "read from"
    log.info("lm data: %d rows %s the token cache (%s..., mapped)", len(ds), how, key[:12])
    return ds


def _tokenized(
    records: Iterable[Record],
    tokenizer: Any,
    format: str,  # noqa: A002
    loss_on: str,
    max_length: int,
    pack: bool,
    overflow: str,
    truncation: str | None,
    *,
    add: Callable[[list[int], list[bool], list[int]], None],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Tokenize, truncate (``overflow``, ``truncation``) and pack ``records`` a chunk at a time,
    giving each row to ``add`` as it is made; the ``description`` (its ``files`` left to the
    caller) and the truncation counts. Nothing of the corpus is kept here."""
    counts = None if format == "text" else Truncation(truncation, max_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    chat_mode = assistant_mode(tokenizer) if format == "chat" else None
    places: list[str] = []
    tally = {"documents": 0, "truncated": 0, "dropped": 0}

    def docs() -> Iterator[tuple[list[int], list[bool]]]:
        for chunk in _chunks(records, places):
            for where, ids, tr in _tokenize(chunk, tokenizer, format, loss_on, chat_mode):
                pieces = [(ids, tr)]
                if counts is not None:
                    kept = cut(ids, tr, where, counts, bos)
                    pieces = [] if kept is None else [kept]
                    tally["truncated"] += len(ids) - len(kept[0]) if kept is not None else 0
                elif len(ids) > max_length:
                    if overflow == "split":
                        pieces = [
                            (ids[i : i + max_length], tr[i : i + max_length])
                            for i in range(0, len(ids), max_length)
                        ]
                    else:
                        tally["truncated"] += len(ids) - max_length
                        pieces = [(ids[:max_length], tr[:max_length])]
                for p_ids, p_tr in pieces:
                    if any(p_tr[1:]):  # position 0 of a document predicts nothing
                        tally["documents"] += 1
                        yield p_ids, p_tr
                    else:
                        tally["dropped"] += 1
                        log.debug("%s: no trainable target after truncation; dropped", where)

    n_rows = n_tokens = 0
    for ids, tr, doc in _pack(docs(), max_length, pack):
        add(ids, tr, doc)
        n_rows += 1
        n_tokens += len(ids)
    truncated, dropped = tally["truncated"], tally["dropped"]
    if counts is not None:
        counts.check()
        if counts.over:
            log.warning("lm data: %s", counts.line())
    if not n_rows:
        raise KDError(
            f"every token is masked: no document in {places} has a target "
            f"(loss_on {loss_on!r}, max_length {max_length}); raise max_length or use loss_on all"
        )
    if (truncated and counts is None) or dropped:
        log.warning(
            "lm data: %d tokens truncated, %d documents without targets dropped", truncated, dropped
        )
    description = {
        "format": format,
        "loss_on": loss_on,
        "max_length": max_length,
        "pack": pack,
        "overflow": overflow if format == "text" else "truncate",
        "assistant_mask": chat_mode,
        "files": [],  # set by the caller (the sha256 of every file read)
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "documents": tally["documents"],
        "rows": n_rows,
        "tokens": n_tokens,
        "truncated_tokens": truncated,
        "dropped_documents": dropped,
        "fill": round(n_tokens / (n_rows * max_length), 4),
    }
    log.info(
        "lm data: %d documents -> %d rows, %d tokens (fill %.2f)",
        tally["documents"],
        n_rows,
        n_tokens,
        description["fill"],
    )
    return description, None if counts is None else counts.as_dict()
