"""std.bn (normc/passes/std/bn.nc): BatchNorm folded into the conv / transposed conv / linear before it.

ConvTranspose (1d/2d/3d, grouped): the output channels are dim 1 of the weight [in, out/groups, k...],
group by group; torch's own fuse_conv_bn_eval(transpose=True) gets the grouped ones wrong. A BN whose
conv output is also read for its shape only (timm's BatchNormAct2d asserts `x.ndim == 4`, wrappers read
`x.shape`) still folds; a real second reader is named in the refusal.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir.graph import op_counts
from normc.pipeline import RunOptions, compile_model
from normc.verify.prove import prove_rule

PIPELINE = """
pipeline {
  apply std.bn
  verify rel 1e-5
  verify dtype f64 rel 1e-12
}
"""


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def _run(model, x, text=PIPELINE, export=False):
    model = _randomize(model)
    ep = torch.export.export(model, (x,)) if export else None
    loaded = LoadedModel(model, (x,), {}, [InputSpec.from_example("x", x)], type(model).__name__, False,
                         exported_program=ep)
    text = text if not export else text.replace("  verify dtype f64 rel 1e-12\n", "")  # .pt2: fp32 only
    return compile_model(load_rules(text=text), loaded, RunOptions(write=False, verify_inputs=2))


def _rule(result, name):
    return next(r for r in result.report["rules"] if r["name"] == name)


# ============================================================== ConvTranspose + BN
class Up(nn.Module):
    """ConvTranspose{1,2,3}d (+ bias or not, grouped or not) -> BatchNorm -> ReLU."""

    def __init__(self, rank: int, groups: int = 1, bias: bool = True, cin: int = 4, cout: int = 6):
        super().__init__()
        conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        self.up = conv(cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias)
        self.bn = bn(cout)

    def forward(self, x):
        return F.relu(self.bn(self.up(x)))


# (rank, groups, bias, through torch.export): aten.conv_transpose*/convolution(transposed) and nn modules
CASES = [(1, 1, True, False), (2, 1, False, False), (2, 2, True, False), (3, 2, False, False), (2, 4, True, False),
         (2, 2, True, True), (3, 2, False, True)]


@pytest.mark.parametrize("rank, groups, bias, export", CASES, ids=[
    f"{r}d-g{g}-{'b' if b else 'nob'}-{'export' if e else 'fx'}" for r, g, b, e in CASES])
def test_conv_transpose_bn_folds_exactly(rank, groups, bias, export):
    cin, cout = 4, 8 if groups == 4 else 6
    x = torch.randn(2, cin, *([5] * rank), generator=torch.Generator().manual_seed(1))
    result = _run(Up(rank, groups, bias, cin, cout), x, export=export)
    assert result.passed, result.report["verify"]["failure"]
    before, after = (result.report["graph"][k]["op_counts"] for k in ("before", "after"))
    assert before.get("conv_transpose") == 1 and before.get("batch_norm") == 1, before
    assert after.get("conv_transpose") == 1 and "batch_norm" not in after, after
    assert _rule(result, "std.fold_bn_conv_transpose")["applied"] == 1
    verifies = [s["verify"] for s in result.report["steps"] if s["step"] == "verify"]
    assert verifies[0]["max_rel_err"] <= 1e-5
    if not export:
        assert verifies[1]["max_rel_err"] <= 1e-12, verifies[1]


def test_torch_fuse_conv_bn_eval_transpose_is_wrong_on_grouped_weights():
    """What the rule must do better than torch: its transpose=True fold scales dim 1 as if ungrouped."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    model = _randomize(Up(2, groups=2, cin=4, cout=6))
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.bn(model.up(x))
        try:
            fused = fuse_conv_bn_eval(model.up, model.bn, transpose=True)
            wrong = (fused(x) - ref).abs().max().item() > 1e-3
        except RuntimeError:  # shapes that do not even broadcast
            wrong = True
    assert wrong
    assert _run(Up(2, groups=2, cin=4, cout=6), x).passed


def test_functional_conv_transpose_is_canonical(canonical):
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 2, 2))
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn(F.conv_transpose2d(x, self.w, None, stride=2, groups=2))

    gm = canonical(_randomize(Fn()), torch.randn(1, 4, 3, 3))
    assert op_counts(gm).get("conv_transpose") == 1
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "conv_transpose")
    assert node.kwargs["groups"] == 2 and tuple(node.kwargs["stride"]) == (2, 2)


def test_conv_transpose_fold_is_proven():
    from normc.grammar.loader import load_std
    result = prove_rule(load_std().rules["std.fold_bn_conv_transpose"], instances=12)
    assert result.verdict == "sound" and result.applied >= 12, result.reason
    assert result.max_err_by_dtype["float64"] <= 1e-12


def test_bcast_groups_puts_each_scale_on_its_output_channel():
    """bcast(s, w, 1, groups = g) for a [in, out/g, k] weight: row i of group i // (in/g) gets s[grp*out/g + j]."""
    from normc.ir.builtins import EvalContext, _bcast
    w = torch.zeros(4, 3, 2, dtype=torch.float64)  # in = 4 (2 groups of 2), out/g = 3
    s = torch.arange(6, dtype=torch.float64)
    b = _bcast(EvalContext(None), s, w, 1, groups=2)
    assert b.shape == (4, 3, 1)
    assert b[:, :, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


# ============================================================== a conv output read for its shape only
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: checks the rank of its input, then BN, then the activation."""

    def __init__(self, c, shape_check="ndim"):
        super().__init__(c)
        self.act = nn.SiLU()
        self.shape_check = shape_check

    def forward(self, x):
        if self.shape_check == "ndim":
            torch._assert(x.ndim == 4, "expected a 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class ShapeReader(nn.Module):
    """conv -> BN whose module reads the conv output's shape for a reshape after it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        return F.relu(self.bn(y)).reshape(b, c, h * w)


class EfficientStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = BatchNormAct2d(8)

    def forward(self, x):
        return self.bn2(self.conv_dw(self.bn1(self.conv_stem(x))))


@pytest.mark.parametrize("cls, n", [(EfficientStem, 2), (ShapeReader, 1)], ids=["timm_ndim_assert", "shape_read"])
def test_bn_folds_when_the_other_reader_reads_only_the_shape(cls, n):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    result = _run(cls(), x)
    assert result.passed, result.report["verify"]["failure"]
    rule = _rule(result, "std.fold_bn_conv")
    assert rule["applied"] == n, rule["skipped"]
    after = result.report["graph"]["after"]["op_counts"]
    assert "batch_norm" not in after and after.get("conv") == n, after  # the old conv is not kept for its shape


class TwoReaders(nn.Module):
    """The conv output feeds the BN and a residual add: no fold, and the refusal names the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_refusal_names_the_other_reader():
    result = _run(TwoReaders(), torch.randn(1, 4, 6, 6))
    rule = _rule(result, "std.fold_bn_conv")
    assert rule["applied"] == 0 and len(rule["skipped"]) == 1
    reason = rule["skipped"][0]["reason"]
    assert "conv `conv` output has 2 users" in reason and "batch_norm `bn" in reason and "add `" in reason, reason
