"""The ONNX output at an opset normc chose (23, for RMSNormalization) falls back to opset 18 when
onnxruntime cannot run what the exporter fused at 23 (LLaMA's RotaryEmbedding at another sequence length,
onnxscript's opset-23 fusions); an opset the user chose is kept, and its failure reported."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from normc import api
from normc.backends import onnx_backend
from normc.errors import NormcError
from tests.conftest import loaded_model

RULES = 'pipeline {\n  apply std.fold_norm_affine\n  verify rel 1e-5\n  export onnx to "OUT"\n}\n'


class RmsBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm, self.fc = nn.RMSNorm(d), nn.Linear(d, d)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.fixture
def ort_refuses_opset23(monkeypatch):
    real = onnx_backend.check_onnx

    def check(path, *args, **kwargs):
        if _opset(path) == 23:
            raise NormcError("onnxruntime failed: INVALID_ARGUMENT : Non-zero status code returned while "
                             "running RotaryEmbedding node", "inputs must have the shapes and dtypes used at export")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(onnx_backend, "check_onnx", check)


def _run(tmp_path, monkeypatch, opset: str = ""):
    monkeypatch.chdir(tmp_path)
    text = RULES.replace('export onnx to "OUT"', f'export onnx {opset} to "m.onnx"'.replace("  ", " "))
    torch.manual_seed(0)
    return api.apply(api.load_rules(text=text), loaded_model(RmsBlock().eval(), torch.randn(2, 5, 16)))


def test_chosen_opset_falls_back_to_18_with_a_warning(tmp_path, monkeypatch, ort_refuses_opset23):
    result = _run(tmp_path, monkeypatch)
    assert result.passed
    assert _opset(tmp_path / "m.onnx") == 18
    assert any("opset 23 export failed its onnxruntime check" in w and "opset 18" in w
               for w in result.report["warnings"]), result.report["warnings"]
    assert result.report["onnx_check"][0]["passed"]


def test_an_opset_the_user_chose_is_kept(tmp_path, monkeypatch, ort_refuses_opset23):
    with pytest.raises(NormcError, match="RotaryEmbedding"):
        _run(tmp_path, monkeypatch, "opset 23")


def test_no_fallback_when_opset_23_runs(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch)
    assert result.passed and _opset(tmp_path / "m.onnx") == 23
    assert not any("opset 23 export failed" in w for w in result.report["warnings"])
