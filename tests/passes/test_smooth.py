"""std.smooth / smooth_rms / smooth_compensated / shift_scale (SmoothQuant, OS+): fan-out over
every user of a norm (`each u in users(h)`), reductions over the users (`max_u`), partial
fan-out for post-LN norms (`each u in any users(h)`) with a compensating multiply on the skip
path, and the new tensors checked against the formulas computed by hand from the calibration
statistics."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normc.verify.calibrate as calibrate_mod
from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir.graph import get_param, op_name
from normc.pipeline import RunOptions, compile_model, prepare_graph

D = 16


def loaded(module: nn.Module, x: torch.Tensor, name: str = "toy") -> LoadedModel:
    return LoadedModel(module.eval(), (x,), {}, [InputSpec.from_example("x", x)], name, False)


def pipeline(rule: str, samples: int = 8) -> str:
    return f"""
pipeline {{
  calibrate from "random" samples {samples}
  apply {rule}
  verify rel 1e-5
}}"""


def max_rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref.double() - got.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ toys
class PreLN(nn.Module):
    """x + o(q(h) * k(h) + v(h)), h = LN(x): one LayerNorm read by three linears (v has no bias)."""

    def __init__(self, d: int = D, rms: bool = False):
        super().__init__()
        self.ln = nn.RMSNorm(d, eps=1e-6) if rms else nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return x + self.o(self.q(h) * self.k(h) + self.v(h))


class PostLN(nn.Module):
    """BERT-style: h = LN(inp(x)) feeds the FFN *and* the residual add."""

    def __init__(self, d: int = D):
        super().__init__()
        self.inp, self.ln = nn.Linear(d, d), nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln(self.inp(x))
        return self.ln2(h + self.f2(torch.relu(self.f1(h))))


OUTLIER = 3


def _make(cls, seed: int = 0, outlier: bool = True, **kw) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = cls(**kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                if outlier:
                    mod.weight[OUTLIER] = 25.0        # a planted outlier channel
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
    return m.eval()


def _x(shape=(2, 5, D), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def captured_stats(monkeypatch):
    """The Statistics each `calibrate` step collected."""
    calls = []
    real = calibrate_mod.collect

    def spy(gm, inputs):
        calls.append(real(gm, inputs))
        calls[-1].inputs = inputs
        return calls[-1]
    monkeypatch.setattr(calibrate_mod, "collect", spy)
    return calls


def _nodes(gm, name):
    return [n for n in gm.graph.nodes if op_name(n, gm) == name]


def _param(gm, node, i):
    a = node.args[i] if i < len(node.args) else None
    return get_param(gm, a).detach().double() if a is not None else None


def _smooth_scale(h_absmax, weights, alpha):
    """s = clamp(clamp(absmax(h), 1e-5) ** a / clamp(max_u absmax(W_u, dim=0), 1e-5) ** (1 - a), 1e-5)."""
    wmax = torch.stack([w.double().abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    return (h_absmax.clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp_min(1e-5)


# ------------------------------------------------------------------ SmoothQuant on a pre-LN toy
@pytest.fixture(scope="module")
def pre_ln():
    m = _make(PreLN)
    x = _x()
    return m, x, loaded(m, x, "pre_ln")


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smooth_is_one_site_rewriting_three_linears_by_the_formula(pre_ln, captured_stats, alpha):
    m, x, lm = pre_ln
    result = compile_model(load_rules(text=pipeline(f"std.smooth(alpha = {alpha})")), lm, RunOptions(write=False))
    assert result.passed, result.report["verify"]
    (rule,) = result.report["rules"]
    assert rule["name"] == "std.smooth" and rule["applied"] == 1 and len(rule["sites"]) == 1
    assert rule["sites"][0]["site"].startswith("ln ")
    assert rule["skipped"] == []
    gm = result.graph_module
    (ln,) = _nodes(gm, "layer_norm")
    users = list(ln.users)
    assert len(users) == 3 and all(op_name(u, gm) == "linear" for u in users)

    # the scales by hand, from the statistics of the original LayerNorm output
    (stats,) = captured_stats
    orig_gm, _ = prepare_graph(lm)
    (orig_ln,) = _nodes(orig_gm, "layer_norm")
    s = _smooth_scale(stats.get(orig_ln, "absmax"), [m.q.weight, m.k.weight, m.v.weight], alpha)
    assert torch.isfinite(s).all() and (s > 0).all()
    torch.testing.assert_close(_param(gm, ln, 1), m.ln.weight.double() / s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_param(gm, ln, 2), m.ln.bias.double() / s, rtol=1e-5, atol=1e-7)
    new_w = sorted((_param(gm, u, 1) for u in users), key=lambda w: w.sum().item())
    want_w = sorted((lin.weight.double() * s for lin in (m.q, m.k, m.v)), key=lambda w: w.sum().item())
    for got, want in zip(new_w, want_w):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # biases are untouched; v still has none
    biases = [_param(gm, u, 2) for u in users]
    assert sum(b is None for b in biases) == 1


def test_smooth_is_exact_in_fp32(pre_ln):
    m, x, lm = pre_ln
    result = compile_model(load_rules(text=pipeline("std.smooth")), lm, RunOptions(write=False))
    assert result.passed
    assert result.report["verify"]["max_rel_err"] <= 1e-5
    step = next(s for s in result.report["steps"] if s["step"] == "apply std.smooth")
    assert step["verify"]["passed"] and step["verify"]["max_rel_err"] <= 1e-5
    x2 = _x(seed=9) * 3
    with torch.no_grad():
        assert max_rel(m(x2), result.graph_module(x2)) <= 1e-5


def test_smooth_flattens_the_outlier_channel(pre_ln, captured_stats):
    """Per-channel absmax of the norm output: the planted outlier dominates before (max/median
    large), much less after the migration."""
    m, x, lm = pre_ln
    result = compile_model(load_rules(text=pipeline("std.smooth(alpha = 0.5)")), lm, RunOptions(write=False))
    assert result.passed
    (stats,) = captured_stats
    orig_gm, _ = prepare_graph(lm)
    before = stats.get(_nodes(orig_gm, "layer_norm")[0], "absmax")
    after_stats = calibrate_mod.Statistics()
    from normc.ir.graph import run_recording
    for args, kwargs in stats.inputs:
        run_recording(result.graph_module, args, kwargs, after_stats.observe)
    after = after_stats.get(_nodes(result.graph_module, "layer_norm")[0], "absmax")
    ratio = lambda a: (a.max() / a.median()).item()  # noqa: E731
    assert before.argmax().item() == OUTLIER
    assert ratio(before) > 10
    assert ratio(after) < ratio(before) / 3


def test_zero_weight_column_and_zero_channel_give_finite_scales():
    """Column j of every reading linear is all zero, and channel j of the norm output is
    identically zero (gamma_j = beta_j = 0): without the clamps s_j = 0/0. Also a column k that
    is zero in the weights only. The site applies, every new tensor is finite, s > 0, verifies."""
    m = _make(PreLN, seed=3, outlier=False)
    j, k = 5, 9
    with torch.no_grad():
        for lin in (m.q, m.k, m.v):
            lin.weight[:, j] = 0
            lin.weight[:, k] = 0
        m.ln.weight[j] = 0
        m.ln.bias[j] = 0
    x = _x(seed=3)
    result = compile_model(load_rules(text=pipeline("std.smooth")), loaded(m, x), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    (rule,) = result.report["rules"]
    assert rule["applied"] == 1, rule["skipped"]
    gm = result.graph_module
    (ln,) = _nodes(gm, "layer_norm")
    new_g = _param(gm, ln, 1)
    s = m.ln.weight.double() / new_g                # where gamma != 0
    mask = m.ln.weight != 0
    assert torch.isfinite(s[mask]).all() and (s[mask] > 0).all()
    assert new_g[j] == 0 and _param(gm, ln, 2)[j] == 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert torch.isfinite(get_param(gm, node)).all(), node.target
    for u in ln.users:
        assert (_param(gm, u, 1)[:, [j, k]] == 0).all()


def test_smooth_rms_on_rmsnorm_toy():
    m = _make(PreLN, seed=4, rms=True)
    x = _x(seed=4)
    result = compile_model(load_rules(text=pipeline("std.smooth_rms(alpha = 0.6)")), loaded(m, x),
                           RunOptions(write=False))
    assert result.passed, result.report["verify"]
    (rule,) = result.report["rules"]
    assert rule["applied"] == 1
    gm = result.graph_module
    (rms,) = _nodes(gm, "rms_norm")
    assert len(rms.users) == 3
    assert not torch.allclose(_param(gm, rms, 1), m.ln.weight.double())
    assert result.report["verify"]["max_rel_err"] <= 1e-5
    # std.smooth (LayerNorm) does not match an RMSNorm
    other = compile_model(load_rules(text=pipeline("std.smooth")), loaded(m, x), RunOptions(write=False))
    assert other.report["rules"][0]["applied"] == 0


# ------------------------------------------------------------------ post-LN
@pytest.fixture(scope="module")
def post_ln():
    m = _make(PostLN, seed=1)
    x = _x(seed=1)
    return m, x, loaded(m, x, "post_ln")


def test_plain_smooth_refuses_post_ln_naming_the_residual_add(post_ln):
    m, x, lm = post_ln
    result = compile_model(load_rules(text=pipeline("std.smooth")), lm, RunOptions(write=False))
    assert result.passed  # nothing changed
    (rule,) = result.report["rules"]
    assert rule["applied"] == 0
    reasons = {s["site"].split(" (")[0]: s["reason"] for s in rule["skipped"]}
    assert "ln" in reasons
    assert "every user" in reasons["ln"] and "add" in reasons["ln"] and "not linear" in reasons["ln"]
    assert result.report["graph"]["before"]["op_counts"] == result.report["graph"]["after"]["op_counts"]


def test_smooth_compensated_keeps_the_skip_path_exact(post_ln):
    m, x, lm = post_ln
    result = compile_model(load_rules(text=pipeline("std.smooth_compensated")), lm, RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert result.report["verify"]["max_rel_err"] <= 1e-5
    (rule,) = result.report["rules"]
    assert rule["applied"] == 1 and rule["sites"][0]["site"].startswith("ln ")
    before, after = result.report["graph"]["before"]["op_counts"], result.report["graph"]["after"]["op_counts"]
    assert after.get("mul", 0) == before.get("mul", 0) + 1
    gm = result.graph_module
    (mul,) = _nodes(gm, "mul")
    n = mul.args[0] if op_name(mul.args[0], gm) == "layer_norm" else mul.args[1]
    assert op_name(n, gm) == "layer_norm"
    # the linear reads the compensated norm n directly; the residual add reads n * s
    assert {op_name(u, gm) for u in n.users} == {"linear", "mul"}
    assert [op_name(u, gm) for u in mul.users] == ["add"]
    s = get_param(gm, mul.args[1] if mul.args[0] is n else mul.args[0]).double()
    torch.testing.assert_close(_param(gm, n, 1) * s, m.ln.weight.double(), rtol=1e-5, atol=1e-6)
    x2 = _x(seed=11) * 2
    with torch.no_grad():
        assert max_rel(m(x2), gm(x2)) <= 1e-5


def test_shift_scale_compensated_post_ln(post_ln):
    m, x, lm = post_ln
    result = compile_model(load_rules(text=pipeline("std.shift_scale_compensated")), lm, RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert result.report["rules"][0]["applied"] == 1
    assert result.report["verify"]["max_rel_err"] <= 1e-5


# ------------------------------------------------------------------ OS+ (shift and scale)
@pytest.mark.parametrize("bias", [True, False], ids=["with_bias", "no_bias"])
def test_shift_scale_biases_absorb_the_shift(captured_stats, bias):
    """b' = b + W z with z = (max(h) + min(h)) / 2; beta' = (beta - z) / s; a linear without a
    bias gets one (W z)."""
    m = _make(PreLN, seed=2)
    if not bias:
        m.q.bias = None
        m.k.bias = None
    x = _x(seed=2)
    lm = loaded(m, x)
    result = compile_model(load_rules(text=pipeline("std.shift_scale(alpha = 0.5)")), lm, RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert result.report["verify"]["max_rel_err"] <= 1e-5
    (rule,) = result.report["rules"]
    assert rule["applied"] == 1
    (stats,) = captured_stats
    orig_gm, _ = prepare_graph(lm)
    (orig_ln,) = _nodes(orig_gm, "layer_norm")
    hi, lo = stats.get(orig_ln, "max"), stats.get(orig_ln, "min")
    z = (hi + lo) / 2
    assert z.abs().max() > 1e-3  # a shift that matters
    gm = result.graph_module
    (ln,) = _nodes(gm, "layer_norm")
    users = list(ln.users)
    assert len(users) == 3
    for u in users:
        assert len(u.args) >= 3 and u.args[2] is not None, "every linear has a bias after the shift"
    by_w = {}
    for lin in (m.q, m.k, m.v):
        b = lin.bias.double() if lin.bias is not None else torch.zeros(D, dtype=torch.float64)
        by_w[id(lin)] = b + lin.weight.double() @ z
    got = sorted((_param(gm, u, 2) for u in users), key=lambda t: t.sum().item())
    want = sorted(by_w.values(), key=lambda t: t.sum().item())
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)
    new_g, new_beta = _param(gm, ln, 1), _param(gm, ln, 2)
    s = m.ln.weight.double() / new_g
    torch.testing.assert_close(new_beta, (m.ln.bias.double() - z) / s, rtol=1e-5, atol=1e-6)
    x2 = _x(seed=12) * 2
    with torch.no_grad():
        assert max_rel(m(x2), gm(x2)) <= 1e-5


# ------------------------------------------------------------------ a real model
@pytest.mark.slow
def test_smooth_on_zoo_opt_is_exact():
    import normc.api as nc
    program = load_rules(text=pipeline("std.smooth"))
    lm = nc.load(program, "zoo:opt")
    result = compile_model(program, lm, RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert result.report["verify"]["max_rel_err"] <= 1e-5
    (rule,) = result.report["rules"]
    paths = [s["site"].split(" (")[0] for s in rule["sites"]]
    assert "model.decoder.layers.0.self_attn_layer_norm" in paths
    assert "model.decoder.layers.1.final_layer_norm" in paths
    gm = result.graph_module
    fanouts = sorted(len(n.users) for n in _nodes(gm, "layer_norm")
                     if all(op_name(u, gm) == "linear" for u in n.users))
    assert fanouts.count(3) == 2  # the two attention norms: q, k, v in one site each
