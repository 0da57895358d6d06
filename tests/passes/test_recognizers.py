"""Recognizers (normc/ir/canonicalize.py + std/recognize.nc): every spelling of a norm is one node.

Each form is checked through torch.fx.symbolic_trace and through torch.export (aten) where both
apply; module paths survive recognition, so `apply RULE on "glob"` scopes reach recognized norms.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.api import load_rules
from normc.ir.graph import get_param, module_path, op_counts, op_name
from normc.pipeline import RunOptions, compile_model

D = 16
FORMS = pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))


def _affine(n, seed):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.rand(n, generator=g) + 0.5), nn.Parameter(torch.randn(n, generator=g) * 0.5)


def nodes(gm, name):
    return [n for n in gm.graph.nodes if op_name(n) == name]


def same(gm, module, *args, rel=1e-5):
    with torch.no_grad():
        ref, got = module(*args), gm(*args)
    return (ref - got).abs().max().item() <= rel * ref.abs().max().item()


def operand(gm, node, i):
    a = node.args[i] if len(node.args) > i else None
    return get_param(gm, a) if isinstance(a, torch.fx.Node) else a


# ------------------------------------------------------------------ the forms
class LNModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.norm.weight, self.norm.bias = _affine(D, 1)

    def forward(self, x):
        return self.norm(x)


class LNFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = _affine(D, 2)

    def forward(self, x):
        return F.layer_norm(x, (D,), self.w, self.b, 1e-6)


class RMSModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.norm.weight = _affine(D, 3)[0]

    def forward(self, x):
        return self.norm(x)


class RMSFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = _affine(D, 4)[0]

    def forward(self, x):
        return F.rms_norm(x, (D,), self.w, 1e-6)


class LlamaRMS(nn.Module):
    """x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), then * weight (either side)."""

    def __init__(self, weight_first=False):
        super().__init__()
        self.weight = _affine(D, 5)[0]
        self.weight_first = weight_first
        self.eps = 1e-6

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h if self.weight_first else h * self.weight


class HFLlamaRMS(nn.Module):
    """transformers' LlamaRMSNorm: computed in float32, cast back, then the gain."""

    def __init__(self):
        super().__init__()
        self.weight = _affine(D, 6)[0]
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LNChain(nn.Module):
    """(x - mean) * rsqrt(mean((x - mean)^2) + eps) * w + b."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = _affine(D, 7)
        self.eps = 1e-5

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        c = x - mu
        var = c.pow(2).mean(-1, keepdim=True)
        return c * torch.rsqrt(var + self.eps) * self.weight + self.bias


# torch.export spells F.layer_norm / F.rms_norm like the modules (aten.layer_norm / aten.rms_norm): their
# export forms add nothing but time, so only the module forms and the decomposed chains go through both


@pytest.mark.parametrize("cls, op, eps, operands, export", [
    pytest.param(LNModule, "layer_norm", 1e-6, 2, False, id="nn.LayerNorm-fx"),
    pytest.param(LNModule, "layer_norm", 1e-6, 2, True, id="nn.LayerNorm-export(aten.layer_norm)"),
    pytest.param(LNFunctional, "layer_norm", 1e-6, 2, False, id="F.layer_norm-fx"),
    pytest.param(RMSModule, "rms_norm", 1e-6, 1, False, id="nn.RMSNorm-fx"),
    pytest.param(RMSModule, "rms_norm", 1e-6, 1, True, id="nn.RMSNorm-export(aten.rms_norm)"),
    pytest.param(RMSFunctional, "rms_norm", 1e-6, 1, False, id="F.rms_norm-fx"),
    pytest.param(LlamaRMS, "rms_norm", 1e-6, 1, False, id="llama_rms-fx"),
    pytest.param(LlamaRMS, "rms_norm", 1e-6, 1, True, id="llama_rms-export"),
    pytest.param(lambda: LlamaRMS(weight_first=True), "rms_norm", 1e-6, 1, False, id="llama_rms_weight_first-fx"),
    pytest.param(LNChain, "layer_norm", 1e-5, 2, False, id="ln_chain-fx"),
    pytest.param(LNChain, "layer_norm", 1e-5, 2, True, id="ln_chain-export"),
])
def test_each_form_is_one_norm_node_with_its_affine(canonical, cls, op, eps, operands, export):
    m = cls().eval()
    gm = canonical(m, X, export=export)
    assert op_counts(gm) == {op: 1}, op_counts(gm)
    (n,) = nodes(gm, op)
    assert n.args[0].op == "placeholder"
    assert n.kwargs["eps"] == pytest.approx(eps, rel=1e-6)
    assert list(n.kwargs["normalized_shape"]) == [D]
    params = [p for p in m.parameters()]
    for i in range(1, operands + 1):  # gain (and shift): the model's own tensors became the norm's operands
        assert torch.equal(operand(gm, n, i), params[i - 1])
    assert same(gm, m, X)


def test_export_graph_has_aten_layer_norm_before_canonicalization(make_loaded):
    """The torch.export spelling really is aten.layer_norm (what the canonicalizer translates)."""
    from normc.frontend.trace import trace_model
    traced = trace_model(make_loaded(LNModule(), X, export=True))
    names = {str(n.target) for n in traced.graph_module.graph.nodes if n.op == "call_function"}
    assert any("layer_norm" in s for s in names), names


def test_hf_llama_rms_norm_export_form(canonical):
    """torch.export drops the no-op float32 casts: one rms_norm carrying the gain."""
    m = HFLlamaRMS().eval()
    gm = canonical(m, X, export=True)
    assert op_counts(gm) == {"rms_norm": 1}
    assert torch.equal(operand(gm, nodes(gm, "rms_norm")[0], 1), m.weight)
    assert same(gm, m, X)


class UpcastOnlyRMS(HFLlamaRMS):
    """`.to(torch.float32)` with a literal dtype and no cast back (a no-op cast in an fp32 model)."""

    def forward(self, x):
        h = x.to(torch.float32)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_literal_noop_cast_does_not_hide_the_gain(canonical):
    m = UpcastOnlyRMS().eval()
    gm = canonical(m, X)
    assert op_counts(gm) == {"rms_norm": 1}, op_counts(gm)
    assert same(gm, m, X)


def test_hf_llama_rms_norm_symbolic_trace_carries_the_gain(canonical):
    m = HFLlamaRMS().eval()
    gm = canonical(m, X)
    assert same(gm, m, X)
    assert op_counts(gm) == {"rms_norm": 1}, op_counts(gm)


# ------------------------------------------------------------------ not norms
class GeluNew(nn.Module):
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        x = self.fc(x)
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@FORMS
def test_gelu_new_is_not_a_norm(canonical, export):
    m = GeluNew().eval()
    gm = canonical(m, X, export=export)
    counts = op_counts(gm)
    assert "rms_norm" not in counts and "layer_norm" not in counts, counts
    assert counts.get("tanh") == 1 and counts.get("power") == 1
    assert same(gm, m, X)


@FORMS
def test_rms_like_chains_over_another_dim_or_cubed_are_not_norms(canonical, export):
    class NotANorm(nn.Module):
        def forward(self, x):
            a = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)     # over the sequence dim
            b = x * torch.rsqrt(x.abs().pow(3).mean(-1, keepdim=True) + 1e-6)  # cube, not square
            return a + b
    m = NotANorm()
    gm = canonical(m, X, export=export)
    counts = op_counts(gm)
    assert "rms_norm" not in counts and "layer_norm" not in counts, counts
    assert same(gm, m, X)


# ------------------------------------------------------------------ module paths survive
class Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(LlamaRMS()), Block(LlamaRMS()), Block(LNChain())])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@FORMS
def test_recognized_norms_keep_their_module_path(canonical, export):
    gm = canonical(Net().eval(), X, export=export)
    rms, ln = nodes(gm, "rms_norm"), nodes(gm, "layer_norm")
    assert sorted(module_path(n) for n in rms) == ["blocks.0.norm", "blocks.1.norm"]
    assert [module_path(n) for n in ln] == ["blocks.2.norm"]


@FORMS
def test_scoped_apply_reaches_only_the_recognized_norm_in_scope(make_loaded, export):
    m = Net().eval()
    program = load_rules(text='pipeline {\n  apply std.fold_rms_norm_affine on "blocks.1.*"\n  verify rel 1e-5\n}')
    res = compile_model(program, make_loaded(m, X, export=export), RunOptions(write=False, verify_inputs=1))
    rep = next(r for r in res.report["rules"] if r["name"] == "std.fold_rms_norm_affine")
    assert rep["applied"] == 1 and "blocks.1.norm" in rep["sites"][0]["site"]
    assert res.passed
    by_path = {module_path(n): n for n in nodes(res.graph_module, "rms_norm")}
    gm = res.graph_module
    assert operand(gm, by_path["blocks.1.norm"], 1) is None          # its gain went into blocks.1.fc
    assert operand(gm, by_path["blocks.0.norm"], 1) is not None      # out of scope: untouched


# ------------------------------------------------------------------ norms that upcast, in every dtype
class OlmoLN(nn.Module):
    """OLMo's LayerNorm: no weight, no bias, computed in float32 and cast back."""

    def forward(self, x):
        return F.layer_norm(x.to(torch.float32), (D,), None, None, eps=1e-5).to(x.dtype)


