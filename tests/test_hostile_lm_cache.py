"""Hostile ``task: lm`` teacher caches (issue 40): two captures into one folder at once, a
capture resumed after the corpus changed, manifests edited and resealed (a shard read from
outside the folder, a header length beyond the file), and capture / check options out of
range at every door (``kdkit precompute CONFIG``, ``kdkit lm capture``, ``kdkit cache``, the
Python builder). Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _hostile import Case, Fx, cli_rows, judge_row, memory_cap, params

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent


def _sealed(out: Path, edit: Callable[[dict], None]) -> None:
    """Edit ``out``'s manifest, then reseal it (recompute its manifest_sha256), as someone
    who read kdkit's source would."""
    from kdkit.lm.cache.format import seal

    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest.pop("manifest_sha256", None)
    path.write_text(json.dumps(seal(manifest), indent=1))


def _edited(fx: Fx, name: str, edit: Callable[[Path, dict], None]) -> Path:
    out = fx.lm.copy(fx.lm.cache, name)
    _sealed(out, lambda m: edit(out, m))
    return out


def _outside(absolute: bool):
    def edit(out: Path, m: dict) -> None:
        outside = out.parent / f"{out.name}-outside.safetensors"
        outside.write_bytes((out / m["shards"][0]["file"]).read_bytes())
        m["shards"][0]["file"] = str(outside) if absolute else f"../{outside.name}"

    return edit


def _shard_header(size: int | None = None, offsets: bool = False):
    """Shard 0 with a declared header length of ``size`` (or data offsets past the end),
    its checksum and size in the manifest updated."""

    def edit(out: Path, m: dict) -> None:
        from kdkit._io import sha256_file

        shard = out / m["shards"][0]["file"]
        data = shard.read_bytes()
        if size is not None:
            data = size.to_bytes(8, "little") + data[8:]
        if offsets:
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + n])
            name = next(k for k in header if k != "__metadata__")
            header[name]["data_offsets"][1] += 10**12
            text = json.dumps(header).encode().ljust(n)[:n]
            data = data[:8] + text + data[8 + n :]
        shard.write_bytes(data)
        m["shards"][0].update(sha256=sha256_file(shard), bytes=len(data))

    return edit


def _verify(out: Path) -> list:
    return ["cache", "verify", out]


def _train_from(fx: Fx, out: Path, name: str) -> list:
    cfg = fx.lm.write(name, teacher={"model": f"cache:{out}"})
    return ["train", cfg, "--run-dir", fx.root / "work" / f"{name}-run"]


