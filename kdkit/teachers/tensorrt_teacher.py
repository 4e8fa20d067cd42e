"""TensorRT teacher: an engine built from the ONNX file, run on PyTorch's current CUDA stream.

The engine file (building, cache key and path, the cache itself) is
:mod:`kdkit.teachers._trt_engine`; this module is the runtime.

At run time the input and output are torch tensors on the GPU: their ``data_ptr()`` goes to
``context.set_tensor_address`` and the engine is enqueued with ``execute_async_v3`` on
``torch.cuda.current_stream()``, so it is ordered with the student's kernels like any torch
op. No pycuda, no host round trip.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit._io import sha256_bytes, sha256_file
from kdkit._precision import TRT_PRECISIONS
from kdkit.errors import KDError
from kdkit.teachers import quantize
from kdkit.teachers._trt_engine import (
    ENGINE_FORMAT_VERSION,
    build_engine,
    cuda_device,
    deserialize_engine,
    engine_cache_key,
    engine_cache_path,
    import_tensorrt,
    load_cached_engine,
    store_engine,
    torch_dtype,
)
from kdkit.teachers.base import Teacher, TeacherOutput
from kdkit.teachers.calibration import draw_calibration
from kdkit.teachers.fidelity import FidelityReport
from kdkit.teachers.onnx_teacher import import_onnxruntime, load_session

__all__ = [
    "TensorRTTeacher",
    "import_tensorrt",
    "engine_cache_key",
    "engine_cache_path",
    "ENGINE_FORMAT_VERSION",
]

log = logging.getLogger(__name__)


def _int8_onnx(
    onnx_path: Path,
    calibration: Any,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    cache_dir: str | os.PathLike | None,
) -> tuple[Any, Path]:
    """(probe inputs, symmetric-int8 QDQ file of ``onnx_path``) for an int8 engine."""
    ort = import_onnxruntime()
    cal = quantize.as_calibration(calibration)
    arrays = draw_calibration(cal, transform)
    model = quantize.int8_model(
        onnx_path,
        arrays,
        cal,
        lambda p: load_session(p, ["CPUExecutionProvider"], ort),
        target="tensorrt",
        cache_dir=cache_dir,
    )
    return arrays.probe, model.path


class TensorRTTeacher(Teacher):
    """A TensorRT engine as a teacher (NVIDIA GPUs only).

    ``precision``: ``"fp16"`` (default), ``"bf16"``, ``"fp32"`` (TF32 disabled, so it
    matches eager fp32 closely) or ``"int8"``: the ONNX file is quantized on ``calibration``
    images into a symmetric-int8 QDQ file (cached beside it, see
    :mod:`kdkit.teachers.quantize`; needs onnxruntime), the engine is built from that
    (explicit quantization), and the fidelity ``gate`` compares it with the fp32 file run by
    ONNX Runtime on a held-out probe (report in :attr:`fidelity`). The engine accepts
    batches ``min_batch..max_batch`` and is tuned for ``opt_batch`` (default
    ``max_batch``); larger batches are run in chunks. ``workspace_gb`` caps TensorRT's
    scratch memory while building. The input must be a CUDA tensor; logits come back float32
    on the same device.
    """

    #: the int8 gate's report (``None`` for other precisions and for :meth:`from_engine`)
    fidelity: FidelityReport | None = None

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        precision: str = "fp16",
        max_batch: int = 256,
        opt_batch: int | None = None,
        min_batch: int = 1,
        workspace_gb: float = 4.0,
        *,
        device: torch.device | str = "cuda",
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        calibration: Any = None,
        gate: Any = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        trt = import_tensorrt()
        if precision not in TRT_PRECISIONS:
            raise KDError(f"precision must be one of {list(TRT_PRECISIONS)}, got {precision!r}")
        opt_batch = max_batch if opt_batch is None else opt_batch
        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise KDError(
                f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, "
                f"{max_batch}"
            )
        device = cuda_device(device)
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise KDError(f"no ONNX file at {onnx_path}")
        self.fidelity: FidelityReport | None = None
        if precision == "int8":
            fp32_path = onnx_path
            probe, onnx_path = _int8_onnx(onnx_path, calibration, input_transform, cache_dir)
        onnx_sha = sha256_file(onnx_path)
        key = engine_cache_key(
            onnx_sha,
            trt.__version__,
            torch.cuda.get_device_name(device),
            precision,
            min_batch,
            opt_batch,
            max_batch,
        )
        self.engine_path = engine_cache_path(onnx_path, key)
        with torch.cuda.device(device):
            data = load_cached_engine(self.engine_path, key)
            engine = deserialize_engine(trt, data) if data is not None else None
            if engine is None:
                if data is not None:
                    log.warning("cached engine %s does not load; rebuilding", self.engine_path)
                batches = (min_batch, opt_batch, max_batch)
                data = build_engine(trt, onnx_path, precision, batches, workspace_gb)
                store_engine(self.engine_path, data, key)
                engine = deserialize_engine(trt, data)
        self._setup(trt, engine, device, input_transform, f"{onnx_sha}:{precision}")
        self.precision = precision
        if precision == "int8":
            self.fidelity = self._gate(fp32_path, probe, gate)

    def _gate(self, fp32_path: Path, probe: Any, gate: Any) -> FidelityReport:
        """The int8 engine against the fp32 ONNX file (ONNX Runtime, CPU) on the probe."""
        reference = load_session(fp32_path, ["CPUExecutionProvider"], import_onnxruntime())
        return quantize.check_fidelity(
            lambda x: quantize.run_session(reference, x),
            lambda x: self._engine_logits(torch.from_numpy(x).to(self.device)).cpu(),
            probe,
            quantize.as_gate(gate),
            f"the TensorRT int8 engine {self.engine_path.name}",
        )

    @classmethod
    def from_engine(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cuda",
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> TensorRTTeacher:
        """Load an already-built engine (``.engine`` / ``.plan``), e.g. from ``trtexec``."""
        trt = import_tensorrt()
        device = cuda_device(device)
        path = Path(path)
        if not path.is_file():
            raise KDError(f"no TensorRT engine at {path}")
        self = cls.__new__(cls)
        Teacher.__init__(self)
        self.engine_path = path
        self.precision = "unknown"
        sidecar = path.with_name(path.name + ".json")
        if sidecar.is_file():
            key = json.loads(sidecar.read_text()).get("key", {})
            self.precision = key.get("precision", "unknown")
        data = path.read_bytes()
        with torch.cuda.device(device):
            engine = deserialize_engine(trt, data)
        self._setup(trt, engine, device, input_transform, sha256_bytes(data))
        return self

    # -- runtime ----------------------------------------------------------------------------
    def _setup(
        self,
        trt: Any,
        loaded: tuple[Any, Any] | None,
        device: torch.device,
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None,
        fingerprint: str,
    ) -> None:
        if loaded is None:
            raise KDError(
                f"TensorRT {trt.__version__} could not load the engine {self.engine_path} "
                "(built by another TensorRT version or for another GPU?)"
            )
        self._trt = trt
        self.device = device
        self.input_transform = input_transform
        self._fingerprint = sha256_bytes(f"tensorrt:{fingerprint}".encode())
        self.engine, self._runtime = loaded
        with torch.cuda.device(device):
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise KDError(f"{self.engine_path}: need one input and an output, got {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self._extra_outputs = outputs[1:]
        self.input_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        if tuple(self.engine.get_tensor_shape(self.input_name))[0] == -1:
            lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        else:
            fixed = int(self.engine.get_tensor_shape(self.input_name)[0])
            self.min_batch = self.opt_batch = self.max_batch = fixed

    def to(self, device: torch.device | str) -> TensorRTTeacher:
        if cuda_device(device) != self.device:
            raise KDError(
                f"this engine was loaded on {self.device}; build a TensorRTTeacher for {device}"
            )
        return self

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        if not x.is_cuda:
            raise KDError(
                f"TensorRTTeacher needs its input on {self.device}, got a {x.device} tensor"
            )
        if self.input_transform is not None:
            x = self.input_transform(x)
        return TeacherOutput(logits=self._engine_logits(x))

    def _engine_logits(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < self.min_batch:
            raise KDError(f"batch {n} is below the engine's min_batch={self.min_batch}")
        with torch.cuda.device(self.device):
            x = x.to(self.device, self.input_dtype).contiguous()
            chunks = [self._run(c) for c in x.split(self.max_batch)]
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return logits.float()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise KDError(f"the engine rejects input shape {tuple(x.shape)}")
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        out = torch.empty(
            tuple(ctx.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device=x.device
        )
        ctx.set_tensor_address(self.output_name, out.data_ptr())
        keep = []  # outputs we do not return still need a buffer while the engine runs
        for name in self._extra_outputs:
            dtype = torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            buf = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=x.device)
            ctx.set_tensor_address(name, buf.data_ptr())
            keep.append(buf)
        # Enqueued on torch's current stream: ordered after the kernels that produced ``x``
        # and before whatever reads ``out``; the caching allocator reuses x/out/keep only on
        # this stream, after the engine is done with them.
        if not ctx.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.engine_path}")
        return out

    def fingerprint(self) -> str:
        """Hash of the ONNX file's sha256 and the precision (engine bytes for ``from_engine``)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"TensorRTTeacher({str(self.engine_path)!r}, precision={self.precision!r}, "
            f"batch={self.min_batch}..{self.max_batch}, device={self.device})"
        )