class T5LN(nn.Module):
    """T5's LayerNorm (an RMSNorm): the variance in float32, the input itself not upcast, the gain after."""

    def __init__(self):
        super().__init__()
        self.weight = _affine(D, 8)[0]

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + 1e-6)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class Olmo2RMS(HFLlamaRMS):
    """OLMo-2's RMSNorm: the gain applied in float32, then the cast back."""

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(x.dtype)


class GemmaRMS(nn.Module):
    """Gemma's RMSNorm: float32, times (1 + w), cast back."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, generator=torch.Generator().manual_seed(9)) * 0.2)

    def forward(self, x):
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + self.weight.float())).type_as(x)


UPCAST = [(HFLlamaRMS, "rms_norm"), (OlmoLN, "layer_norm"), (T5LN, "rms_norm"), (Olmo2RMS, "rms_norm")]


@pytest.mark.parametrize("dtype, export", [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False),
                                           (torch.float16, True)], ids=["f32-fx", "f16-fx", "bf16-fx", "f16-export"])
@pytest.mark.parametrize("cls, op", UPCAST, ids=[c.__name__ for c, _ in UPCAST])
def test_a_widening_cast_inside_a_norm_is_seen_through(canonical, cls, op, dtype, export):
    """f16/bf16 norms computed in float32 are what torch's own norms compute: one node, no cast left."""
    m = cls().eval().to(dtype)
    x = X.to(dtype)
    gm = canonical(m, x, export=export)
    assert op_counts(gm) == {op: 1}, op_counts(gm)
    norm = nodes(gm, op)[0]
    if hasattr(m, "weight"):
        assert torch.equal(operand(gm, norm, 1), m.weight)
    assert same(gm, m, x, rel=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("cls, op", [(HFLlamaRMS, "rms_norm"), (OlmoLN, "layer_norm"), (Olmo2RMS, "rms_norm"),
                                     (T5LN, None)], ids=["HFLlamaRMS", "OlmoLN", "Olmo2RMS", "T5LN"])
def test_a_narrowing_cast_inside_a_norm_stays(canonical, cls, op):
    """In a float64 model `.to(float32)` changes the numbers: the norm is recognized over the float32 value and
    the casts stay, so the canonical graph computes exactly what the model does. (T5's variance in float32
    times a float64 input is no norm in any one dtype: its ops stay.)"""
    m = cls().eval().to(torch.float64)
    x = X.to(torch.float64)
    gm = canonical(m, x)
    counts = op_counts(gm)
    assert counts.get("cast", 0) >= 1, counts
    assert (counts.get(op) == 1) if op else ("rms_norm" not in counts and "layer_norm" not in counts), counts
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))


