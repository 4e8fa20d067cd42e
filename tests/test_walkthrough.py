"""The README's "Your own images, top to bottom", run as written on a generated photo folder
(tests/_images.py): the two configs and every command are read from README.md, and only the
models, the image size and the epochs are shrunk so it takes seconds on a CPU."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from _images import make_photos, tiny_model

from kdkit.cli import main

README = Path(__file__).parents[1] / "README.md"
TINY = {"image_size": 32, "batch_size": 6, "workers": 0}


def _section() -> str:
    text = README.read_text()
    start = text.index("## Your own images, top to bottom")
    return text[start : text.index("\n## ", start + 1)]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _shrink(cfg: dict) -> dict:
    """Tiny models, 32 px, two epochs on the CPU: the README's config otherwise untouched."""
    cfg = dict(cfg, student=tiny_model())
    cfg["data"] = {**cfg["data"], **TINY}
    cfg["train"] = {**cfg["train"], "epochs": 2, "device": "cpu", "progress": False}
    return cfg


def _commands(section: str) -> list[list[str]]:
    (bash,) = _blocks(section, "bash")
    out = []
    for line in bash.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            argv = shlex.split(line)
            assert argv[0] == "kdkit", line
            out.append(argv[1:])
    return out


def test_readme_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    section = _section()
    teacher_yaml, student_yaml = (yaml.safe_load(b) for b in _blocks(section, "yaml"))
    make_photos(tmp_path / "photos")  # with its broken files
    for name, cfg in (("teacher.yaml", teacher_yaml), ("student.yaml", student_yaml)):
        (tmp_path / name).write_text(yaml.safe_dump(_shrink(cfg)))
    monkeypatch.chdir(tmp_path)
    commands = _commands(section)
    assert [c[0] for c in commands] == [
        "train", "precompute", "cache", "train", "eval", "predict", "export"
    ]  # fmt: skip
    for argv in commands:
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, (argv, out.err)
        if argv[0] == "predict":
            rows = out.out.strip().splitlines()
            assert len(rows) == 9 and all(len(r.split()) == 7 for r in rows)  # path + 3 x2
    assert (tmp_path / "runs" / "my-teacher" / "best.pt").is_file()
    assert (tmp_path / "runs" / "my-student-teacher-cache" / "meta.json").is_file()
    report = (tmp_path / "runs" / "my-student" / "report.md").read_text()
    assert "unreadable images skipped" in report  # the broken photos did not stop it
    assert (tmp_path / "my-student.onnx").is_file()
    # the cache-trained run still knows its teacher: the one the cache was made with
    assert main(["eval", "runs/my-student", "--teacher"]) == 0
    assert "teacher:" in capsys.readouterr().out
