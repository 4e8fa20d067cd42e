"""The TensorRT engine file: building it from ONNX, its cache key and path, and the cache.

The engine is built once with TensorRT's Python API (``OnnxParser``, one optimization
profile spanning ``min_batch..max_batch``, precision flags) and cached next to the ONNX
file. The cache file name carries a hash of everything that makes an engine valid: the ONNX
file's sha256, the TensorRT version, the GPU name, the precision and the batch range. A
sidecar JSON records the format version and that key in clear; a mismatch rebuilds.
The runtime that enqueues an engine is :mod:`kdkit.teachers.tensorrt_teacher`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kdkit._io import atomic_write_bytes, atomic_write_json, sha256_bytes
from kdkit.errors import KDError

__all__ = [
    "ENGINE_FORMAT_VERSION",
    "engine_cache_key",
    "engine_cache_path",
    "import_tensorrt",
    "load_cached_engine",
    "store_engine",
    "build_engine",
    "cuda_device",
    "deserialize_engine",
    "torch_dtype",
]

log = logging.getLogger(__name__)

ENGINE_FORMAT_VERSION = 1


def import_tensorrt() -> Any:
    """``tensorrt``, or a :class:`KDError` with the install command."""
    try:
        import tensorrt
    except ImportError as err:
        raise KDError(
            f"TensorRT is not installed ({err}); TensorRTTeacher needs an NVIDIA GPU and "
            "`pip install kdkit[tensorrt]`; OnnxTeacher or TorchTeacher run anywhere"
        ) from None
    return tensorrt


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
) -> dict[str, Any]:
    """Everything that decides whether a serialized engine can be reused."""
    return {
        "format_version": ENGINE_FORMAT_VERSION,
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "precision": precision,
        "batch": [int(min_batch), int(opt_batch), int(max_batch)],
    }


def engine_cache_path(onnx_path: str | os.PathLike, key: dict[str, Any]) -> Path:
    """``<dir>/<stem>.<precision>.b<min>-<opt>-<max>.<hash of key>.engine`` next to the ONNX."""
    onnx_path = Path(onnx_path)
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    lo, opt, hi = key["batch"]
    name = f"{onnx_path.stem}.{key['precision']}.b{lo}-{opt}-{hi}.{digest}.engine"
    return onnx_path.with_name(name)


def load_cached_engine(engine_path: Path, key: dict[str, Any]) -> bytes | None:
    """The serialized engine at ``engine_path`` if its sidecar JSON records this format
    version, this ``key`` and the file's sha256; ``None`` (logged) means build it again."""
    sidecar = engine_path.with_name(engine_path.name + ".json")
    if not (engine_path.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("format_version") != ENGINE_FORMAT_VERSION or meta.get("key") != key:
        log.warning("%s does not match this build; rebuilding", engine_path)
        return None
    data = engine_path.read_bytes()
    if meta.get("sha256") != sha256_bytes(data):  # torn or edited: never deserialize it
        log.warning("%s fails its checksum; rebuilding", engine_path)
        return None
    log.info("using cached TensorRT engine %s", engine_path)
    return data


def store_engine(engine_path: Path, data: bytes, key: dict[str, Any]) -> None:
    """Write the engine and its sidecar JSON (format version, key, size, sha256); a directory
    that cannot be written is logged and the engine stays in memory only."""
    sidecar = engine_path.with_name(engine_path.name + ".json")
    meta = {
        "format_version": ENGINE_FORMAT_VERSION,
        "key": key,
        "bytes": len(data),
        "sha256": sha256_bytes(data),
    }
    try:
        atomic_write_bytes(engine_path, data)
        atomic_write_json(sidecar, meta)
    except OSError as err:  # a read-only model directory: keep the engine in memory
        log.warning("could not cache the engine at %s (%s)", engine_path, err)


def cuda_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise KDError(
            f"TensorRTTeacher runs on an NVIDIA GPU; device {str(device)!r} is not a CUDA device "
            "(or no CUDA device is visible). Use OnnxTeacher or TorchTeacher on CPU"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16}
    table |= {"INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool}
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise KDError(f"TensorRT tensor type {dtype} has no torch equivalent")


def build_engine(
    trt: Any,
    onnx_path: Path,
    precision: str,
    batch: tuple[int, int, int],
    workspace_gb: float,
) -> bytes:
    """Parse the ONNX file and build a serialized engine with one batch profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KDError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, comparable to eager
    else:
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:  # TensorRT 11 builds strongly typed networks only
            raise KDError(
                f"TensorRT {trt.__version__} has no {precision} builder flag (TensorRT 11 "
                "removed them: the ONNX file's own types decide the precision). Install "
                "TensorRT 10 (pip install 'kdkit[tensorrt]'), or build an engine from an "
                f"{precision} ONNX with trtexec and load it with TensorRTTeacher.from_engine"
            )
        config.set_flag(flag)
        if precision == "int8":  # explicit (QDQ) quantization; other layers may run in fp16
            config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if dims[0] != -1 or any(d < 0 for d in dims[1:]):
            raise KDError(
                f"{onnx_path}: input {tensor.name!r} has shape {dims}; TensorRTTeacher needs a "
                "dynamic batch axis and fixed other axes (export with kdkit.export_onnx)"
            )
        lo, opt, hi = ((b, *dims[1:]) for b in batch)
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    log.info("building TensorRT %s engine for %s (batch %s..%s)", precision, onnx_path, *batch[::2])
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KDError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
    return bytes(serialized)


def deserialize_engine(trt: Any, data: bytes) -> tuple[Any, Any] | None:
    """``(engine, runtime)`` for ``data`` on the current CUDA device; ``None`` if TensorRT
    rejects it. The runtime is returned so it can be kept alive as long as the engine."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    return None if engine is None else (engine, runtime)
