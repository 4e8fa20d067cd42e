"""Code in a model or tokenizer folder never runs without ``--trust-code`` (issue 40).

A folder whose ``config.json`` or ``tokenizer_config.json`` has an ``auto_map`` names Python
files of its own; transformers imports them when told to trust the folder, and *asks on stdin*
when it is not told, so ``yes | kdkit ...`` would run them. Each folder here carries a payload
module whose import writes a marker file: every entry point must refuse the folder in one line
naming ``--trust-code``, and the marker must not exist afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from _lm_fixtures import PARAGRAPH, lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main
from kdkit.errors import KDError

ROOT = Path(__file__).resolve().parents[1]

PAYLOAD = """\
from pathlib import Path

Path({marker!r}).write_text("the folder's code ran")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class PayloadConfig(LlamaConfig):
    model_type = "kdkit_payload"


class PayloadForCausalLM(LlamaForCausalLM):
    config_class = PayloadConfig


class PayloadTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def add_model_code(folder: Path, marker: Path) -> Path:
    """Make ``folder`` (a saved model or config) name its own code: an unknown model type whose
    classes live in ``payload.py`` (transformers would prompt on stdin for it)."""
    (folder / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    auto = {
        "AutoConfig": "payload.PayloadConfig",
        "AutoModelForCausalLM": "payload.PayloadForCausalLM",
    }
    _edit_json(folder / "config.json", model_type="kdkit_payload", auto_map=auto)
    return folder


def add_tokenizer_code(folder: Path, marker: Path) -> Path:
    """Make a saved tokenizer folder name its own tokenizer class in ``payload.py``."""
    (folder / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    auto = {"AutoTokenizer": [None, "payload.PayloadTokenizer"]}
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="PayloadTokenizer", auto_map=auto)
    return folder


def evil_model(folder: Path, marker: Path, tokenizer) -> Path:
    tiny_llama(seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return add_model_code(folder, marker)


def evil_tokenizer(folder: Path, marker: Path, tokenizer) -> Path:
    tokenizer.save_pretrained(folder)
    return add_tokenizer_code(folder, marker)


def _config(root: Path, teacher: str, **changes) -> dict:
    cfg = {
        "task": "lm",
        "name": "trust",
        "student": {"model": f"hf-config:{root / 'student'}"},
        "teacher": {"model": teacher},
        "data": {
            "text_files": [str(root / "corpus.txt")],
            "val": {"split": 0.25},
            "max_length": 32,
            "pack": True,
            "batch_size": 4,
        },
        "distill": {"divergence": "fkl"},
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.003}, "progress": False},
        "run_dir": str(root / "run"),
    }
    cfg.update(changes)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refusal(err: str) -> str:
    """The one ``kdkit: error:`` line of a refused command, checked to ask for --trust-code."""
    said = [line for line in err.splitlines() if line.startswith("kdkit")]
    assert len(said) == 1 and said[0].startswith("kdkit: error:"), err
    assert "auto_map" in said[0] and "--trust-code" in said[0], said[0]
    return said[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory, lm_tokenizer):  # noqa: F811
    """A trained run and a captured cache, made while their folders were clean; then the
    student and teacher folders they name get a payload (a folder changed after the fact)."""
    root = tmp_path_factory.mktemp("trust")
    tiny_llama(seed=1).save_pretrained(root / "teacher")
    lm_tokenizer.save_pretrained(root / "teacher")
    tiny_llama(seed=2, hidden_size=16, intermediate_size=32).config.save_pretrained(
        root / "student"
    )
    lm_tokenizer.save_pretrained(root / "student")
    shutil.copytree(root / "student", root / "clean-student")  # never given a payload
    text = Path(textwrap.__file__).read_text(encoding="utf-8")[:3000] + PARAGRAPH * 3
    (root / "corpus.txt").write_text(text)
    pc = [{"prompt": f"Q{i}: {PARAGRAPH[:40]}", "completion": PARAGRAPH[40:90]} for i in range(8)]
    (root / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    cfg = _write(root / "clean.yaml", _config(root, f"hf:{root / 'teacher'}"))
    assert main(["train", str(cfg)]) == 0
    capture = ["lm", "capture", str(cfg), "--out", str(root / "cache"), "--topk", "4"]
    assert main([*capture, "--no-progress"]) == 0
    add_model_code(root / "student", root / "ran")
    add_model_code(root / "teacher", root / "ran")
    return root


def test_refusal_is_about_auto_map_only(tmp_path):
    from kdkit.lm._hf import refuse_custom_code

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {}}))
    refuse_custom_code(tmp_path, trust_code=False)  # an empty auto_map names no code
    nested = {"model_type": "x", "text_config": {"auto_map": {"AutoConfig": "m.C"}}}
    (tmp_path / "config.json").write_text(json.dumps(nested))
    with pytest.raises(KDError, match=r"'text_config\.auto_map'.*--trust-code"):
        refuse_custom_code(tmp_path, trust_code=False)
    refuse_custom_code(tmp_path, trust_code=True)  # the caller trusts it: no refusal
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(KDError, match="tokenizer_config.json is not a readable JSON file"):
        refuse_custom_code(tmp_path, trust_code=False)


