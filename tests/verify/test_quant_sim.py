import copy

import pytest
import torch
import torch.nn as nn

from normc.errors import NormcError
from normc.verify.quant_sim import (
    FakeQuantLinear,
    fake_quant_per_tensor,
    fake_quant_weight_per_channel,
    group_errors,
    linear_input_stats,
    linear_sites,
    per_linear_errors,
    record_linears,
    simulate_w8a8,
    weight_scales_per_channel,
)


class Block(nn.Module):
    """LayerNorm -> (q, k) and a two-layer MLP; an optional outlier channel in the norm output."""

    def __init__(self, d=16, outlier: float | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)
        with torch.no_grad():
            if outlier is not None:
                # channel 3 of the norm output becomes much larger than the rest, and (as in
                # trained transformers) the linears reading it give it small weights
                self.norm.weight[3] = outlier
                self.q.weight[:, 3] /= outlier
                self.k.weight[:, 3] /= outlier

    def forward(self, x):
        h = self.norm(x)
        return self.fc2(torch.relu(self.fc1(self.q(h) + self.k(h)))) + h


def _inputs(n=6, seed=0, shape=(2, 5, 16)):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(*shape, generator=g),), {}) for _ in range(n)]


def _model(outlier=None, seed=0):
    torch.manual_seed(seed)
    return Block(outlier=outlier).eval()


def test_fake_quant_primitives():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 1.0, 5.0])
    y = fake_quant_per_tensor(x, 0.5, qmax=4)
    assert torch.equal(y, torch.tensor([-2.0, -0.5, 0.0, 0.0, 1.0, 2.0]))  # rounded to the grid, clamped at 4 * 0.5
    w = torch.randn(8, 5)
    s = weight_scales_per_channel(w)
    assert s.shape == (8, 1)
    assert torch.allclose(s[:, 0], w.abs().amax(dim=1) / 127)
    wq = fake_quant_weight_per_channel(w)
    assert ((wq - w).abs() <= s / 2 + 1e-7).all()
    assert torch.allclose(wq.abs().amax(dim=1), w.abs().amax(dim=1))  # each row's max is exactly representable
    codes = wq / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert fake_quant_weight_per_channel(torch.zeros(2, 3)).abs().sum() == 0  # no division by zero


def test_simulate_eager_copies_and_calibrates():
    m = _model()
    before = copy.deepcopy(m.state_dict())
    calib = _inputs()
    sim = simulate_w8a8(m, calib)
    for k, v in m.state_dict().items():  # original untouched
        assert torch.equal(v, before[k])
    assert all(isinstance(x, nn.Linear) and not isinstance(x, FakeQuantLinear) for x in (m.q, m.k, m.fc1, m.fc2))
    assert all(isinstance(x, FakeQuantLinear) for x in (sim.q, sim.k, sim.fc1, sim.fc2))
    stats = linear_input_stats(m, calib)
    assert set(stats) == {"q", "k", "fc1", "fc2"}
    assert sim.q.act_scale.item() == pytest.approx(stats["q"].tensor_absmax / 127, rel=1e-6)
    assert torch.equal(sim.fc1.weight, fake_quant_weight_per_channel(m.fc1.weight))
    x = calib[0][0][0]
    with torch.no_grad():
        y, yq = m(x), sim(x)
    rel = float((yq - y).norm() / y.norm())
    assert 0 < rel < 0.05
    # only some linears
    part = simulate_w8a8(m, calib, names=["fc*"])
    assert isinstance(part.fc1, FakeQuantLinear) and not isinstance(part.q, FakeQuantLinear)
    with pytest.raises(NormcError):
        simulate_w8a8(m, calib, names=["nothing.here"])


def test_stats_are_per_channel_min_max():
    m = _model()
    calib = _inputs(3)
    st = linear_input_stats(m, calib, ["fc2"])["fc2"]
    acts = []
    record_linears(m, calib[0][0], {}, ["fc2"], lambda n, x, y: acts.append(x))
    for a, k in calib[1:]:
        record_linears(m, a, k, ["fc2"], lambda n, x, y: acts.append(x))
    flat = torch.cat([a.reshape(-1, 32) for a in acts])
    assert torch.allclose(st.max, flat.amax(0)) and torch.allclose(st.min, flat.amin(0))
    assert torch.allclose(st.absmax, flat.abs().amax(0))
    assert st.n_rows == flat.shape[0]
    with pytest.raises(NormcError):
        linear_input_stats(m, [])


def test_outlier_raises_error_and_smoothing_lowers_it():
    calib, evals = _inputs(8, 0), _inputs(4, 1)
    clean = _model(outlier=None)
    spiky = _model(outlier=60.0)
    err_clean = per_linear_errors(None, simulate_w8a8(clean, calib), evals, ["q", "k"], mode="local")
    err_spiky = per_linear_errors(None, simulate_w8a8(spiky, calib), evals, ["q", "k"], mode="local")
    assert err_spiky["q"] > 3 * err_clean["q"]
    stats = linear_input_stats(spiky, calib, ["q"])
    assert stats["q"].outlier_ratio(3) > 10

    # SmoothQuant by hand (alpha 0.5): divide the norm, multiply q/k input columns; the residual
    # reads the norm output too, so compare only the linears' local errors
    smooth = copy.deepcopy(spiky)
    with torch.no_grad():
        w_max = torch.stack([smooth.q.weight.abs().amax(0), smooth.k.weight.abs().amax(0)]).amax(0)
        s = (stats["q"].absmax.sqrt() / w_max.sqrt()).clamp(min=1e-5)
        smooth.norm.weight /= s
        smooth.norm.bias /= s
        smooth.q.weight *= s
        smooth.k.weight *= s
    with torch.no_grad():
        x = evals[0][0][0]
        h0, h1 = spiky.norm(x), smooth.norm(x)
        assert torch.allclose(spiky.q(h0), smooth.q(h1), atol=1e-4)  # exact before quantization
    err_smooth = per_linear_errors(None, simulate_w8a8(smooth, calib), evals, ["q", "k"], mode="local")
    assert err_smooth["q"] < 0.6 * err_spiky["q"] and err_smooth["k"] < 0.6 * err_spiky["k"]


