"""Data as a TRL user brings it (issue 38): a Hugging Face ``datasets`` dataset on disk
(``data.dataset``; a Hub name fails offline in one line), a chat template of one's choice
(``data.chat_template``: a file or ``chatml``, named in the report, carried by the export), and
the tokenized corpus kept on disk by fingerprint (a second run does not tokenize again)."""

from __future__ import annotations

import json

import pytest
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main
from kdkit.lm import load_lm_dataset
from kdkit.lm._sources import DatasetSource

CHATS = [
    [{"role": "user", "content": f"what is {w}?"}, {"role": "assistant", "content": f"{w} is {i}"}]
    for i, w in enumerate("a token a head a layer a row a vocab a student".split(" a "))
] * 3
#: a template of the user's own: no ChatML, no {% generation %} tags
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def chat_root(tmp_path_factory, lm_tokenizer):  # noqa: F811
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hfdata")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    ds = datasets.Dataset.from_list([{"conversation": c, "id": i} for i, c in enumerate(CHATS)])
    ds.save_to_disk(str(root / "saved"))
    ds.to_parquet(str(root / "chat.parquet"))
    (root / "template.jinja").write_text(TEMPLATE)
    tiny_llama(seed=1).save_pretrained(root / "teacher")
    lm_tokenizer.save_pretrained(root / "teacher")
    tiny_llama(seed=2, hidden_size=16, intermediate_size=32).config.save_pretrained(
        root / "student"
    )
    lm_tokenizer.save_pretrained(root / "student")
    return root


def _rows(ds):
    return [r.input_ids.tolist() for r in ds.rows], [r.trainable.tolist() for r in ds.rows]


def test_a_datasets_folder_or_file_gives_the_jsonl_rows(chat_root, lm_tokenizer):  # noqa: F811
    kw = {"format": "chat", "loss_on": "assistant", "max_length": 64}
    jsonl = load_lm_dataset([str(chat_root / "chat.jsonl")], lm_tokenizer, **kw)
    fields = (("messages", "conversation"),)
    for path in ("saved", "chat.parquet"):
        source = DatasetSource(str(chat_root / path), "train", fields)
        assert _rows(load_lm_dataset((), lm_tokenizer, source=source, **kw)) == _rows(jsonl)
    with pytest.raises(Exception, match="no column 'messages'"):
        load_lm_dataset((), lm_tokenizer, source=DatasetSource(str(chat_root / "saved")), **kw)


def _config(root, **data) -> dict:
    return {
        "task": "lm",
        "student": {"model": f"hf-config:{root / 'student'}"},
        "teacher": {"model": f"hf:{root / 'teacher'}"},
        "data": {
            "format": "chat",
            "loss_on": "assistant",
            "max_length": 64,
            "pack": False,
            "batch_size": 4,
            "val": {"split": 0.25},
            **data,
        },  # fmt: skip
        "train": {"epochs": 1, "progress": False},
    }


def test_kdkit_train_from_a_dataset_with_a_template_of_ones_own(chat_root, tmp_path, capsys):
    data = {"dataset": {"path": str(chat_root / "saved"), "messages_field": "conversation"},
            "chat_template": str(chat_root / "template.jinja")}  # fmt: skip
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump({**_config(chat_root, **data), "run_dir": str(tmp_path / "r")}))
    assert main(["train", str(path)]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Chat template: file `" in report and "template.jinja" in report
    assert "rendering turn by turn" in report  # no {% generation %} tags in it
    assert main(["export", str(tmp_path / "r"), "--hf", str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.chat_template == TEMPLATE


def test_named_templates_hub_names_and_misplaced_keys_are_one_line(chat_root, tmp_path, capsys):
    base = _config(chat_root, text_files=[str(chat_root / "chat.jsonl")])
    cases = {
        "hub": ({"text_files": [], "dataset": {"path": "HuggingFaceH4/ultrachat_200k"}},
                "never downloads"),
        "both": ({"dataset": {"path": str(chat_root / "saved")}}, "not both"),
        "no such template": ({"chat_template": "llama9"}, "neither a template kdkit ships"),
        "text format": ({"format": "text", "loss_on": "all", "chat_template": "chatml"},
                        "format chat"),
    }  # fmt: skip
    capsys.readouterr()
    for name, (change, words) in cases.items():
        cfg = {**base, "data": {**base["data"], **change}, "run_dir": str(tmp_path / "r")}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / "bad.yaml")]) == 2, name
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kdkit")]
        assert len(err) == 1 and words in err[0], (name, err)
    cfg = {**base, "data": {**base["data"], "chat_template": "chatml"}, "run_dir": str(tmp_path)}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "ok.yaml"), "--print-config"]) == 0


def test_the_token_cache_skips_tokenizing_the_second_time(chat_root, lm_tokenizer, tmp_path,  # noqa: F811
                                                          monkeypatch):  # fmt: skip
    import kdkit.lm.data as data_module

    path = tmp_path / "chat.jsonl"
    path.write_text((chat_root / "chat.jsonl").read_text())
    kw = {"format": "chat", "loss_on": "assistant", "max_length": 64, "cache_dir": tmp_path / "c"}
    first = load_lm_dataset([str(path)], lm_tokenizer, **kw)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(data_module, "_tokenized", no_tokenizing)
        second = load_lm_dataset([str(path)], lm_tokenizer, **kw)
        assert second.fingerprint == first.fingerprint and _rows(second) == _rows(first)
        with pytest.raises(AssertionError, match="tokenized again"):  # another max_length
            load_lm_dataset([str(path)], lm_tokenizer, **{**kw, "max_length": 48})
        path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
        with pytest.raises(AssertionError, match="tokenized again"):  # an edited file
            load_lm_dataset([str(path)], lm_tokenizer, **kw)