def test_python_api_refuses_folder_code(site, tmp_path, lm_tokenizer):  # noqa: F811
    from kdkit.lm.cache import TopKCache
    from kdkit.lm.models import load_lm, load_tokenizer

    marker = tmp_path / "ran"
    model = evil_model(tmp_path / "model", marker, lm_tokenizer)
    tok = evil_tokenizer(tmp_path / "tok", marker, lm_tokenizer)
    cache = tmp_path / "cache"
    shutil.copytree(site / "cache", cache)
    add_tokenizer_code(cache / "tokenizer", marker)
    clean = tmp_path / "clean"
    tiny_llama().save_pretrained(clean)
    lm_tokenizer.save_pretrained(clean)
    calls = [
        (model / "config.json", lambda: load_lm(f"hf:{model}")),
        (model / "config.json", lambda: load_lm(f"hf-config:{model}", seed=0)),
        (tok / "tokenizer_config.json", lambda: load_lm(f"hf:{clean}", tokenizer=tok)),
        (tok / "tokenizer_config.json", lambda: load_tokenizer(f"hf:{clean}", tok)),
        (cache / "tokenizer" / "tokenizer_config.json", lambda: TopKCache(cache).tokenizer()),
    ]
    for file, call in calls:
        with pytest.raises(KDError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and str(file) in message and "'auto_map'" in message
        assert "--trust-code" in message and "trust_code=True" in message
    assert not marker.exists()
    assert load_lm(f"hf:{clean}")[1] is not None  # a folder without auto_map loads as before


TRAIN_CASES = ["teacher", "student tokenizer", "onnx teacher", "on-policy", "cache tokenizer"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_kdkit_train_refuses_folder_code(site, tmp_path, lm_tokenizer, case, capsys):  # noqa: F811
    marker = tmp_path / "ran"
    evil = f"hf:{evil_model(tmp_path / 'model', marker, lm_tokenizer)}"
    cfg = _config(site, evil, run_dir=str(tmp_path / "run"))
    named = tmp_path / "model" / "config.json"
    if case == "student tokenizer":
        tok = evil_tokenizer(tmp_path / "tok", marker, lm_tokenizer)
        named = tok / "tokenizer_config.json"
        cfg.update(teacher=None, student={**cfg["student"], "tokenizer": str(tok)})
    elif case == "onnx teacher":
        cfg["teacher"] = {"model": evil, "backend": "onnx", "precision": "int8"}
    elif case == "on-policy":
        data = {**cfg["data"], "text_files": [str(site / "pc.jsonl")], "pack": False}
        cfg["data"] = {**data, "format": "prompt_completion", "loss_on": "completion"}
        cfg["distill"] = {"on_policy": {"lambda": 1.0, "max_new_tokens": 4}}
    elif case == "cache tokenizer":
        shutil.copytree(site / "cache", tmp_path / "cache")
        add_tokenizer_code(tmp_path / "cache" / "tokenizer", marker)
        cfg["teacher"] = {"model": f"cache:{tmp_path / 'cache'}"}
        named = tmp_path / "cache" / "tokenizer" / "tokenizer_config.json"
    cfg["student"] = {**cfg["student"], "model": f"hf-config:{site / 'clean-student'}"}
    assert main(["train", str(_write(tmp_path / "lm.yaml", cfg))]) == 2
    assert str(named) in _refusal(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_kdkit_eval_refuses_folder_code(site, capsys):
    assert main(["eval", str(site / "run"), "--json"]) == 2
    line = _refusal(capsys.readouterr().err)
    assert str(site / "student" / "config.json") in line  # the run's student folder
    assert not (site / "ran").exists()


def test_kdkit_export_hf_refuses_folder_code(site, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(site / "run"), "--hf", str(out)]) == 2
    _refusal(capsys.readouterr().err)
    assert not (site / "ran").exists() and not (out.exists() and any(out.iterdir()))


def test_lm_cache_check_and_verify_refuse_folder_code(site, tmp_path, lm_tokenizer, capsys):  # noqa: F811
    cache = str(site / "cache")
    assert main(["lm", "cache", "check", cache]) == 2  # the teacher the cache records
    assert str(site / "teacher" / "config.json") in _refusal(capsys.readouterr().err)
    evil = evil_model(tmp_path / "model", tmp_path / "ran", lm_tokenizer)
    assert main(["lm", "cache", "verify", cache, "--teacher", f"hf:{evil}"]) == 2
    _refusal(capsys.readouterr().err)
    assert not (site / "ran").exists() and not (tmp_path / "ran").exists()


def test_trust_code_reaches_every_load(site, monkeypatch, capsys):
    """``--trust-code`` is passed down to the loader by every command (a spy stands in for
    it, so no payload runs in this process)."""
    import kdkit.lm.cache.capture  # noqa: F401  (every module that imports load_lm by name)
    import kdkit.lm.models
    import kdkit.run.lm_job
    import kdkit.run.lm_tools  # noqa: F401

    seen = []

    def spy(spec, **kw):
        seen.append(kw.get("trust_code"))
        raise KDError("stopped by the test")

    real = kdkit.lm.models.load_lm
    for name, module in list(sys.modules.items()):
        if name.startswith("kdkit") and getattr(module, "load_lm", None) is real:
            monkeypatch.setattr(module, "load_lm", spy)
    cfg, run, cache = str(site / "clean.yaml"), str(site / "run"), str(site / "cache")
    commands = [
        ["train", cfg, "--run-dir", str(site / "run-trusted")],
        ["eval", run],
        ["export", run, "--hf", str(site / "hf-trusted")],
        ["lm", "capture", cfg, "--out", str(site / "cache-trusted")],
        ["lm", "cache", "check", cache],
        ["lm", "cache", "verify", cache, "--teacher", f"hf:{site / 'teacher'}"],
    ]
    for argv in commands:
        seen.clear()
        assert main(argv) == 2 and seen == [False], argv
        assert main([*argv, "--trust-code"]) == 2 and seen == [False, True], argv
        assert "stopped by the test" in capsys.readouterr().err


def _kdkit(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),  # where transformers copies code
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, timeout=300, **kw
    )


def test_lm_capture_refuses_with_yes_on_stdin(site, tmp_path, lm_tokenizer):  # noqa: F811
    """``yes | kdkit lm capture``: stdin full of "y" lines answers no prompt."""
    marker = tmp_path / "ran"
    evil = evil_model(tmp_path / "model", marker, lm_tokenizer)
    cfg = _write(tmp_path / "lm.yaml", _config(site, f"hf:{evil}"))
    argv = ["-m", "kdkit", "lm", "capture", str(cfg), "--out", str(tmp_path / "cache")]
    done = _kdkit([*argv, "--no-progress"], tmp_path, input=b"y\n" * 20000)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert str(evil / "config.json") in _refusal(err)
    assert "[y/N]" not in err + done.stdout.decode()
    assert not marker.exists() and not (tmp_path / "cache" / "manifest.json").exists()


def test_the_payload_is_real_transformers_runs_it_on_a_piped_yes(tmp_path, lm_tokenizer):  # noqa: F811
    """Why the refusal matters: transformers alone, not told ``trust_remote_code``, asks on
    stdin and a piped "y" runs the folder's code (this also proves the payload works)."""
    marker = tmp_path / "ran"
    evil = evil_model(tmp_path / "model", marker, lm_tokenizer)
    code = (
        "from transformers import AutoModelForCausalLM; "
        f"print(type(AutoModelForCausalLM.from_pretrained({str(evil)!r}, local_files_only=True)))"
    )
    done = _kdkit(["-c", code], tmp_path, input=b"y\n" * 100)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "PayloadForCausalLM" in done.stdout.decode() and marker.exists()


def test_trust_code_lets_the_folder_code_run(site, tmp_path, lm_tokenizer):  # noqa: F811
    """With --trust-code the refusal is gone: the folder's own classes load and run."""
    marker = tmp_path / "ran"
    evil = evil_model(tmp_path / "model", marker, lm_tokenizer)
    cfg = _write(tmp_path / "lm.yaml", _config(site, f"hf:{evil}"))
    out = tmp_path / "cache"
    argv = ["-m", "kdkit", "lm", "capture", str(cfg), "--out", str(out), "--topk", "4"]
    done = _kdkit([*argv, "--no-progress", "--trust-code"], tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert marker.exists()  # the folder's own classes were imported
    assert json.loads((out / "manifest.json").read_text())["complete"]
