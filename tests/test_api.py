"""The library API (normc.api.apply/check/load) on the model forms a script holds: an nn.Module with
example inputs (positional, keyword, or a (module, example_inputs) pair), a Hugging Face directory, a
source string; and the errors for what is not a model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from normc import api
from normc.errors import NormcError
from tests.frontend.hf_dirs import FAMILIES, save_dir

REPO = Path(__file__).resolve().parents[1]
BN_FOLD = REPO / "examples" / "bn_fold.nc"


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, scale=None):
        y = self.bn(self.conv(x))
        return y if scale is None else y * scale


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    m = ConvBN()
    with torch.no_grad():  # non-trivial statistics: folding is not a no-op
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
        m.bn.bias.uniform_(-1, 1)
    return m.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def folded(result) -> int:
    return {r["name"]: r["applied"] for r in result.report["rules"]}["std.fold_bn_conv"]


def assert_same_function(result, module, *args, **kwargs):
    with torch.no_grad():
        ref, got = module(*args, **kwargs), result.graph_module(*args, **kwargs)
    assert (ref - got).abs().max() <= 1e-5 * ref.abs().max()


def test_apply_takes_a_module_with_example_inputs(tmp_path):
    m = conv_bn()
    out = tmp_path / "m.pt2"
    result = api.apply(BN_FOLD, m, out, example_inputs=X)
    assert result.passed and folded(result) == 1
    assert out.is_file()
    assert_same_function(result, m, X)
    assert result.report["model"] == "ConvBN"


def test_apply_takes_a_module_example_pair():
    m = conv_bn()
    result = api.apply(BN_FOLD, (m, (X,)))
    assert result.passed and folded(result) == 1


def test_keyword_example_inputs_stay_keywords():
    m = conv_bn()
    scale = torch.full((1, 8, 1, 1), 3.0)
    result = api.check(BN_FOLD, m, example_inputs=((X,), {"scale": scale}))
    assert result.passed and folded(result) == 1
    assert_same_function(result, m, X, scale=scale)
    result = api.check(BN_FOLD, m, example_inputs={"x": X})
    assert result.passed and folded(result) == 1


def test_check_writes_nothing(tmp_path):
    result = api.check(BN_FOLD, conv_bn(), example_inputs=X)
    assert result.passed and result.outputs == []


def test_the_module_is_put_in_eval_mode():
    m = conv_bn().train()
    api.check(BN_FOLD, m, example_inputs=X)
    assert not m.training


def test_declared_inputs_serve_a_module_without_examples():
    program = api.load_rules(text="input x: f32[1, 3, 8, 8]\npipeline {\n  apply std.bn\n  verify rel 1e-5\n}\n")
    result = api.apply(program, conv_bn())
    assert result.passed and folded(result) == 1


def test_a_module_without_any_example_inputs_is_refused():
    with pytest.raises(NormcError, match="no example inputs for the ConvBN") as e:
        api.check(BN_FOLD, conv_bn())
    assert "example_inputs=" in e.value.hint


def test_example_inputs_given_twice_are_refused():
    with pytest.raises(NormcError, match="given twice"):
        api.check(BN_FOLD, (conv_bn(), X), example_inputs=X)


def test_example_inputs_must_be_tensors():
    with pytest.raises(NormcError, match="not a tensor"):
        api.check(BN_FOLD, conv_bn(), example_inputs=(X, "scale"))


def test_something_that_is_not_a_model_is_refused():
    with pytest.raises(NormcError, match="a model cannot be a int"):
        api.check(BN_FOLD, 3)


def test_a_source_string_still_works_with_explicit_example_inputs():
    x = torch.randn(1, 3, 32, 32)
    result = api.check(BN_FOLD, "zoo:cnn", example_inputs=x)
    assert result.passed
    assert result.report["verify"]["n_inputs"] >= 1


def test_a_hugging_face_directory_as_a_path(tmp_path):
    d, original = save_dir(FAMILIES["resnet"], tmp_path / "resnet")
    result = api.check(BN_FOLD, d, image_size=32, verify_inputs=1)
    assert result.passed and folded(result) == 6
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = original(pixel_values=pixels).pooler_output
        got = result.graph_module(pixel_values=pixels)
    got = got["pooler_output"] if isinstance(got, dict) else got.pooler_output
    assert (ref - got).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
