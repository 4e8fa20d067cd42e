"""A corpus larger than memory (issue 38): with ``data.token_cache`` on, rows stream into the
cache's file as they are made and are read back memory-mapped, a row at a time; the dataset
stays map-style with a known length, so sampler, split, resume and DDP are untouched.

Checked as a user meets it: the same rows bit for bit as the in-memory path (every format,
packed or not), a corpus tokenized with a Python heap far below its token lists, a second run
that reads the mapped file without tokenizing, a damaged file rebuilt."""

from __future__ import annotations

import json
import logging
import pickle
import tracemalloc

import _lm_fixtures as fx
import pytest
import torch

import kdkit.lm.data as data_module
from kdkit.errors import KDError
from kdkit.lm._rows import ConcatRows, MappedRows
from kdkit.lm._token_cache import open_rows
from kdkit.lm.data import load_lm_dataset

lm_tokenizer, lm_tokenizer_dir = fx.lm_tokenizer, fx.lm_tokenizer_dir  # fixtures

CHATS = [
    {"messages": [{"role": "user", "content": f"what is {w}? " * (1 + i % 4)},
                  {"role": "assistant", "content": f"{w} is row {i}. " * (1 + i % 3)}]}
    for i, w in enumerate("a token a head a layer a row a vocab a student".split(" a ") * 4)
]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _same(a, b):
    assert len(a) == len(b) and a.description == b.description and a.truncation == b.truncation
    for x, y in zip(a.rows, b.rows, strict=True):
        for name in ("input_ids", "trainable", "doc_ids"):
            s, t = getattr(x, name), getattr(y, name)
            assert s.dtype == t.dtype and torch.equal(s, t), name
    assert a.fingerprint == b.fingerprint


@pytest.fixture
def files(tmp_path):
    words = fx.PARAGRAPH.split()
    texts = [" ".join(words[i % 7 :] * (1 + i % 5)) for i in range(24)]
    for i, t in enumerate(texts[:6]):
        (tmp_path / f"doc{i}.txt").write_text(t)
    pcs = [{"prompt": t[:40], "completion": t[40:120]} for t in texts]
    return {
        "txt": str(tmp_path / "doc*.txt"),
        "text": _write(tmp_path / "text.jsonl", [{"text": t} for t in texts]),
        "pc": _write(tmp_path / "pc.jsonl", pcs),
        "chat": _write(tmp_path / "chat.jsonl", CHATS),
    }


CASES = [
    ("txt", {"format": "text", "max_length": 32, "overflow": "split"}),
    ("text", {"format": "text", "max_length": 48, "pack": True}),
    ("text", {"format": "text", "max_length": 24, "pack": True, "overflow": "split"}),
    ("pc", {"format": "prompt_completion", "loss_on": "completion", "max_length": 128}),
    ("pc", {"format": "prompt_completion", "max_length": 160, "pack": True}),
    ("pc", {"format": "prompt_completion", "max_length": 40, "truncation": "left"}),
    ("chat", {"format": "chat", "loss_on": "assistant", "max_length": 128}),
    ("chat", {"format": "chat", "loss_on": "assistant", "max_length": 128, "pack": True}),
]


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_mapped_rows_are_the_in_memory_rows_bit_for_bit(files, lm_tokenizer, tmp_path,
                                                        monkeypatch, name, kw):  # fmt: skip
    monkeypatch.setattr(data_module, "_CHUNK", 5)  # several tokenizer calls, one row stream
    memory = load_lm_dataset(files[name], lm_tokenizer, **kw)
    written = load_lm_dataset(files[name], lm_tokenizer, cache_dir=tmp_path / "c", **kw)
    read = load_lm_dataset(files[name], lm_tokenizer, cache_dir=tmp_path / "c", **kw)
    assert isinstance(memory.rows, list)
    assert isinstance(written.rows, MappedRows) and isinstance(read.rows, MappedRows)
    _same(memory, written)
    _same(memory, read)
    assert [len(r) for r in read.rows[2:5]] == [len(r) for r in memory.rows[2:5]]
    assert torch.equal(read[-1].input_ids, memory[-1].input_ids)


