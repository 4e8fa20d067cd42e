"""``kdkit demo lm`` end to end at a toy size: corpus, tokenizer, cached teacher, students."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_demo_lm_runs_and_reuses_its_teacher(tmp_path):
    from kdkit.run.lm_demo import LMDemoConfig, run_lm_demo

    cfg = LMDemoConfig(
        out_dir=str(tmp_path / "demo"),
        cache_dir=str(tmp_path / "cache"),
        chars=30_000,
        vocab=300,
        max_length=32,
        batch_size=8,
        teacher=(32, 1, 2),
        student=(16, 1, 2),
        teacher_epochs=1,
        divergences=("fkl",),
        progress=False,
    )
    text = run_lm_demo(cfg).read_text()
    assert "| teacher |" in text and "student, scratch" in text and "student, kd-fkl" in text
    cached = list((tmp_path / "cache").glob("*/teacher/config.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime
    run_lm_demo(cfg)  # the second run takes the cached teacher
    assert cached[0].stat().st_mtime == mtime
