"""``task: lm``: token-level distillation of a causal language model at every front door.

Each job calls the LM builders (``run/lm_job.py``, ``run/lm_tools.py``, ``run/lm_report.py``,
``run/lm_demo.py``); transformers and torch are imported inside the jobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdkit._args import check_min
from kdkit._io import check_output_path
from kdkit.errors import KDError
from kdkit.run.recipes.base import (
    Built,
    Recipe,
    RunResult,
    check_demo_out,
    default_cache_dir,
    refuse_options,
)

__all__ = ["LMRecipe"]

#: the flags of ``kdkit precompute`` / ``kdkit cache`` that only an image cache takes
_IMAGE_ONLY = ("views", "dtype", "batch_size", "shard_size", "overwrite", "n_probe")
_IMAGE_ONLY_CHECK = ("max_disagreement", "data", "cache", "config")
#: the LM cache's own manifest (kdkit.lm.cache.format.MANIFEST; read without importing numpy)
_MANIFEST = "manifest.json"


class LMRecipe(Recipe):
    task = "lm"
    demo_name = "lm"
    metric_label = "perplexity"

    def format_score(self, value: float) -> str:
        return f"{value:.3f}"

    # -- kdkit train ------------------------------------------------------------------------
    def build(self, cfg: Any, device: Any, *, resume: bool, trust_code: bool) -> Built:
        from kdkit.run.autotune import read_choices
        from kdkit.run.lm_job import build_lm_trainer
        from kdkit.train.overlap import resumed_records

        trainer, data = build_lm_trainer(cfg, device, trust_code=trust_code)
        # train.overlap: the live teacher beside the student, chosen on the first batch
        choices = trainer.plan(resumed_records(read_choices(cfg.run_dir)) if resume else None)
        return Built(trainer, data, choices if cfg.train.overlap == "auto" else [])

    def report(
        self, cfg: Any, built: Built, result: RunResult, *, wall_s: float, extended: dict
    ) -> None:
        from kdkit.run.lm_report import lm_teacher_scores, write_lm_report
        from kdkit.train import distributed

        teacher = lm_teacher_scores(built.trainer, built.data)  # every rank
        result.teacher_score = None if teacher is None else teacher["ppl"]
        if distributed.is_main():
            write_lm_report(cfg, built.trainer, result, wall_s, built.data, teacher)

    # -- caches -------------------------------------------------------------------------------
    def precompute(self, cfg: Any, out: Path | None, options: Mapping[str, Any]) -> list[str]:
        from kdkit.run.lm_job import capture_run

        refuse_options(options, _IMAGE_ONLY, "a task: lm top-k cache (kdkit lm capture)")
        given = {k: v for k, v in options.items() if v is not None}  # 0 is a value, not unset
        out = Path(out) if out is not None else default_cache_dir(cfg)
        check_output_path(out, what="--out", directory=True, makes="LM teacher cache")
        m = capture_run(
            cfg, out, topk=given.get("topk", 32), encoding=given.get("encoding", "q8"),
            temperature=given.get("temperature", 1.0), shard_rows=given.get("shard_rows", 256),
            progress=options["progress"], trust_code=options["trust_code"],
        )  # fmt: skip
        return [
            f"captured {m['num_rows']} rows ({m['entries']} tokens) into {out}: "
            f"{m['bytes_per_token']:.1f} bytes per token; train with teacher: "
            f"{{model: 'cache:{out}'}}"
        ]

    def generate(
        self, config: str, overrides: Sequence[str], options: Mapping[str, Any]
    ) -> list[str]:
        from kdkit.run.lm_generate import generate_config, generate_lines, generate_run, score_run

        out = Path(options["out"])
        if options.get("score") is not None:
            sampling = ("n", "temperature", "top_p", "max_new_tokens", "seed", "batch_size")
            refuse_options(options, (*sampling, "keep_unfinished", "keep_duplicates", "device",
                                     "any_tokenization"),
                           "--score (the teacher scores the file's completions)")  # fmt: skip
            cfg = generate_config(config, list(overrides), options["score"])
            m = score_run(cfg, out, options)
            return [
                f"scored {m['num_rows']} rows ({m['entries']} tokens) of {options['score']} into "
                f"{out} at temperature {m['capture']['temperature']:g}; train with "
                f"teacher: {{model: 'cache:{out}'}} on that file"
            ]
        cfg = generate_config(config, list(overrides), options["prompts"])
        given = {**options, "dedup": not options.get("keep_duplicates")}
        return generate_lines(generate_run(cfg, options["prompts"], out, given), out, config)

    def holds_cache(self, folder: Path) -> bool:
        return (folder / _MANIFEST).is_file()

    def cache_info(self, folder: Path) -> list[str]:
        from kdkit.lm.cache.inspect import info_lines

        return info_lines(folder)

    def cache_verify(self, folder: Path, options: Mapping[str, Any]) -> tuple[list[str], int]:
        from kdkit.lm.cache.inspect import verify

        cache = verify(folder)
        lines = [
            f"ok: {folder}: {len(cache.shards)} shards, {len(cache)} rows, checksums and hashes"
        ]
        if not options.get("teacher"):
            return lines, 0
        more, code = self._recompute(folder, options["teacher"], options)
        return lines + more, code

    def cache_check(self, target: Path, options: Mapping[str, Any]) -> tuple[list[str], int]:
        from kdkit.lm.cache.reader import TopKCache

        refuse_options(options, _IMAGE_ONLY + _IMAGE_ONLY_CHECK, "kdkit cache check of an LM cache")
        model = options.get("teacher") or TopKCache(target).manifest["teacher"]["model"]
        return self._recompute(target, model, options)

    def _recompute(
        self, folder: Path, model: str, options: Mapping[str, Any]
    ) -> tuple[list[str], int]:
        """Recompute sampled rows with the live teacher ``model``; exit 1 above a threshold."""
        from kdkit.lm.cache.inspect import check
        from kdkit.lm.models import freeze_teacher, load_lm
        from kdkit.lm.tokenizer import pad_id

        rows = 16 if options.get("rows") is None else options["rows"]
        max_dlogp = 0.1 if options.get("max_dlogp") is None else options["max_dlogp"]
        max_kl = 1e-3 if options.get("max_kl") is None else options["max_kl"]
        check_min(rows, 1, "--rows")  # kdkit cache check and verify --teacher both pass here
        check_min(max_dlogp, 0, "--max-dlogp")
        check_min(max_kl, 0, "--max-kl")
        teacher, tok = load_lm(model, trust_code=bool(options.get("trust_code")))
        pad = 0 if tok is None else pad_id(tok)  # padding is masked: any real id
        r = check(folder, freeze_teacher(teacher), rows=rows, pad_id=pad)
        ok = r["max_abs_dlogp"] <= max_dlogp and r["mean_kl"] <= max_kl
        same = "same weights as captured" if r["same_weights"] else "OTHER weights than captured"
        line = (
            f"{'ok' if ok else 'MISMATCH'}: {r['rows']} rows, {r['tokens']} tokens recomputed "
            f"with {model} ({same}): max |d logp| {r['max_abs_dlogp']:.4g} (<= {max_dlogp:g}), "
            f"mean KL {r['mean_kl']:.3g} (<= {max_kl:g})"
        )
        return [line], 0 if ok else 1

    # -- runs: eval, export -------------------------------------------------------------------
    def evaluate(
        self,
        checkpoint: Path,
        meta: Mapping[str, Any],
        *,
        device: Any,
        data: Sequence[str],
        teacher: bool,
        trust_code: bool,
    ) -> dict[str, dict[str, float]]:
        """Perplexity, bits per byte, top-1 agreement with the teacher and mean KL (``--data`` takes
        ``text_files=GLOB``: other text than the run's val files)."""
        from kdkit.run.lm_tools import evaluate_lm_run

        files = []
        for item in data:
            key, _, value = item.partition("=")
            if key not in ("text_files", "val.text_files") or not value:
                raise KDError(f"--data for a task: lm run takes text_files=GLOB, got {item!r}")
            files.append(value)
        return evaluate_lm_run(checkpoint, device, teacher=True, data=files, trust_code=trust_code)

    def score_lines(self, scores: Mapping[str, Any]) -> list[str]:
        from kdkit.lm.generations import Generation
        from kdkit.run.lm_report import generation_lines

        lines = []
        for who, s in scores.items():
            if who == "samples":
                continue
            bpb = f"  bits/byte {s['bpb']:.4f}" if "bpb" in s else ""
            extra = f"  agreement {s['agree']:.2f}%  KL {s['kl']:.4f}" if "kl" in s else ""
            n_bytes = f", {int(s['bytes']):,} bytes" if "bytes" in s else ""
            lines.append(
                f"{who + ':':9} perplexity {s['ppl']:.3f}{bpb}{extra}  "
                f"({int(s['tokens']):,} tokens{n_bytes})"
            )
        gens = [Generation(**g) for g in scores.get("samples", ())]
        return lines + ([""] + generation_lines(gens) if gens else [])

    def export(self, checkpoint: str, options: Mapping[str, Any]) -> list[str]:
        from kdkit.run.lm_tools import export_hf

        if options.get("hf") is None:
            raise KDError(
                "a task: lm run exports its student as a save_pretrained folder: --hf DIR "
                "(AutoModelForCausalLM loads it; ONNX export of language models is not here)"
            )
        refuse_options(options, ("int8", "input_shape", "opset"), "--hf (a task: lm export)")
        adapter = bool(options.get("adapter"))
        out = export_hf(
            checkpoint, options["hf"], trust_code=options["trust_code"], adapter=adapter
        )
        if adapter:
            return [f"wrote {out}: the LoRA adapter (peft.PeftModel.from_pretrained(base, DIR))"]
        return [f"wrote {out} (AutoModelForCausalLM.from_pretrained loads it without kdkit)"]

    def predict(self, model: str, options: Mapping[str, Any]) -> Any:
        raise self._missing(
            "kdkit predict",
            "it labels images; export the student with kdkit export RUN --hf DIR and generate "
            "with transformers",
        )

    def bench_models(self, run: str, *, trust_code: bool) -> tuple[Any, str, Any]:
        raise self._missing(
            "kdkit bench RUN",
            "the run's report.md and metrics.csv hold the student's tokens/s; kdkit bench "
            "times image models",
        )

    # -- kdkit demo ---------------------------------------------------------------------------
    def demo(self, options: Mapping[str, Any]) -> Path:
        from kdkit.run.lm_demo import LMDemoConfig, run_lm_demo

        image_only = ("n_labeled", "teacher_epochs", "scratch_epochs", "kd_epochs")
        refuse_options(options, (*image_only, "temperature"), "kdkit demo lm")
        if options.get("augment") is False:
            raise KDError("--no-augment does not apply to kdkit demo lm; drop it")
        given = {
            k: options[k] for k in ("seed", "retrain", "progress") if options.get(k) is not None
        }
        given["out_dir"] = options.get("out") or "runs/demo-lm"
        check_demo_out(given["out_dir"])  # never a run's or a cache's folder (its report.md)
        cfg = LMDemoConfig.quick(**given) if options.get("quick") else LMDemoConfig(**given)
        return run_lm_demo(cfg)