def test_a_corpus_is_tokenized_with_a_heap_far_below_its_token_lists(lm_tokenizer, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    words = (fx.PARAGRAPH * 12).split()
    texts = [" ".join(words[i % 11 :] + words[: i % 11]) for i in range(200)]  # ~2,000 tokens each
    parts = [_write(tmp_path / "small.jsonl", [{"text": t} for t in texts[:25]]),
             _write(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])]  # fmt: skip
    kw = {"format": "text", "max_length": 64, "pack": True, "overflow": "split"}
    monkeypatch.setattr(data_module, "_CHUNK", 2)  # what is held at once: 2 documents' tokens

    def peak(files, folder):
        tracemalloc.start()
        try:
            ds = load_lm_dataset(files, lm_tokenizer, cache_dir=tmp_path / folder, **kw)
            return ds, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, small_peak = peak(parts[0], "small")
    streamed, streamed_peak = peak(parts[1], "all")  # one JSONL file, read a line at a time
    tokens = streamed.description["tokens"]
    token_lists = tokens * 8  # a list of ids holds 8 bytes a token before the ints themselves
    assert tokens > 300_000 and isinstance(streamed.rows, MappedRows)
    assert streamed_peak < token_lists / 4, (streamed_peak, token_lists)
    # 8 times the corpus, the same heap: nothing grows with it (not the file read either)
    assert streamed_peak < 1.25 * small_peak, (streamed_peak, small_peak)
    assert streamed.description["tokens"] == sum(len(r) for r in streamed.rows)


def test_a_second_run_reads_the_mapped_file_and_a_worker_maps_it_again(files, lm_tokenizer,
                                                                       tmp_path, monkeypatch):  # fmt: skip
    kw = {"format": "chat", "loss_on": "assistant", "max_length": 96, "cache_dir": tmp_path / "c"}
    first = load_lm_dataset(files["chat"], lm_tokenizer, **kw)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_module, "_tokenized", no_tokenizing)
    second = load_lm_dataset(files["chat"], lm_tokenizer, **kw)
    _same(first, second)
    blob = pickle.dumps(second)  # a DataLoader worker (spawn) gets the path, not the arrays
    assert len(blob) < 4096 < second.rows.total_tokens() * 17
    _same(pickle.loads(blob), first)
    loader = torch.utils.data.DataLoader(second, batch_size=4, collate_fn=list,
                                         sampler=torch.utils.data.SequentialSampler(second))  # fmt: skip
    assert [r.input_ids.tolist() for b in loader for r in b] == [
        r.input_ids.tolist() for r in first.rows
    ]
    both = ConcatRows(first.rows, second.rows)  # a capture's train + val rows, uncopied
    assert len(both) == 2 * len(first) and torch.equal(both[len(first)].input_ids,
                                                       first[0].input_ids)  # fmt: skip
    assert [len(r) for r in both[-3:]] == [len(r) for r in list(first.rows)[-3:]]


@pytest.mark.parametrize("damage", ["truncate", "header", "lengths", "empty"])
def test_a_damaged_cache_file_is_rebuilt(files, lm_tokenizer, tmp_path, caplog, damage):
    kw = {"format": "text", "max_length": 48, "pack": True, "cache_dir": tmp_path / "c"}
    first = load_lm_dataset(files["text"], lm_tokenizer, **kw)
    (path,) = (tmp_path / "c").glob("*.safetensors")
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    if damage == "truncate":
        blob = blob[:-7]
    elif damage == "header":
        blob = blob[:8] + b"{" * n + blob[8 + n :]
    elif damage == "lengths":  # the first row's length says 1 token more
        at = 8 + n
        blob = blob[:at] + (int.from_bytes(blob[at : at + 8], "little") + 1).to_bytes(8, "little") \
            + blob[at + 8 :]  # fmt: skip
    else:
        blob = b""
    damaged = path.with_name("damaged")  # a new file, as a copy or a restore makes one: the
    damaged.write_bytes(blob)  # maps of the old one (``first``) stay whole
    damaged.replace(path)
    with caplog.at_level(logging.WARNING, logger="kdkit.lm._token_cache"):
        again = load_lm_dataset(files["text"], lm_tokenizer, **kw)
    assert "unreadable" in caplog.text and "tokenizing again" in caplog.text
    _same(first, again)
    assert open_rows(tmp_path / "c", path.stem) is not None  # the rebuilt file reads whole
    assert [p.name for p in (tmp_path / "c").iterdir()] == [path.name]  # no parts left over


