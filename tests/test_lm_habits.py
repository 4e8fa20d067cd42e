"""The LM path as a TRL user expects it (issue 38): a borrowed tokenizer that does not fit the
student's head is refused by name, ``kdkit train --no-progress``, ``train.gradient_checkpointing``
(same gradients, a real key), LoRA students (``student.peft``: only the adapters train; export
merged or as the adapter)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _lm_fixtures import lm_tokenizer, lm_tokenizer_dir, tiny_llama  # noqa: F401

from kdkit.cli import main

PAIRS = [
    {"prompt": f"question {i}: what does the teacher say about {w}?", "completion": f" {w} {i}"}
    for i, w in enumerate("tokens students teachers heads layers vocab rows text".split() * 3)
]


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory, lm_tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("habits")
    tiny_llama(seed=1).save_pretrained(root / "teacher")
    lm_tokenizer.save_pretrained(root / "teacher")
    small = {"seed": 2, "hidden_size": 16, "intermediate_size": 32}
    tiny_llama(**small).save_pretrained(root / "student")  # weights: an hf: student
    lm_tokenizer.save_pretrained(root / "student")
    tiny_llama(vocab=2048, **small).config.save_pretrained(root / "wide")  # no tokenizer
    (root / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return root


def _config(root, **changes) -> dict:
    config = {
        "task": "lm",
        "student": {"model": f"hf:{root / 'student'}"},
        "teacher": {"model": f"hf:{root / 'teacher'}"},
        "data": {
            "text_files": [str(root / "pc.jsonl")],
            "format": "prompt_completion",
            "loss_on": "completion",
            "max_length": 48,
            "pack": False,
            "batch_size": 8,
            "val": {"split": 0.25},
        },  # fmt: skip
        "train": {"epochs": 1, "optimizer": {"name": "AdamW", "lr": 0.01}},
    }
    config.update(changes)
    return config


def _write(path, config) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_borrowed_tokenizer_must_fit_the_students_head(lm_root, tmp_path, capsys):
    wide = {"model": f"hf-config:{lm_root / 'wide'}"}
    path = _write(tmp_path / "a.yaml", _config(lm_root, student=wide, run_dir=str(tmp_path / "r")))
    capsys.readouterr()
    assert main(["train", path, "--no-progress"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kdkit")]
    assert len(err) == 1 and "2,048 rows" in err[0] and "320 tokens" in err[0], err
    assert "student.tokenizer" in err[0] and "vocab_size: 320" in err[0]
    named = {**wide, "tokenizer": str(lm_root / "teacher")}  # a padded head, on purpose
    path = _write(tmp_path / "b.yaml", _config(lm_root, student=named, run_dir=str(tmp_path / "r")))
    assert main(["train", path, "--no-progress"]) == 0


def test_no_progress_and_gradient_checkpointing_are_real_switches(lm_root, tmp_path, capsys):
    path = _write(tmp_path / "c.yaml", _config(lm_root, run_dir=str(tmp_path / "r")))
    assert main(["train", path, "--no-progress", "--print-config",
                 "--set", "train.gradient_checkpointing=true"]) == 0  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)["train"]
    assert printed["progress"] is False and printed["gradient_checkpointing"] is True
    image = {"student": {"model": "torchvision:resnet18"}, "data": {"train": {"image_folder": "x"}},
             "train": {"gradient_checkpointing": True}}  # fmt: skip
    assert main(["train", _write(tmp_path / "img.yaml", image), "--print-config"]) == 2
    assert "task: lm" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients(lm_tokenizer):  # noqa: F811
    from kdkit.lm import Aligner, LMTask, TokenRow
    from kdkit.lm.student import prepare_student

    rows = [TokenRow.of(list(range(5, 25)), [False] * 8 + [True] * 12) for _ in range(2)]
    batch = Aligner(pad_id=0, max_length=32)(rows)
    grads = []
    for checkpointing in (False, True):
        student = prepare_student(tiny_llama(seed=3).train(), gradient_checkpointing=checkpointing)
        on = getattr(student, "is_activation_checkpointing", None)
        assert (student.is_gradient_checkpointing if on is None else on) is checkpointing
        task = LMTask(student, tiny_llama(seed=1), probe=False)
        task.step(batch).loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_lora_student_trains_its_adapters_only_and_exports_both_ways(lm_root, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    student = {"model": f"hf:{lm_root / 'student'}", "peft": lora}
    run = tmp_path / "run"
    path = _write(tmp_path / "l.yaml", _config(lm_root, student=student, run_dir=str(run)))
    assert main(["train", path, "--no-progress"]) == 0
    state = torch.load(run / "last.pt", weights_only=True)["student"]
    base = AutoModelForCausalLM.from_pretrained(str(lm_root / "student")).state_dict()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(state[f"{q}.base_layer.weight"], base[f"{q}.weight"])  # frozen
    assert torch.equal(state["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert state[f"{q}.lora_B.default.weight"].abs().sum() > 0  # trained from zeros
    assert main(["export", str(run), "--hf", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--hf", str(tmp_path / "adapter"), "--adapter"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not torch.equal(merged.state_dict()[f"{q}.weight"], base[f"{q}.weight"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(str(lm_root / "student"))
    adapted = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    ids = torch.arange(5, 25)[None]
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("template", ["lm_chat", "lm_prompt_completion"])
def test_the_lm_templates_validate_once_their_paths_are_set(template, lm_root, tmp_path, capsys):
    out = tmp_path / "lm.yaml"
    assert main(["init", template, "-o", str(out)]) == 0
    data = lm_root / "pc.jsonl"
    if template == "lm_chat":
        data = tmp_path / "chat.jsonl"
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        data.write_text(json.dumps({"messages": turns}) + "\n")
    capsys.readouterr()
    sets = [f"teacher.model=hf:{lm_root / 'teacher'}", f"student.model=hf:{lm_root / 'student'}",
            f"data.text_files=[{data}]"]  # fmt: skip
    argv = ["train", str(out), "--print-config"] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["task"] == "lm" and printed["data"]["format"] in ("chat", "prompt_completion")


def test_the_readme_names_every_lm_config_key():
    """The README's LM key table is the LM config's (issue 38: it used to be the image one)."""
    import dataclasses
    from pathlib import Path

    from kdkit.config import lm_schema as s

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### Coming from TRL or DistillKit")[1].split("\n## ")[0]
    for cls in (s.LMModelConfig, s.LMPeftConfig, s.LMDataConfig, s.LMDatasetConfig,
                s.LMDistillConfig, s.LMOnPolicyConfig, s.LMValConfig, s.LMLayerPairConfig):  # fmt: skip
        for f in dataclasses.fields(cls):
            assert f.metadata.get("key", f.name) in section, (cls.__name__, f.name)


def test_the_report_and_kdkit_eval_show_sample_generations(lm_root, tmp_path, capsys):
    run = tmp_path / "run"
    path = _write(tmp_path / "g.yaml", _config(lm_root, run_dir=str(run)))
    assert main(["train", path, "--no-progress"]) == 0
    report = (run / "report.md").read_text()
    assert "Sample generations (greedy, the first 3 val rows):" in report
    assert report.count("   - teacher: `") == 3 and report.count("   - student: `") == 3
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    samples = json.loads(capsys.readouterr().out)["samples"]
    assert len(samples) == 3 and set(samples[0]) == {"prompt", "reference", "student", "teacher"}
    assert samples[0]["prompt"].startswith("question")  # the prompt ends where training begins
    assert main(["eval", str(run)]) == 0
    assert "1. prompt: `question" in capsys.readouterr().out


def test_greedy_generations_draw_no_random_numbers(lm_tokenizer):  # noqa: F811
    from kdkit.lm import TokenRow
    from kdkit.lm.generations import sample_generations

    row = TokenRow.of(list(range(5, 30)), [False] * 10 + [True] * 15)
    student, teacher = tiny_llama(seed=3), tiny_llama(seed=1)
    before = torch.get_rng_state()
    gens = sample_generations(student, teacher, [row] * 2, lm_tokenizer)
    assert torch.equal(before, torch.get_rng_state())
    assert len(gens) == 2 and gens[0] == gens[1] and gens[0].teacher is not None
