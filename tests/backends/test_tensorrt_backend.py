import builtins
import sys
import types

import pytest
import torch

from normc.backends import tensorrt_backend as trt_backend
from normc.errors import EXIT_BACKEND_MISSING, BackendMissing, NormcError


@pytest.fixture
def no_tensorrt(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_tensorrt_is_backend_missing(no_tensorrt, tmp_path):
    assert trt_backend.is_available() is False
    with pytest.raises(BackendMissing) as info:
        trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    err = info.value
    assert err.message == "TensorRT is not installed"
    assert err.hint == ("pip install tensorrt on a machine with an NVIDIA GPU and CUDA; "
                        "export ONNX meanwhile with `export onnx`")
    assert err.exit_code == EXIT_BACKEND_MISSING
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_without_gpu_is_backend_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trt_backend.is_available() is False
    with pytest.raises(BackendMissing, match="no CUDA GPU"):
        trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


# ----------------------------------------------------------------------------- a stand-in API
def fake_trt(parse_ok=True, build_ok=True, dynamic=False):
    """Enough of the TensorRT 10 API to drive build_engine's control flow."""
    calls = {}
    trt = types.ModuleType("tensorrt")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        name, shape = "x", ((-1, 4) if dynamic else (2, 4))

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls["profile"] = (name, mn, opt, mx)

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls["flag"] = flag

        def add_optimization_profile(self, p):
            calls["profiles"] = calls.get("profiles", 0) + 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE" if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return ["unsupported op Foo", "bad node 3"][i]

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16")
    return trt, calls


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"onnx")
    return p


def _install(monkeypatch, trt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "_cuda_available", lambda: True)


def test_build_engine_flow_with_stand_in(monkeypatch, onnx_file, tmp_path):
    trt, calls = fake_trt()
    _install(monkeypatch, trt)
    out = trt_backend.build_engine(onnx_file, tmp_path / "e" / "m.engine", fp16=True, workspace_gb=0.5)
    assert out.read_bytes() == b"ENGINE"
    assert calls["network_flags"] == 0 and calls["flag"] == "fp16" and calls["workspace"] == 1 << 29
    assert calls["parsed"] == str(onnx_file)


def test_build_engine_lists_parser_errors(monkeypatch, onnx_file, tmp_path):
    trt, _ = fake_trt(parse_ok=False)
    _install(monkeypatch, trt)
    with pytest.raises(NormcError, match="unsupported op Foo") as info:
        trt_backend.build_engine(onnx_file, tmp_path / "m.engine")
    assert "bad node 3" in info.value.message
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_failure_writes_nothing(monkeypatch, onnx_file, tmp_path):
    trt, _ = fake_trt(build_ok=False)
    _install(monkeypatch, trt)
    with pytest.raises(NormcError, match="failed to build"):
        trt_backend.build_engine(onnx_file, tmp_path / "m.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_build_engine_dynamic_inputs_need_shapes(monkeypatch, onnx_file, tmp_path):
    trt, calls = fake_trt(dynamic=True)
    _install(monkeypatch, trt)
    with pytest.raises(NormcError, match="dynamic dimensions"):
        trt_backend.build_engine(onnx_file, tmp_path / "m.engine")
    trt_backend.build_engine(onnx_file, tmp_path / "m.engine", input_shapes={"x": (3, 4)})
    assert calls["profile"] == ("x", (3, 4), (3, 4), (3, 4)) and calls["profiles"] == 1


# ----------------------------------------------------------------------------- the real thing
@pytest.mark.gpu
def test_real_tensorrt_engine(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from normc.backends.onnx_backend import export_onnx

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.ReLU()).eval()
    onnx_path = export_onnx(m, (torch.randn(2, 8),), None, tmp_path / "m.onnx", opset=17)
    engine = trt_backend.build_engine(onnx_path, tmp_path / "m.engine", fp16=False)
    assert engine.stat().st_size > 0
