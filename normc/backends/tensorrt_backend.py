"""TensorRT lowering: ONNX file -> serialized engine (TensorRT 10 Python API).

TensorRT needs an NVIDIA GPU and CUDA; where it is missing every entry point raises
``BackendMissing`` (exit code 3) with the way to get it, and ``is_available()`` is False.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from normc.atomic import atomic_path
from normc.errors import BackendMissing, NormcError

MISSING_MESSAGE = "TensorRT is not installed"
MISSING_HINT = ("pip install tensorrt on a machine with an NVIDIA GPU and CUDA; "
                "export ONNX meanwhile with `export onnx`")


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as exc:  # ImportError, or a broken install failing to load its libraries
        raise BackendMissing(MISSING_MESSAGE, hint=MISSING_HINT) from exc
    return trt


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def is_available() -> bool:
    """TensorRT importable and a CUDA device present."""
    try:
        _import_tensorrt()
    except BackendMissing:
        return False
    return _cuda_available()


def require() -> Any:
    """The tensorrt module, or BackendMissing saying what is missing."""
    trt = _import_tensorrt()
    if not _cuda_available():
        raise BackendMissing("TensorRT is installed but no CUDA GPU is visible",
                             hint="run on a machine with an NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES); "
                             "export ONNX meanwhile with `export onnx`")
    return trt


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    fp16: bool = False,
    workspace_gb: float = 1,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Parse ``onnx_path`` and write a serialized TensorRT engine to ``engine_path`` atomically.

    ``input_shapes`` fixes the shape of inputs exported with dynamic dimensions (one
    optimization profile, min = opt = max); static inputs need nothing.
    """
    trt = require()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise NormcError(f"no such ONNX file: {onnx_path}", hint="export it first with `export onnx`")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: resolves external weight files
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        listing = "\n  ".join(errors) or "(no details from the parser)"
        raise NormcError(f"TensorRT could not parse {onnx_path}:\n  {listing}",
                         hint="try a lower opset (TensorRT lags ONNX), or check the unsupported op above")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)

    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tuple(tensor.shape)):
            dynamic.append(tensor)
    if dynamic:
        shapes = input_shapes or {}
        missing = [t.name for t in dynamic if t.name not in shapes]
        if missing:
            raise NormcError(f"inputs with dynamic dimensions need a shape: {', '.join(missing)}",
                             hint="pass input_shapes={name: shape}, or export ONNX with static shapes")
        profile = builder.create_optimization_profile()
        for t in dynamic:
            shape = tuple(int(d) for d in shapes[t.name])
            profile.set_shape(t.name, shape, shape, shape)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise NormcError(f"TensorRT failed to build an engine from {onnx_path}",
                         hint="see the TensorRT log above; a larger workspace_gb may help")
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(serialized)  # IHostMemory supports the buffer protocol
    return engine_path