# -- two writers at once, a changed corpus ------------------------------------------------------
def _concurrent_capture(fx: Fx) -> list:
    """A slow ``kdkit lm capture`` runs in another process; this one targets the same --out."""
    cfg = fx.lm.write("concurrent")
    out = fx.root / "work" / "concurrent-cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARD_PAUSE": "2",
           "PYTHONPATH": str(HERE.parent)}  # fmt: skip
    job = [sys.executable, str(HERE / "_lm_capture_job.py"), str(cfg), str(out)]
    fx.background = subprocess.Popen(job, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the other capture has written its first shard
    return [
        "lm",
        "capture",
        cfg,
        "--out",
        out,
        "--topk",
        "8",
        "--shard-rows",
        "16",
        "--no-progress",
    ]


def _stop_background(fx: Fx) -> None:
    proc = getattr(fx, "background", None)
    if proc is not None:
        proc.kill()
        proc.wait()
        fx.background = None


def _held(fx: Fx, out: Path) -> None:
    """Another process holds ``out`` with kdkit's lock (a capture or training writing there)."""
    code = ("import sys, time; from kdkit.train.rundir import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    fx.background = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert fx.background.stdout.readline().strip() == "held"


def _capture_into_held(fx: Fx) -> list:
    out = fx.root / "work" / "held-cache"
    _held(fx, out)
    return ["precompute", fx.lm.write("held"), "--out", out, "--no-progress"]


def _precompute_into_held(fx: Fx) -> list:
    out = fx.root / "work" / "held-image-cache"
    _held(fx, out)
    return ["precompute", "--teacher", fx.onnx, "--out", out, "--no-progress", "--device", "cpu"]


def _docs(n: int, word: str) -> str:
    return "".join(
        json.dumps({"text": f"{word} {i} is a short document."}) + "\n" for i in range(n)
    )


def _resumed_after_corpus_changed(fx: Fx) -> list:
    """A capture stopped after 2 of 5 shards (the state kill -9 leaves); the corpus is edited
    (the same number of rows), and the same command is run again."""
    from kdkit.cli import main

    corpus = fx.lm.root / "work" / "docs.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(_docs(20, "alpha"))
    cfg = fx.lm.write("docs", data={"text_files": [str(corpus)], "pack": False, "val": None})
    out = fx.root / "work" / "docs-cache"
    argv = [
        "precompute",
        str(cfg),
        "--out",
        str(out),
        "--topk",
        "4",
        "--shard-rows",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0

    def unfinish(m: dict) -> None:
        for shard in m["shards"][2:]:
            (out / shard["file"]).unlink()
        m["shards"], m["complete"] = m["shards"][:2], False
        for key in ("entries", "bytes_per_token"):
            m.pop(key, None)

    _sealed(out, unfinish)
    corpus.write_text(_docs(20, "omega"))
    return argv


CONCURRENT: list[Case] = cli_rows([
    Case("lm-capture-twice-into-one-out-at-once", _concurrent_capture, "in use|lock", post=lambda fx: _stop_background(fx)),
    Case("lm-capture-into-out-held-by-another", _capture_into_held, "in use|lock", post=lambda fx: _stop_background(fx)),
    Case("precompute-into-out-held-by-another", _precompute_into_held, "in use|lock", post=lambda fx: _stop_background(fx)),
    Case("lm-capture-resumed-after-corpus-changed", _resumed_after_corpus_changed, r"corpus|rows"),
])  # fmt: skip

# -- manifests edited and resealed --------------------------------------------------------------
MANIFESTS: list[Case] = cli_rows([
    Case("lm-cache-resealed-shard-dotdot", lambda fx: _verify(_edited(fx, "dotdot", _outside(False))), "outside"),
    Case("lm-cache-resealed-shard-absolute", lambda fx: _verify(_edited(fx, "absolute", _outside(True))), "outside"),
    Case("lm-cache-resealed-shard-dotdot-train", lambda fx: _train_from(fx, _edited(fx, "dotdot-train", _outside(False)), "dotdot"),
         "outside"),
    Case("lm-cache-shard-header-length-huge", lambda fx: _verify(_edited(fx, "header", _shard_header(1 << 62))),
         "header", guard=lambda fx: memory_cap()),
    Case("lm-cache-shard-header-length-past-end", lambda fx: _verify(_edited(fx, "header2", _shard_header(10**6))),
         "header", guard=lambda fx: memory_cap()),
    Case("lm-cache-shard-offsets-past-end", lambda fx: _verify(_edited(fx, "offsets", _shard_header(offsets=True))),
         "shard-00000", guard=lambda fx: memory_cap()),
    Case("lm-cache-intact-verifies", lambda fx: _verify(fx.lm.copy(fx.lm.cache, "intact")), expect="correct"),
])  # fmt: skip


# -- options out of range -----------------------------------------------------------------------
def _capture(*extra: str, alias: bool = False):
    def argv(fx: Fx) -> list:
        verb = ["lm", "capture"] if alias else ["precompute"]
        out = fx.root / "work" / f"opt-cache{''.join(extra)}"
        return [*verb, fx.lm.write("options"), "--out", out, "--no-progress", *extra]

    return argv


def _check(verb: str, *extra: str):
    def argv(fx: Fx) -> list:
        teacher = [] if verb == "check" else ["--teacher", f"hf:{fx.lm.teacher}"]
        return ["cache", verb, fx.lm.cache, *teacher, *extra]

    return argv


def _builder_shard_rows(fx: Fx) -> None:
    """The Python door: :func:`kdkit.run.lm_job.capture_run` with ``shard_rows=0``."""
    from kdkit.config import load_resolved
    from kdkit.run.lm_job import capture_run

    cfg = load_resolved(str(fx.lm.write("builder")))
    capture_run(cfg, fx.root / "work" / "builder-cache", shard_rows=0, progress=False)


OPTIONS: list[Case] = cli_rows([
    Case("lm-capture-shard-rows-zero", _capture("--shard-rows", "0"), "--shard-rows|shard_rows"),
    Case("lm-capture-shard-rows-negative", _capture("--shard-rows", "-1", alias=True), "--shard-rows|shard_rows"),
    Case("lm-capture-temperature-inf", _capture("--temperature", "inf"), "--temperature|temperature"),
    Case("lm-capture-temperature-nan", _capture("--temperature", "nan", alias=True), "--temperature|temperature"),
    Case("lm-capture-temperature-zero", _capture("--temperature", "0"), "--temperature|temperature"),
    Case("lm-capture-topk-zero", _capture("--topk", "0", alias=True), "--topk|topk"),
    Case("lm-capture-topk-negative", _capture("--topk", "-3"), "--topk|topk"),
    Case("lm-check-rows-zero", _check("check", "--rows", "0"), "--rows"),
    Case("lm-check-rows-negative", _check("check", "--rows", "-5"), "--rows"),
    Case("lm-verify-teacher-rows-zero", _check("verify", "--rows", "0"), "--rows"),
    Case("lm-check-max-kl-nan", _check("check", "--max-kl", "nan"), "--max-kl"),
    Case("lm-check-max-dlogp-negative", _check("check", "--max-dlogp", "-1"), "--max-dlogp"),
]) + [
    Case("lm-capture-builder-shard-rows-zero", _builder_shard_rows, "shard_rows"),
]  # fmt: skip

CASES: list[Case] = CONCURRENT + MANIFESTS + OPTIONS


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_lm_cache(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
