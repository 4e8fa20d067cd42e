"""``kdkit lm serve CONFIG|MODEL``: load a teacher as training would, then serve it over HTTP.

The builder half of the served teacher (the HTTP half is :mod:`kdkit.lm.serve.server`). A
``task: lm`` CONFIG serves its ``teacher:`` section (model, dtype, ``backend: onnx``,
``precision: int8``, gated on the config's first rows at its KD temperature, as ``kdkit train``
gates it) and probes kdkit's view of the teacher on its first row; a MODEL (``hf:DIR``) takes
``--dtype`` / ``--backend onnx`` (fp32) and is probed on a short text. Either way the served
distribution is the one the training process would have computed in-process
(:mod:`kdkit.lm.topk`), and the server reports the fingerprint the client checks.

Nothing about the served teacher is a new task: it is a teacher *source* of ``task: lm``
(docs/architecture.md), so there is no recipe for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit.errors import KDError

__all__ = ["serve_teacher", "load_served"]

log = logging.getLogger(__name__)

_PROBE_TEXT = (
    "Knowledge distillation trains a small student to match a large teacher: the student sees "
    "the teacher's distribution over the next token, not only the token that came next."
)


def _model_section(source: str, dtype: str | None, backend: str, precision: str) -> Any:
    from kdkit.config import LMModelConfig

    prefix, _, path = source.partition(":")
    if prefix != "hf" or not path:
        raise KDError(
            f"kdkit lm serve takes a task: lm CONFIG.yaml or a model 'hf:DIR' (a "
            f"save_pretrained folder with its weights), got {source!r}"
        )
    if not (Path(path).expanduser() / "config.json").is_file():
        raise KDError(f"{path} has no config.json (not a model folder)")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise KDError(f"--dtype expects float32, bfloat16 or float16, got {dtype!r}")
    if (backend, precision) != ("torch", "fp32") and dtype not in (None, "float32"):
        raise KDError("--dtype: the ONNX Runtime teacher is exported from float32 weights")
    if precision == "int8":
        raise KDError(
            "--precision int8 is used behind a fidelity gate on real rows: serve a task: lm "
            "CONFIG whose teacher says precision: int8 (its data's first rows gate it)"
        )
    return LMModelConfig(model=f"hf:{os.path.abspath(os.path.expanduser(path))}", dtype=dtype,
                         backend=backend, precision=precision)  # fmt: skip


def load_served(
    source: str,
    *,
    overrides: Sequence[str] = (),
    dtype: str | None = None,
    backend: str = "torch",
    precision: str = "fp32",
    device: str | None = None,
    max_topk: int | None = None,
    max_batch_tokens: int = 1 << 16,
    trust_code: bool = False,
) -> Any:
    """The :class:`~kdkit.lm.serve.TeacherScorer` of ``source`` (a CONFIG or ``hf:DIR``)."""
    from kdkit._fingerprint import module_fingerprint
    from kdkit.lm.models import freeze_teacher, load_lm, max_positions
    from kdkit.lm.probe import probe_model
    from kdkit.lm.serve.scorer import TeacherScorer
    from kdkit.run.lm_job import lm_datasets, load_lm_teacher_backend, probe_first_row

    where = torch.device(device or "cpu")
    cfg = None
    if Path(source).suffix in (".yaml", ".yml") or Path(source).is_file():
        from kdkit.config import LMRunConfig, load_resolved

        if (dtype, backend, precision) != (None, "torch", "fp32"):
            raise KDError("with a CONFIG its teacher: section says dtype / backend / precision "
                          "(or --set teacher.backend=onnx); drop the flags")  # fmt: skip
        cfg = load_resolved(source, overrides)
        tc = cfg.teacher if isinstance(cfg, LMRunConfig) else None
        if tc is None or not tc.model.startswith("hf:"):
            raise KDError(f"{source}: kdkit lm serve serves a task: lm config's teacher: "
                          "{model: 'hf:DIR'} (not a cache, a served teacher or none)")  # fmt: skip
    else:
        tc = _model_section(source, dtype, backend, precision)
    teacher, tokenizer = load_lm(tc.model, dtype=tc.dtype, tokenizer=tc.tokenizer,
                                 trust_code=trust_code)  # fmt: skip
    freeze_teacher(teacher)
    weights = module_fingerprint(teacher)  # of the weights, whatever engine runs them
    if cfg is not None:  # the config's first row, and (int8) its first rows for the gate
        from kdkit.lm.align import Aligner
        from kdkit.lm.tokenizer import pad_id

        train, _ = lm_datasets(cfg, tokenizer, max_positions(teacher))
        probe_first_row(teacher, train, "teacher", packing=cfg.data.pack)
        aligner = Aligner(pad_id=pad_id(tokenizer), max_length=cfg.data.max_length)
        teacher = load_lm_teacher_backend(teacher, cfg, train, aligner, where)
    else:
        ids = torch.as_tensor(tokenizer(_PROBE_TEXT)["input_ids"], dtype=torch.long)
        probe_model(teacher, ids, role="teacher")
        if tc.backend == "onnx":
            from kdkit.lm.onnx_teacher import OnnxLMTeacher

            teacher = OnnxLMTeacher.from_model(teacher, precision="fp32")
    if (tc.backend, tc.precision) == ("torch", "fp32"):
        teacher.to(where)
    elif where.type != "cpu":
        log.warning("the ONNX Runtime teacher runs on the CPU (--device %s is not used)", where)
        where = torch.device("cpu")
    return TeacherScorer(
        teacher, tokenizer, model=tc.model, weights_sha256=weights,
        engine=f"{tc.backend} {tc.precision}", device=where, max_topk=max_topk,
        max_tokens=max_batch_tokens,
    )  # fmt: skip


def serve_teacher(
    source: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_env: str = "KDKIT_TEACHER_TOKEN",
    name: str | None = None,
    max_logprobs: int = 20,
    max_body_mb: float = 64,
    ready: Callable[[str], None] = print,
    **load: Any,
) -> None:
    """Serve ``source``'s teacher on ``host:port`` until interrupted; ``ready`` gets one line
    with the address once it listens (``port`` 0: a free port, named there). ``load``: the
    keywords of :func:`load_served`."""
    from kdkit.lm.serve.server import build_app, check_exposure, listen, serve

    token = os.environ.get(token_env) or None
    check_exposure(host, token, token_env)  # before minutes of loading
    if not 0 <= port <= 65535:
        raise KDError(f"--port must be in [0, 65535], got {port}")
    scorer = load_served(source, **load)
    served_name = name or Path(scorer.info["model"].partition(":")[2]).name or "teacher"
    app = build_app(
        scorer, token=token, name=served_name, max_logprobs=max_logprobs,
        max_batch_tokens=scorer.limits.max_tokens, max_body_bytes=int(max_body_mb * (1 << 20)),
    )  # fmt: skip
    sock = listen(host, port)
    t = scorer.info["teacher"]

    def say(url: str) -> None:
        ready(
            f"kdkit lm serve: {served_name} ({t['engine']} on {scorer.device}, "
            f"{t['vocab']} tokens, fingerprint {scorer.fingerprint[:12]}) listening on {url} "
            f"(kdkit: {url}/kdkit/v1/topk, vLLM: {url}/v1/completions"
            + (", token required)" if token else ", no token)")
        )

    serve(app, sock, ready=say)
