"""``task: classify``: image classification distillation at every front door.

Each job calls the image builders (heavy modules are imported inside the job, so looking the
recipe up costs neither torch nor torchvision: ``kdkit cache info`` stays instant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdkit._args import check_min, check_range, check_shape
from kdkit._cache_meta import META_NAME, info_lines, written_lines
from kdkit.errors import KDError
from kdkit.run.recipes.base import (
    Built,
    Recipe,
    RunResult,
    check_demo_out,
    default_cache_dir,
    refuse_options,
)

__all__ = ["ClassifyRecipe"]

#: the flags of ``kdkit precompute`` / ``kdkit cache`` that only a ``task: lm`` cache takes
_LM_ONLY = ("encoding", "temperature", "shard_rows", "rows", "max_dlogp")
#: what an image cache is made and checked with when the flag is not given
_PRECOMPUTE_DEFAULTS = {"dtype": "fp16", "batch_size": 256, "shard_size": 16384}
_CHECK_DEFAULTS = {"n_probe": 256, "max_disagreement": 0.01, "max_kl": 0.01}


class ClassifyRecipe(Recipe):
    task = "classify"
    demo_name = "vision"
    metric_label = "top-1"

    def format_score(self, value: float) -> str:
        return f"{value:.2f}%"

    # -- kdkit train ------------------------------------------------------------------------
    def build(self, cfg: Any, device: Any, *, resume: bool, trust_code: bool) -> Built:
        import json

        from kdkit.run.classify_job import build_run

        trainer, data, choices = build_run(cfg, resume=resume, trust_code=trust_code, device=device)
        files = {"classes.json": json.dumps(list(data.classes)) + "\n"} if data.classes else {}
        return Built(trainer, data, choices, files)

    def report(
        self, cfg: Any, built: Built, result: RunResult, *, wall_s: float, extended: dict
    ) -> None:
        from kdkit.run.run_report import teacher_top1, write_run_report
        from kdkit.train import distributed

        if distributed.is_main():
            result.teacher_score = teacher_top1(built.trainer, built.data)
            write_run_report(
                cfg, built.trainer, built.data, result, wall_s, extended, built.choices
            )

    # -- caches -------------------------------------------------------------------------------
    def precompute(self, cfg: Any, out: Path | None, options: Mapping[str, Any]) -> list[str]:
        from kdkit._io import check_output_path
        from kdkit.cache import precompute
        from kdkit.run.cache_job import cache_plan

        refuse_options(options, _LM_ONLY, "an image cache (task: classify)")
        opts = {**_PRECOMPUTE_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        for key in ("views", "topk", "batch_size", "shard_size"):
            check_min(opts.get(key), 1, "--" + key.replace("_", "-"))
        out = Path(out) if out is not None else default_cache_dir(cfg)
        check_output_path(out, what="--out", directory=True, makes="teacher cache")
        plan = cache_plan(cfg, num_views=opts.get("views"), trust_code=opts["trust_code"])
        precompute(
            plan.teacher, plan.dataset, out, views=plan.views, topk=opts.get("topk"),
            batch_size=opts["batch_size"], dtype=opts["dtype"], mean=plan.mean, std=plan.std,
            shard_size=opts["shard_size"], device=opts.get("device") or cfg.train.device,
            progress=opts["progress"], overwrite=opts.get("overwrite", False),
            source=plan.source, features=plan.features,
        )  # fmt: skip
        lines = written_lines(out, getattr(plan.dataset, "unreadable", None))
        return [*lines, f'train from it: teacher: {{model: "cache:{out}"}}']

    def holds_cache(self, folder: Path) -> bool:
        return (folder / META_NAME).is_file()

    def cache_info(self, folder: Path) -> list[str]:
        return info_lines(folder)

    def cache_verify(self, folder: Path, options: Mapping[str, Any]) -> tuple[list[str], int]:
        from kdkit.cache import verify

        refuse_options(options, ("teacher", *_LM_ONLY), "kdkit cache verify of an image cache")
        meta = verify(folder)
        return [f"ok: {folder}: {len(meta['shards'])} shards, {meta['num_samples']} samples"], 0

    def cache_check(self, target: Path, options: Mapping[str, Any]) -> tuple[list[str], int]:
        from kdkit.cache import check, read_meta

        refuse_options(options, _LM_ONLY, "kdkit cache check of an image cache")
        given = {k: options.get(k) for k in _CHECK_DEFAULTS if options.get(k) is not None}
        limits = {**_CHECK_DEFAULTS, **given}
        check_min(limits["n_probe"], 1, "--n-probe")
        check_range(limits["max_disagreement"], 0.0, 1.0, "--max-disagreement")
        check_min(limits["max_kl"], 0.0, "--max-kl")
        if options.get("config") is not None:
            return self._check_config(options["config"], options, limits)
        if options.get("teacher") is None:
            raise KDError("kdkit cache check DIR needs --teacher FILE (or give a CONFIG.yaml)")
        from kdkit.run.cache_job import load_teacher_file, named_dataset

        meta = read_meta(target)
        data = options.get("data") or (meta.get("source") or {}).get("data")
        if not data:
            raise KDError("the cache records no dataset; pass --data")
        dataset, _, _ = named_dataset(data)
        teacher = load_teacher_file(
            options["teacher"], options["arch"], options.get("device"), options["trust_code"]
        )
        report = check(target, teacher, dataset, device=options.get("device"), **limits)
        return [f"ok: {report}"], 0

    def _check_config(
        self, cfg: Any, options: Mapping[str, Any], limits: dict
    ) -> tuple[list[str], int]:
        """``kdkit cache check CONFIG``: the run's own views, normalisation and data against
        its cache (``--cache DIR``, else the config's ``cache:DIR``, else the default)."""
        from kdkit.cache import check, read_meta
        from kdkit.cache.match import check_expectations
        from kdkit.run.cache_job import cache_plan

        prefix, _, cache_dir = cfg.teacher.model.partition(":") if cfg.teacher else ("", "", "")
        out = options.get("cache") or (
            cache_dir if prefix == "cache" else str(default_cache_dir(cfg))
        )
        plan = cache_plan(cfg, trust_code=options["trust_code"])
        check_expectations(read_meta(out), expect_views=plan.views or False)  # keys, one line
        report = check(
            out, plan.teacher, plan.dataset, views=plan.views, mean=plan.mean, std=plan.std,
            device=options.get("device") or cfg.train.device, **limits,
        )  # fmt: skip
        return [f"ok: {out}: {report}"], 0

    # -- runs: eval, export, predict, bench --------------------------------------------------
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
        from kdkit.run.evaluate import evaluate_image_run

        return evaluate_image_run(
            checkpoint, meta, device=device, data=data, teacher=teacher, trust_code=trust_code
        )

    def score_lines(self, scores: Mapping[str, Mapping[str, float]]) -> list[str]:
        return [
            f"{who + ':':9} top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}%  "
            f"loss {s['loss']:.4f}  ({s['images']:,} images)"
            for who, s in scores.items()
        ]

    def export(self, checkpoint: str, options: Mapping[str, Any]) -> list[str]:
        from kdkit.run.export_run import export_student

        if options.get("hf") is not None:
            raise KDError(
                "--hf writes a language model's save_pretrained folder (task: lm runs); an "
                "image student exports with --onnx PATH"
            )
        check_shape(options.get("input_shape"))
        check_min(options["atol"], 0.0, "--atol")
        if options["int8"]:
            check_range(options["min_agreement"], 0.0, 1.0, "--min-agreement")
            check_min(options["calibration_samples"], 1, "--calibration-samples")
        done = export_student(
            checkpoint, options["onnx"], input_shape=options.get("input_shape"),
            opset=options.get("opset"), atol=options["atol"], verify=not options["no_verify"],
            int8=options["int8"], data=options.get("data") or (),
            samples=options["calibration_samples"], min_agreement=options["min_agreement"],
            trust_code=options["trust_code"],
        )  # fmt: skip
        if done.int8 is not None:
            r = done.int8
            size = r.path.stat().st_size / 2**20
            gate = f"top-1 agreement >= {options['min_agreement']:.2%}"
            return [
                f"path:         {r.path} (int8, {size:.2f} MiB; "
                f"fp32 {r.fp32.size_bytes / 2**20:.2f} MiB)",
                f"fidelity:     {r.fidelity} (gate: {gate})",
            ]
        report, meta = done.report, done.meta
        diff = "skipped" if report.max_abs_diff is None else f"{report.max_abs_diff:.3g}"
        lines = [
            f"path:         {report.path}",
            f"size:         {report.size_bytes / 2**20:.2f} MiB",
            f"opset:        {report.opset} ({report.exporter} exporter)",
            f"input:        {report.input_name} (N, {', '.join(map(str, report.input_shape))})",
            f"max abs diff: {diff} (ONNX Runtime vs PyTorch, batch {report.verify_batch})",
        ]
        if meta.get("mean") and meta.get("std"):
            lines.append(
                f"note: the model expects input normalised with mean={meta['mean']} "
                f"std={meta['std']}"
            )
        return lines

    def predict(self, model: str, options: Mapping[str, Any]) -> Any:
        from kdkit.run.predict import load_predictor

        return load_predictor(model, trust_code=options["trust_code"], device=options["device"])

    def bench_models(self, run: str, *, trust_code: bool) -> tuple[Any, str, Any]:
        from kdkit.run.models import run_models

        return run_models(run, trust_code=trust_code)

    # -- kdkit demo ---------------------------------------------------------------------------
    def demo(self, options: Mapping[str, Any]) -> Path:
        from kdkit.run.vision_demo import DemoConfig, run_demo

        fields = ("seed", "n_labeled", "retrain", "augment", "progress", "teacher_epochs")
        fields += ("scratch_epochs", "kd_epochs", "temperature")
        given = {k: options[k] for k in fields if options.get(k) is not None}
        given["out_dir"] = options.get("out") or "runs/demo"
        check_demo_out(given["out_dir"])  # never a run's or a cache's folder (its report.md)
        cfg = DemoConfig.quick(**given) if options.get("quick") else DemoConfig(**given)
        return run_demo(cfg)