@FORMS
def test_gemma_gain_one_plus_w_becomes_the_norm_weight(canonical, export):
    m = GemmaRMS().eval()
    gm = canonical(m, X, export=export)
    assert op_counts(gm) == {"rms_norm": 1}, op_counts(gm)
    assert torch.equal(operand(gm, nodes(gm, "rms_norm")[0], 1), 1.0 + m.weight.detach())
    assert same(gm, m, X)


# ------------------------------------------------------------------ linears written as matmuls
class MatmulLinear(nn.Module):
    """Falcon's FalconLinear (`x @ W.T + b`) and its spellings: W.t(), transpose(0, 1), W stored [in, out]."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        g = torch.Generator().manual_seed(4)
        self.weight = nn.Parameter(torch.randn(8, D, generator=g) if form != "w_in_out" else torch.randn(D, 8, generator=g))
        self.bias = nn.Parameter(torch.randn(8, generator=g))

    def forward(self, x):
        if self.form == "T":
            h = x @ self.weight.T
        elif self.form == "t":
            h = torch.matmul(x, self.weight.t())
        elif self.form == "transpose":
            h = x @ self.weight.transpose(0, 1)
        else:
            h = x @ self.weight
        return h + self.bias


@FORMS
@pytest.mark.parametrize("form", ["T", "t", "transpose", "w_in_out"])
def test_a_matmul_by_a_weight_is_a_linear_with_its_bias(canonical, form, export):
    m = MatmulLinear(form).eval()
    gm = canonical(m, X, export=export)
    assert op_counts(gm) == {"linear": 1}, op_counts(gm)
    lin = nodes(gm, "linear")[0]
    w = operand(gm, lin, 1)
    assert w.shape == (8, D) and torch.equal(operand(gm, lin, 2), m.bias)
    assert torch.equal(w, m.weight if form != "w_in_out" else m.weight.t())
    assert same(gm, m, X)


def test_a_matmul_of_two_activations_stays_a_matmul(canonical):
    class Scores(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)
    gm = canonical(Scores(), X)
    assert op_counts(gm).get("matmul") == 1 and "linear" not in op_counts(gm)


# ------------------------------------------------------------------ a LayerNorm shape read from its input
class ShapeFromInput(nn.Module):
    """`F.layer_norm(x, x.shape[-1:], g, b, eps)`, a common hand-written form (was an internal error)."""

    def __init__(self):
        super().__init__()
        self.g, self.b = _affine(D, 10)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(F.layer_norm(x, x.shape[-1:], self.g, self.b, 1e-5))


@FORMS
def test_layer_norm_with_its_shape_read_from_the_input(canonical, make_loaded, export):
    m = ShapeFromInput().eval()
    gm = canonical(m, X, export=export)
    ln = nodes(gm, "layer_norm")
    assert len(ln) == 1 and tuple(ln[0].kwargs["normalized_shape"]) == (D,)
    assert same(gm, m, X)
    program = load_rules(text="pipeline {\n  apply std.fold_norm_affine\n  verify rel 1e-5\n}")
    res = compile_model(program, make_loaded(m, X, export=export), RunOptions(write=False, verify_inputs=1))
    assert res.passed and res.report["rules"][0]["applied"] == 1, res.report["rules"][0]
