"""Canonicalization: every spelling of an op becomes one canonical node; decomposed norms are recognized."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.ir import ops
from normc.ir.graph import get_param, op_counts, op_name

FORMS = [False, True]  # symbolic_trace, torch.export (aten)
FORM_IDS = ["fx", "export"]


def nodes_of(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == name]


def param_names(gm, node):
    return [a.target if isinstance(a, torch.fx.Node) else a for a in node.args[1:]]


def same_outputs(gm, module, *args):
    with torch.no_grad():
        got, ref = gm(*args), module(*args)
    return (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


_CACHE: dict = {}


def cached(canonical, cls, x, export):
    """(module, canonical graph) of cls() on x, built once per test module (tests only read them)."""
    key = (cls, export)
    if key not in _CACHE:
        m = cls().eval()
        _CACHE[key] = (m, canonical(m, x, export=export))
    return _CACHE[key]


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


# ------------------------------------------------------------------ batch norm
class BNModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = _randomize_bn(nn.BatchNorm2d(4, eps=1e-3))

    def forward(self, x):
        return self.bn(x)


class BNFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        bn = _randomize_bn(nn.BatchNorm2d(4))
        self.register_buffer("mean", bn.running_mean.clone())
        self.register_buffer("var", bn.running_var.clone())
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.1, 1e-3)


X4 = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("cls", [BNModule, BNFunctional])
def test_batch_norm_forms_become_one_batch_norm(canonical, cls, export):
    m = cls().eval()
    gm = canonical(m, X4, export=export)
    assert op_counts(gm) == {"batch_norm": 1}
    (bn,) = nodes_of(gm, "batch_norm")
    assert bn.target is ops.batch_norm
    x, mean, var, weight, bias = bn.args
    assert x.op == "placeholder"
    assert all(p.op == "get_attr" for p in (mean, var, weight, bias))
    # operands are in canonical order: statistics first, then the affine
    assert torch.equal(get_param(gm, var), (m.bn.running_var if cls is BNModule else m.var))
    assert torch.equal(get_param(gm, weight), (m.bn.weight if cls is BNModule else m.weight))
    assert bn.kwargs["eps"] == pytest.approx(1e-3) and bn.kwargs["training"] is False
    assert same_outputs(gm, m, X4)


def test_batch_norm_without_running_stats_is_training(canonical):
    m = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)).eval()
    (bn,) = nodes_of(canonical(m, X4), "batch_norm")
    assert bn.kwargs["training"] is True and bn.args[1] is None


# ------------------------------------------------------------------ conv / linear
class ConvLinearModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3, padding=1)
        self.l = nn.Linear(6, 3)

    def forward(self, x):
        return self.l(self.c(x).mean((2, 3)))


class ConvLinearFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        ref = ConvLinearModules()
        self.cw, self.cb = nn.Parameter(ref.c.weight.detach()), nn.Parameter(ref.c.bias.detach())
        self.lw, self.lb = nn.Parameter(ref.l.weight.detach()), nn.Parameter(ref.l.bias.detach())

    def forward(self, x):
        return F.linear(F.conv2d(x, self.cw, self.cb, padding=1).mean((2, 3)), self.lw, self.lb)


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("cls", [ConvLinearModules, ConvLinearFunctional])
def test_conv_and_linear_forms(canonical, cls, export):
    m = cls().eval()
    gm = canonical(m, X4, export=export)
    assert op_counts(gm) == {"conv": 1, "linear": 1, "reduce_mean": 1}
    (conv,) = nodes_of(gm, "conv")
    (lin,) = nodes_of(gm, "linear")
    assert conv.target is ops.conv and lin.target is ops.linear
    assert conv.args[1].op == "get_attr" and conv.args[2].op == "get_attr"
    assert get_param(gm, conv.args[1]).shape == (6, 4, 3, 3)
    assert get_param(gm, lin.args[1]).shape == (3, 6)
    assert conv.kwargs["groups"] == 1
    assert same_outputs(gm, m, X4)


def test_conv_without_bias_has_absent_operand(canonical):
    m = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.Linear(5, 2, bias=False))
    gm = canonical(m, X4)
    (conv,) = nodes_of(gm, "conv")
    (lin,) = nodes_of(gm, "linear")
    assert len(conv.args) < 3 or conv.args[2] is None
    assert len(lin.args) < 3 or lin.args[2] is None


def test_conv_attributes_are_the_same_in_every_form(canonical):
    class Func(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w)

    module_form = nodes_of(canonical(nn.Sequential(nn.Conv2d(4, 4, 3, bias=False)), X4), "conv")[0]
    func_form = nodes_of(canonical(Func(), X4), "conv")[0]
    assert dict(module_form.kwargs) == dict(func_form.kwargs)


# ------------------------------------------------------------------ decomposed norms
class RMSNormChain(nn.Module):
    """The LLaMA-style RMSNorm that torch.export leaves decomposed."""

    def __init__(self, d=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d, generator=torch.Generator().manual_seed(2)) + 0.5)
        self.eps = eps

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.eps))


class LayerNormChain(nn.Module):
    """A hand-written LayerNorm: (x - mean) * rsqrt(var + eps) * weight + bias."""

    def __init__(self, d=8, eps=1e-5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.rand(d, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.randn(d, generator=g))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        c = x - mu
        v = (c ** 2).mean(-1, keepdim=True)
        return c * torch.rsqrt(v + self.eps) * self.weight + self.bias


X3 = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
def test_decomposed_rms_norm_becomes_rms_norm(canonical, export):
    m = RMSNormChain().eval()
    gm = canonical(m, X3, export=export)
    assert op_counts(gm) == {"rms_norm": 1}
    (n,) = nodes_of(gm, "rms_norm")
    assert n.args[0].op == "placeholder"
    assert torch.equal(get_param(gm, n.args[1]), m.weight)  # the gain became the norm's weight
    assert n.kwargs["eps"] == pytest.approx(1e-6)
    assert list(n.kwargs["normalized_shape"]) == [8]
    assert same_outputs(gm, m, X3)


def test_rms_norm_module_and_functional_forms(canonical):
    m = nn.RMSNorm(8, eps=1e-6).eval()
    gm = canonical(m, X3)
    assert op_counts(gm) == {"rms_norm": 1}

    class Func(nn.Module):
        def forward(self, x):
            return F.rms_norm(x, (8,), None, 1e-6)
    assert op_counts(canonical(Func(), X3)) == {"rms_norm": 1}


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
def test_layer_norm_forms_become_layer_norm(canonical, export):
    ln = nn.LayerNorm(8)
    assert op_counts(canonical(ln, X3, export=export)) == {"layer_norm": 1}

    class Func(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return F.layer_norm(x, (8,), self.w, None, 1e-5)
    gm = canonical(Func(), X3, export=export)
    assert op_counts(gm) == {"layer_norm": 1}


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
def test_decomposed_layer_norm_becomes_layer_norm(canonical, export):
    m, gm = cached(canonical, LayerNormChain, X3, export)
    assert same_outputs(gm, m, X3)
    assert op_counts(gm) == {"layer_norm": 1}


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
def test_decomposed_layer_norm_stays_numerically_exact(canonical, export):
    m, gm = cached(canonical, LayerNormChain, X3, export)
    assert same_outputs(gm, m, X3)
    assert "power" not in op_counts(gm) and "inv_sqrt" not in op_counts(gm)


def test_rms_norm_chain_over_other_dim_is_not_a_norm(canonical):
    class NotLastDim(nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
    counts = op_counts(canonical(NotLastDim(), X3))
    assert "rms_norm" not in counts and counts.get("inv_sqrt") == 1


class GPT2Gelu(nn.Module):
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); pow 3 is no norm."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = self.fc(x)
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("export", FORMS, ids=FORM_IDS)
def test_gpt2_pow3_is_not_mistaken_for_a_norm(canonical, export):
    m = GPT2Gelu().eval()
    gm = canonical(m, X3, export=export)
    counts = op_counts(gm)
    assert "rms_norm" not in counts and "layer_norm" not in counts
    assert counts["power"] == 1 and counts["tanh"] == 1 and counts["linear"] == 1
    (p,) = nodes_of(gm, "power")
    assert p.kwargs["exponent"] == 3.0
    assert same_outputs(gm, m, X3)


# ------------------------------------------------------------------ small ops and bookkeeping
def test_activations_binary_ops_and_identity_removal(canonical):
    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.GELU(approximate="tanh")
            self.drop = nn.Dropout(0.5)
            self.id = nn.Identity()

        def forward(self, x):
            y = self.drop(self.id(self.act(x)))
            return torch.sigmoid(F.silu(y) - y) * torch.tanh(y) / (F.relu(y) + 1) + torch.softmax(y, -1)
    m = Many().eval()
    gm = canonical(m, X3)
    counts = op_counts(gm)
    assert counts == {"gelu": 1, "silu": 1, "sub": 1, "sigmoid": 1, "tanh": 1, "mul": 1, "relu": 1, "add": 2,
                      "div": 1, "softmax": 1}
    assert nodes_of(gm, "gelu")[0].kwargs["approximate"] == "tanh"
    assert same_outputs(gm, m, X3)


def test_module_paths_and_shapes_are_recorded(canonical):
    m = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    gm = canonical(m, X4)
    from normc.ir.graph import module_path, module_type
    (bn,) = nodes_of(gm, "batch_norm")
    (conv,) = nodes_of(gm, "conv")
    assert (module_path(bn), module_type(bn)) == ("0.1", "BatchNorm2d")
    assert (module_path(conv), module_type(conv)) == ("0.0", "Conv2d")
    assert bn.meta["normc_shape"] == (2, 4, 5, 5) and bn.meta["normc_dtype"] == torch.float32


def test_canonicalizing_never_touches_the_users_module(canonical, rules):
    # the graph shares the module's weight tensors (no copy of the weights): normc never writes into a
    # tensor, and the graph's module tree is its own, so rewriting and dropping parameters leave the
    # user's module as it was
    from normc.ir.rewrite import apply_rule
    m = nn.Sequential(nn.Linear(8, 8), RMSNormChain(), nn.Linear(8, 8)).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    names = [n for n, _ in m.named_modules()]
    gm = canonical(m, X3)
    assert apply_rule(gm, rules("").rules["std.fold_rms_norm_affine"]).applied == 1
    assert [n for n, _ in m.named_modules()] == names and m.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
