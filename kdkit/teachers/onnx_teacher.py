"""ONNX Runtime teacher: run an exported teacher without PyTorch's autograd or Python overhead.

On CPU the input tensor's memory is handed to ONNX Runtime as a numpy view (no copy); on CUDA
the tensors are bound to the session with I/O binding (``bind_input`` / ``bind_output`` with
the torch tensors' ``data_ptr()``), so the batch never leaves the GPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit._io import sha256_file
from kdkit._ort import import_onnxruntime
from kdkit._precision import ONNX_PRECISIONS
from kdkit.errors import KDError
from kdkit.export import export_onnx
from kdkit.teachers import quantize
from kdkit.teachers.base import Teacher, TeacherOutput
from kdkit.teachers.calibration import input_shape_of
from kdkit.teachers.fidelity import FidelityReport

__all__ = ["OnnxTeacher", "import_onnxruntime", "load_session", "default_providers"]

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
}
_NP_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}

Provider = str | tuple[str, dict[str, Any]]


def default_providers(ort: Any, device: torch.device | None = None) -> list[Provider]:
    """CUDA (on ``device``'s index) then CPU, keeping only those this onnxruntime has."""
    available = ort.get_available_providers()
    providers: list[Provider] = []
    if "CUDAExecutionProvider" in available and (device is None or device.type == "cuda"):
        index = device.index if device is not None and device.index is not None else 0
        providers.append(("CUDAExecutionProvider", {"device_id": index}))
    providers.append("CPUExecutionProvider")
    return providers


def load_session(
    path: str | os.PathLike, providers: Sequence[Provider], ort: Any, threads: int | None = None
) -> Any:
    """An ``InferenceSession`` for ``path``; a file that does not load raises :class:`KDError`.

    ``threads``: ONNX Runtime's intra-op threads; by default as many as PyTorch's
    (``torch.get_num_threads()``) in the calling thread: the teacher alternates with the
    student's PyTorch step, so both share the thread budget the user gave
    (``OMP_NUM_THREADS=1`` means one core for both, not one for PyTorch and every core for ONNX
    Runtime, its own default); run beside the student (:mod:`kdkit.train.overlap`), it gets
    the worker thread's own count.
    """
    path = Path(path)
    if not path.is_file():
        raise KDError(f"no ONNX file at {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by us
    # ORT's worker threads spin for a while after each run by default; a teacher alternates
    # with the student's PyTorch step, whose threads would then find the cores taken.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as err:  # onnxruntime raises its own exception types
        raise KDError(f"could not load the ONNX model {path}: {err}") from None


def _provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


class OnnxTeacher(Teacher):
    """A teacher run by ONNX Runtime from an ``.onnx`` file or from a module exported for it.

    ``path_or_model``: an ``.onnx`` path, or an ``nn.Module`` that is exported (with
    :func:`kdkit.export_onnx`, dynamic batch, verified) to a temporary file; a module needs
    ``input_shape=(C, H, W)``. ``providers`` default to CUDA then CPU where available;
    ``threads`` sets ONNX Runtime's intra-op threads on CPU (default: PyTorch's count in the
    thread that calls the teacher, followed when it changes: the session is reopened).
    Logits come back as float32 on the input's device. Only final outputs are available:
    :meth:`request_features` refuses intermediate layer names.

    ``precision="int8"``: ONNX Runtime static quantization on ``calibration`` images (see
    :mod:`kdkit.teachers.quantize`), cached next to the fp32 file (a module is exported to
    ``cache_dir``, default ``~/.cache/kdkit/onnx``) and refused by the fidelity ``gate``
    (default: 99% top-1 agreement with fp32 on a held-out probe); :attr:`fidelity` holds its
    report and :attr:`int8` the cached file's record.
    """

    def __init__(
        self,
        path_or_model: str | os.PathLike | nn.Module,
        providers: Sequence[Provider] | None = None,
        input_shape: Sequence[int] | None = None,
        *,
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        threads: int | None = None,
        precision: str = "fp32",
        calibration: Any = None,
        gate: Any = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if precision not in ONNX_PRECISIONS:
            raise KDError(f"OnnxTeacher precision must be 'fp32' or 'int8', got {precision!r}")
        self._ort = import_onnxruntime()
        self._threads = threads
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        if isinstance(path_or_model, nn.Module):
            if input_shape is None and precision == "int8" and calibration is not None:
                input_shape = input_shape_of(calibration, input_transform)  # its images' shape
            if input_shape is None:
                raise KDError("OnnxTeacher(module) needs input_shape=(C, H, W) to export it")
            if precision == "int8":  # a lasting fp32 file: its int8 model is cached beside it
                path = quantize.export_path(path_or_model, cache_dir)
                if not path.is_file():
                    export_onnx(path_or_model, path, input_shape)
            else:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="kdkit-onnx-")
                path = Path(self._tmpdir.name) / "teacher.onnx"
                export_onnx(path_or_model, path, input_shape)
        elif isinstance(path_or_model, (str, os.PathLike)):
            path = Path(path_or_model)
        else:
            raise KDError(
                f"OnnxTeacher takes an .onnx path or an nn.Module, not {type(path_or_model).__name__}"
            )
        self.precision = precision
        self.int8: quantize.Int8Model | None = None
        self.fidelity: FidelityReport | None = None
        if precision == "int8":
            self.int8, self.fidelity = quantize.quantize_teacher(
                path,
                calibration,
                gate,
                lambda p: load_session(p, ["CPUExecutionProvider"], self._ort, threads),
                transform=input_transform,
                cache_dir=None if isinstance(path_or_model, nn.Module) else cache_dir,
            )
            path = self.int8.path
        self.path = path
        self.input_transform = input_transform
        self._user_providers = list(providers) if providers else None
        self._fingerprint: str | None = None
        self._open(self._user_providers or default_providers(self._ort))

    def _open(self, providers: Sequence[Provider]) -> None:
        self._session_threads = int(self._threads or torch.get_num_threads())
        self._providers = list(providers)
        self.session = load_session(self.path, providers, self._ort, self._session_threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise KDError(
                f"{self.path} has {len(inputs)} inputs {[i.name for i in inputs]}; "
                "a teacher takes one image batch"
            )
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        if inputs[0].type not in _ORT_TYPES or outputs[0].type not in _ORT_TYPES:
            raise KDError(
                f"{self.path}: input {inputs[0].type} / output {outputs[0].type}; "
                f"OnnxTeacher supports {sorted(_ORT_TYPES)}"
            )
        self.input_dtype = _ORT_TYPES[inputs[0].type]
        self.output_dtype = _ORT_TYPES[outputs[0].type]
        tail = outputs[0].shape[1:]
        # per-sample output shape when the file states it, for preallocated CUDA outputs
        self._out_tail = tuple(tail) if all(isinstance(d, int) for d in tail) else None
        active = self.session.get_providers()
        self.providers = active
        self._cuda_index: int | None = None
        if "CUDAExecutionProvider" in active:
            opts = self.session.get_provider_options().get("CUDAExecutionProvider", {})
            self._cuda_index = int(opts.get("device_id", 0))
        wanted = [_provider_name(p) for p in providers]
        dropped = [p for p in wanted if p not in active]
        if dropped:
            log.warning("%s: providers %s unavailable, running on %s", self.path, dropped, active)

    def to(self, device: torch.device | str) -> OnnxTeacher:
        """Re-open the session for ``device`` (CUDA provider there, or CPU only)."""
        device = torch.device(device)
        if self._user_providers is None:
            self._open(default_providers(self._ort, device))
        if device.type == "cuda" and self._cuda_index is None:  # every batch would cross PCIe
            log.warning(
                "%s: this onnxruntime has no CUDAExecutionProvider, so the teacher runs on the "
                "CPU; for CUDA I/O binding install kdkit[onnx-gpu] (onnxruntime-gpu)",
                self.path,
            )
        self.device = device
        return self

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        if self.input_transform is not None:
            x = self.input_transform(x)
        x = x.detach().to(self.input_dtype)
        if x.is_cuda and self._cuda_index is not None:
            logits = self._run_cuda(x)
        else:
            if self._threads is None and self._session_threads != torch.get_num_threads():
                self._open(self._providers)  # this thread's budget (e.g. the overlap worker's)
            logits = self._run_numpy(x)
        return TeacherOutput(logits=logits.float())

    def _run_numpy(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.cpu().contiguous().numpy()  # a view of the tensor's memory on CPU
        out = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        home = x.device
        device = torch.device("cuda", self._cuda_index)
        x = x.to(device).contiguous()
        io = self.session.io_binding()
        io.bind_input(
            name=self.input_name,
            device_type="cuda",
            device_id=self._cuda_index,
            element_type=_NP_TYPES[x.dtype],
            shape=tuple(x.shape),
            buffer_ptr=x.data_ptr(),
        )
        out = None
        if self._out_tail is not None:
            out = torch.empty((x.shape[0], *self._out_tail), dtype=self.output_dtype, device=device)
            io.bind_output(
                name=self.output_name,
                device_type="cuda",
                device_id=self._cuda_index,
                element_type=_NP_TYPES[out.dtype],
                shape=tuple(out.shape),
                buffer_ptr=out.data_ptr(),
            )
        else:  # shape known only after the run: let ORT allocate, then copy
            io.bind_output(self.output_name, "cuda", self._cuda_index)
        # ORT runs on its own stream: the input must be complete before it starts; the call
        # returns after ORT has synchronised its stream, so ``out`` is ready for torch.
        torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(io)
        if out is None:
            out = torch.from_numpy(io.copy_outputs_to_cpu()[0]).to(device)
        return out.to(home)

    def fingerprint(self) -> str:
        """sha256 of the ONNX file's bytes."""
        if self._fingerprint is None:
            self._fingerprint = sha256_file(self.path)
        return self._fingerprint

    def __repr__(self) -> str:
        return f"OnnxTeacher({str(self.path)!r}, providers={self.providers})"
