"""``data.truncation`` as a TRL user meets it: prompt/completion and chat rows longer than
``max_length`` are never cut silently. The default refuses a run that would lose more than 5%
of the trainable tokens and says how many; ``right``, ``left`` (the prompt's start goes) and
``drop_row`` accept the loss, logged and in the report; ``error`` refuses any overlong row."""

from __future__ import annotations

import json

import pytest
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main
from kdkit.errors import KDError
from kdkit.lm import load_lm_dataset

WORDS = "the student learns what the teacher knows about every next token ".split()


def _text(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def pc_long(tmp_path_factory):
    """Ten short rows, then five with a long prompt and five with a long completion (each far
    over max_length 48)."""
    path = tmp_path_factory.mktemp("trunc") / "pc.jsonl"
    rows = [{"prompt": _text(2, i), "completion": _text(3, i)} for i in range(10)]
    rows += [{"prompt": _text(30, i), "completion": _text(3, i + 3)} for i in range(5)]
    rows += [{"prompt": _text(2, i), "completion": _text(30, i + 3)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path, tok, **kw):
    kw = {"format": "prompt_completion", "loss_on": "completion", "max_length": 48, **kw}
    return load_lm_dataset([str(path)], tok, pack=False, **kw)


def test_the_default_refuses_a_large_loss_and_says_how_many(pc_long, lm_tokenizer):  # noqa: F811
    with pytest.raises(KDError) as err:
        _load(pc_long, lm_tokenizer)
    msg = str(err.value)
    assert "\n" not in msg and "trainable tokens" in msg and "10 of 20 documents" in msg
    assert "data.truncation: right | left | drop_row" in msg
    share = float(msg.split("(")[1].split("%")[0])
    assert 5 < share < 100


def test_each_policy_keeps_what_it_says(pc_long, lm_tokenizer):  # noqa: F811
    whole = _load(pc_long, lm_tokenizer, max_length=512, truncation="error")
    assert whole.truncation["over"] == 0 and whole.truncation["lost"] == 0
    right = _load(pc_long, lm_tokenizer, truncation="right")
    left = _load(pc_long, lm_tokenizer, truncation="left")
    drop = _load(pc_long, lm_tokenizer, truncation="drop_row")
    # right: a long prompt leaves no completion (the row goes); drop_row: every long row goes
    assert (len(whole), len(left), len(right), len(drop)) == (20, 20, 15, 10)
    for i in range(10, 15):  # left: the prompt's start went, the whole completion stayed
        full, kept = whole.rows[i], left.rows[i]
        assert len(kept) == 48 and int(kept.trainable.sum()) == int(full.trainable.sum())
        assert kept.input_ids[-20:].tolist() == full.input_ids[-20:].tolist()
        assert int(kept.input_ids[0]) == int(full.input_ids[0]) or (
            full.input_ids[0] != lm_tokenizer.bos_token_id  # a leading BOS is kept
        )
    for ds in (right, left, drop):
        t = ds.truncation
        assert t["over"] == 10 and t["documents"] == 20 and 0 < t["lost"] < t["trainable"]
    assert left.truncation["lost"] < right.truncation["lost"] < drop.truncation["lost"]
    with pytest.raises(KDError, match="truncation: error: 10 of 20 documents"):
        _load(pc_long, lm_tokenizer, truncation="error")


def test_chat_rows_are_counted_too(tmp_path, lm_tokenizer):  # noqa: F811
    path = tmp_path / "chat.jsonl"
    msgs = [
        {
            "messages": [
                {"role": "user", "content": _text(30, i)},
                {"role": "assistant", "content": _text(30, i + 1)},
            ]
        }  # fmt: skip
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    kw = {"format": "chat", "loss_on": "assistant", "max_length": 40}
    with pytest.raises(KDError, match="trainable tokens"):
        _load(path, lm_tokenizer, **kw)
    left = _load(path, lm_tokenizer, truncation="left", **kw)
    assert left.truncation["over"] == 6 and all(r.trainable[-4:].any() for r in left.rows)


def test_kdkit_train_refuses_then_reports_the_share(pc_long, tmp_path, lm_tokenizer, capsys):  # noqa: F811
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    tiny_llama(seed=1).save_pretrained(teacher)
    lm_tokenizer.save_pretrained(teacher)
    tiny_llama(seed=2, hidden_size=16, intermediate_size=32).config.save_pretrained(student)
    lm_tokenizer.save_pretrained(student)
    config = {
        "task": "lm",
        "student": {"model": f"hf-config:{student}"},
        "teacher": {"model": f"hf:{teacher}"},
        "data": {
            "text_files": [str(pc_long)],
            "format": "prompt_completion",
            "loss_on": "completion",
            "max_length": 48,
            "pack": False,
            "batch_size": 8,
            "val": {"split": 0.2},
        },  # fmt: skip
        "train": {"epochs": 1, "progress": False},
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainable tokens" in err[0], err
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(["train", str(path), "--set", "data.truncation=left"]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "truncation left" in report and "trainable tokens lost" in report
    bad = {**config, "data": {**config["data"], "format": "text", "loss_on": "all"}}
    path.write_text(yaml.safe_dump({**bad, "data": {**bad["data"], "truncation": "left"}}))
    assert main(["train", str(path)]) == 2
    assert "data.overflow" in capsys.readouterr().err


def test_a_cache_records_only_the_settings_that_apply():
    from types import SimpleNamespace

    from kdkit.lm.cache.format import data_settings

    common = {"max_length": 48, "pack": False, "overflow": "split", "truncation": "left"}
    chat = data_settings(SimpleNamespace(format="chat", loss_on="assistant", **common))
    text = data_settings(SimpleNamespace(format="text", loss_on="all", **common))
    assert "overflow" not in chat and chat["truncation"] == "left"  # kdkit cache info's line
    assert text["overflow"] == "split" and "truncation" not in text