def test_a_file_of_the_first_cache_format_is_still_read(files, lm_tokenizer, tmp_path):
    from safetensors.torch import save_file

    kw = {"format": "text", "max_length": 48, "pack": True, "cache_dir": tmp_path / "c"}
    first = load_lm_dataset(files["text"], lm_tokenizer, **kw)
    (path,) = (tmp_path / "c").glob("*.safetensors")
    rows, meta = open_rows(tmp_path / "c", path.stem)
    rows = list(rows)
    tensors = {  # as the first writer laid it out (safetensors' own order and padding)
        "lengths": torch.tensor([len(r) for r in rows]),
        "input_ids": torch.cat([r.input_ids for r in rows]),
        "trainable": torch.cat([r.trainable for r in rows]).to(torch.uint8),
        "doc_ids": torch.cat([r.doc_ids for r in rows]),
    }
    metadata = {"format": "kdkit-lm-tokens/1", "key": path.stem, "meta": json.dumps(meta)}
    save_file(tensors, str(path), metadata=metadata)
    _same(first, load_lm_dataset(files["text"], lm_tokenizer, **kw))


def test_errors_while_streaming_name_the_files_and_leave_no_cache(lm_tokenizer, tmp_path):
    long = _write(tmp_path / "long.jsonl", [{"prompt": fx.PARAGRAPH, "completion": " x"}] * 3)
    kw = {"format": "prompt_completion", "loss_on": "completion", "cache_dir": tmp_path / "c"}
    with pytest.raises(KDError, match=r"every token is masked: no document in \[.*long.jsonl'\]"):
        load_lm_dataset(long, lm_tokenizer, max_length=8, truncation="right", **kw)
    with pytest.raises(KDError, match="would cut"):  # the default's 5% refusal, after the stream
        load_lm_dataset(long, lm_tokenizer, max_length=24, **kw)
    assert list((tmp_path / "c").iterdir()) == []


def test_a_jsonl_line_is_split_at_newlines_only(lm_tokenizer, tmp_path):
    """A record may hold U+2028 or U+0085 raw (valid JSON); the line reader keeps it whole."""
    text = "first part\u2028second part\u0085third"
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    ds = load_lm_dataset(str(path), lm_tokenizer, format="text", max_length=64)
    assert lm_tokenizer.decode(ds[0].input_ids, skip_special_tokens=True) == text


def test_a_disk_that_refuses_the_cache_leaves_the_rows_in_memory(files, lm_tokenizer, tmp_path,
                                                                  monkeypatch, caplog):  # fmt: skip
    from kdkit.lm._token_cache import RowWriter

    def full_disk(self, meta):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RowWriter, "commit", full_disk)
    kw = {"format": "chat", "loss_on": "assistant", "max_length": 96}
    with caplog.at_level(logging.WARNING, logger="kdkit.lm.data"):
        ds = load_lm_dataset(files["chat"], lm_tokenizer, cache_dir=tmp_path / "c", **kw)
    assert "token cache not written" in caplog.text and isinstance(ds.rows, list)
    _same(ds, load_lm_dataset(files["chat"], lm_tokenizer, **kw))
    assert list((tmp_path / "c").iterdir()) == []  # no parts left behind
