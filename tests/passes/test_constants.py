"""std.fold_constants (normc/passes/constants.py): work on weights alone, done once.

Weight standardization (BiT), scaled WS (NF-Nets), `w * scale` reparametrizations, `1 + w` gains and
casts of weights are computed from parameters and constants only: folded into parameters, the
convs become plain convs and the ops are gone from the graph, the .pt2 and the ONNX.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.pipeline import RunOptions, compile_model

PIPELINE = """
pipeline {
  apply std.fold_constants
  verify rel 1e-6
  verify dtype f64 rel 1e-12
}
"""
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class WSConv(nn.Conv2d):
    """BiT's WeightStandardizedConv2d: the weight standardized by a training-mode batch_norm at every call."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledWSConv(nn.Conv2d):
    """NF-Net's ScaledStdConv2d: (w - mean) / sqrt(var * fan_in + eps) * gain."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        fan_in = self.weight[0].numel()
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var * fan_in + 1e-5) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Reparam(nn.Module):
    """`w * scale` (weight norm style: g * v / |v|) feeding a linear, and a `1 + w` gain."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(8, 12))
        self.g = nn.Parameter(torch.rand(8, 1) + 0.5)
        self.gain = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(x, w) * (1.0 + self.gain)


class Net(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv1 = conv(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = conv(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.gn(self.conv1(x))))


def _run(model, x, text=PIPELINE):
    loaded = LoadedModel(model.eval(), (x,), {}, [InputSpec.from_example("x", x)], type(model).__name__, False)
    return compile_model(load_rules(text=text), loaded, RunOptions(write=False, verify_inputs=2))


def _rule(result):
    return next(r for r in result.report["rules"] if r["name"] == "std.fold_constants")


@pytest.mark.parametrize("conv", [WSConv, ScaledWSConv], ids=["bit_ws", "nfnet_scaled_ws"])
def test_weight_standardization_folds_into_plain_convs(conv):
    torch.manual_seed(0)
    result = _run(Net(conv), X)
    assert result.passed, result.report["verify"]["failure"]
    before, after = (result.report["graph"][k]["op_counts"] for k in ("before", "after"))
    assert _rule(result)["applied"] == 2
    assert before.get("conv") == 2 and after.get("conv") == 2
    # nothing but the convs, the norm and the activation is left
    assert set(after) == {"conv", "group_norm", "relu"}, after
    fp32, f64 = (s["verify"] for s in result.report["steps"] if s["step"] == "verify")
    assert fp32["max_rel_err"] <= 1e-6 and f64["max_rel_err"] <= 1e-12
    # the convs read plain parameters now: the standardized weights, computed once
    gm = result.graph_module
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "conv"]
    assert all(c.args[1].op == "get_attr" for c in convs)


def test_reparametrized_weight_and_offset_gain_fold():
    torch.manual_seed(0)
    x = torch.randn(4, 12)
    result = _run(Reparam(), x)
    assert result.passed, result.report["verify"]["failure"]
    after = result.report["graph"]["after"]["op_counts"]
    assert after == {"linear": 1, "mul": 1}, after
    notes = " ".join(_rule(result)["notes"])
    assert "folded into 2 parameter(s)" in notes, notes


def test_folded_model_exports_without_the_weight_ops(tmp_path):
    from normc.backends.onnx_backend import check_onnx, export_onnx, onnx_op_counts
    torch.manual_seed(0)
    model = Net(WSConv)
    result = _run(model, X)
    path = export_onnx(result.graph_module, (X,), None, tmp_path / "ws.onnx", opset=18)
    counts = onnx_op_counts(path)
    assert "BatchNormalization" not in counts and "ReduceMean" not in counts and counts.get("Conv") == 2, counts
    check = check_onnx(path, model, [((X,), {})])
    assert check.passed, check.summary()


class Random(nn.Module):
    """Noise made from a parameter's shape is not a constant; neither is an input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.w + torch.zeros_like(self.w).normal_() * 0


class Expanded(nn.Module):
    """A parameter expanded to the input's size: folding it would store the big tensor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 16))

    def forward(self, x):
        return x + self.w.expand(64, 16) * 2


def test_random_values_and_inputs_are_not_constants():
    result = _run(Random(), torch.randn(3, 4), text=PIPELINE.replace("  verify dtype f64 rel 1e-12\n", ""))
    rule = _rule(result)
    assert rule["applied"] == 0


def test_a_constant_bigger_than_its_parameters_is_left_with_the_reason():
    result = _run(Expanded(), torch.randn(64, 16))
    rule = _rule(result)
    assert rule["applied"] == 0 and rule["skipped"], rule
    assert "would grow the model" in rule["skipped"][0]["reason"]
    assert result.passed


def test_nothing_to_fold_says_so():
    result = _run(nn.Sequential(nn.Conv2d(3, 4, 3)), X)
    rule = _rule(result)
    assert rule["applied"] == 0 and any("nothing to fold" in n for n in rule["notes"])