def test_local_vs_propagated():
    m = _model(outlier=20.0)
    calib, evals = _inputs(6, 0), _inputs(3, 2)
    sim = simulate_w8a8(m, calib)
    local = per_linear_errors(None, sim, evals, mode="local")
    prop = per_linear_errors(m, sim, evals, mode="propagated")
    assert set(local) == set(prop) == {"q", "k", "fc1", "fc2"}
    # q and k read the (unquantized) norm output: nothing upstream, so both agree
    assert local["q"] == pytest.approx(prop["q"], rel=1e-6)
    assert prop["fc2"] > local["fc2"]  # fc2 also sees the error of q, k, fc1
    assert all(0 < v < 0.2 for v in local.values())
    # local mode leaves the simulated model as it was
    assert all(mod.local is None for mod in sim.modules() if isinstance(mod, FakeQuantLinear))
    with pytest.raises(ValueError):
        per_linear_errors(m, sim, evals, mode="other")
    with pytest.raises(NormcError):
        per_linear_errors(None, sim, evals)  # propagated needs the reference
    with pytest.raises(NormcError):
        per_linear_errors(m, m, evals)  # not simulated
    assert group_errors(local, {"attn": "[qk]", "mlp": "fc*"}) == {
        "attn": [local["q"], local["k"]], "mlp": [local["fc1"], local["fc2"]]}


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_graph_module_path_matches_eager(canonical, export):
    m = _model(outlier=30.0)
    calib, evals = _inputs(5, 0), _inputs(2, 3)
    gm = canonical(m, calib[0][0][0], export=export)
    assert [s.name for s in linear_sites(gm)] == ["q", "k", "fc1", "fc2"]
    gstats = linear_input_stats(gm, calib)
    estats = linear_input_stats(m, calib)
    for name in estats:
        assert torch.allclose(gstats[name].absmax, estats[name].absmax, atol=1e-6)
    gsim = simulate_w8a8(gm, calib)
    esim = simulate_w8a8(m, calib)
    x = evals[0][0][0]
    with torch.no_grad():
        assert torch.allclose(gsim(x), esim(x), atol=1e-5)
    # names survive the rewrite, and errors agree between the two paths
    assert [s.name for s in linear_sites(gsim)] == ["q", "k", "fc1", "fc2"]
    g_local = per_linear_errors(None, gsim, evals, mode="local")
    e_local = per_linear_errors(None, esim, evals, mode="local")
    g_prop = per_linear_errors(gm, gsim, evals)  # graph reference recorded through run_recording
    e_prop = per_linear_errors(m, esim, evals)
    for name in e_local:
        assert g_local[name] == pytest.approx(e_local[name], rel=1e-4)
        assert g_prop[name] == pytest.approx(e_prop[name], rel=1e-4)
    # the reference graph and the original module are untouched
    assert not any(isinstance(mod, FakeQuantLinear) for mod in gm.modules())


def test_symbolic_traced_call_module_linears():
    m = _model()
    gm = torch.fx.symbolic_trace(m)
    calib = _inputs(3)
    sim = simulate_w8a8(gm, calib)
    x = calib[0][0][0]
    with torch.no_grad():
        assert torch.allclose(sim(x), simulate_w8a8(m, calib)(x), atol=1e-5)
    assert {s.name for s in linear_sites(sim)} == {"q", "k", "fc1", "fc2"}


def test_shared_linear_is_quantized_at_every_path():
    m = _model()
    m.q2 = m.q  # the same module under two names
    sim = simulate_w8a8(m, _inputs(2))
    assert isinstance(sim.q, FakeQuantLinear) and sim.q2 is sim.q


def test_graph_names_survive_a_rewrite_that_loses_the_linear_path(canonical):
    """A rewritten linear node that carries the matched norm's metadata and a new weight is
    still named after the linear (by the parameters it reads)."""
    from normc.ir.graph import new_param

    m = _model()
    x = _inputs(1)[0][0][0]
    gm = canonical(m, x)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and linear_sites(gm)[1].node is n)
    node.meta["normc_path"] = "norm"
    node.meta["normc_module_type"] = "torch.nn.modules.normalization.LayerNorm"
    target = new_param(gm, "k_weight_scaled", m.k.weight.detach() * 1.0)
    with gm.graph.inserting_before(node):
        w = gm.graph.get_attr(target)
    node.args = (node.args[0], w) + tuple(node.args[2:])
    gm.recompile()
    assert [s.name for s in linear_sites(gm)] == ["q", "k", "fc1", "fc2"]
