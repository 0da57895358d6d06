"""normc.nn: UnifiedNorm and PowerNorm -- eval semantics, training statistics, the canonical
form (`fixed_norm`) they trace to, state-dict round trips and staleness of the folded buffers."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from normc.ir import ops
from normc.nn import PowerNorm, UnifiedNorm, group_scaling


def _randomized(norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stat = norm._stat()
        stat.copy_(torch.rand(stat.shape, generator=g) * 1.5 + 0.5)
        if norm.weight is not None:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.1)
    return norm.eval()


def _fixed_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.fixed_norm]


# ------------------------------------------------------------------ UnifiedNorm
@pytest.mark.parametrize("affine", [True, False])
def test_un_eval_matches_formula(affine):
    un = _randomized(UnifiedNorm(16, eps=1e-3, affine=affine))
    x = torch.randn(2, 5, 16)
    y = un(x)
    expect = x / torch.sqrt(un.running_var + 1e-3)
    if affine:
        expect = un.weight * expect + un.bias
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)
    # eval computes exactly the canonical op on the derived buffers
    assert torch.equal(y, ops.fixed_norm(x, un.scale, un.shift, dim=-1))
    assert (un.shift is None) == (not affine)


def test_un_no_mean_subtraction():
    un = UnifiedNorm(4).eval()  # running_var = 1, gamma = 1, beta = 0
    x = torch.full((3, 4), 5.0)
    torch.testing.assert_close(un(x), x / (1 + 1e-5) ** 0.5)


def test_un_training_uses_and_tracks_uncentred_second_moment():
    un = UnifiedNorm(8, momentum=0.25).train()
    x = torch.randn(4, 6, 8) * 3 + 1
    m2 = x.pow(2).mean(dim=(0, 1))
    y = un(x)
    torch.testing.assert_close(y, x / torch.sqrt(m2 + un.eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(un.running_var, 0.75 * torch.ones(8) + 0.25 * m2)
    assert int(un.num_batches_tracked) == 1
    y.sum().backward()  # differentiable
    assert un.weight.grad is not None and un.weight.grad.shape == (8,)


def test_un_cumulative_average_without_momentum():
    un = UnifiedNorm(3, momentum=None).train()
    xs = [torch.randn(5, 3) for _ in range(3)]
    for x in xs:
        un(x)
    expect = torch.stack([x.pow(2).mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(un.running_var, expect)


def test_un_eval_refreshes_after_training_and_inplace_edits():
    un = UnifiedNorm(8).train()
    un(torch.randn(10, 8) * 2)
    un.eval()
    x = torch.randn(3, 8)
    torch.testing.assert_close(un(x), x / torch.sqrt(un.running_var + un.eps))
    with torch.no_grad():  # edited while in eval: the folded buffers follow
        un.weight.mul_(3.0)
        un.running_var.add_(1.0)
    torch.testing.assert_close(un(x), un.weight * x / torch.sqrt(un.running_var + un.eps))
    un.weight = nn.Parameter(torch.full((8,), 2.0))  # replaced, not edited
    torch.testing.assert_close(un(x), 2.0 * x / torch.sqrt(un.running_var + un.eps))


def test_un_state_dict_roundtrip_and_derived_buffers_not_saved():
    a = _randomized(UnifiedNorm(6), seed=1)
    sd = a.state_dict()
    assert "scale" not in sd and "shift" not in sd
    assert {"weight", "bias", "running_var", "num_batches_tracked"} <= set(sd)
    b = UnifiedNorm(6).eval()
    b.load_state_dict(sd)
    x = torch.randn(2, 6)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.scale, b.scale)
    # inside a parent module too, and through torch.save
    parent = nn.Sequential(nn.Linear(6, 6), UnifiedNorm(6)).eval()
    parent.load_state_dict({"0.weight": torch.eye(6), "0.bias": torch.zeros(6),
                            **{f"1.{k}": v for k, v in sd.items()}})
    assert torch.equal(parent[1].scale, a.scale)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    assert torch.equal(c(x), a(x))


def test_un_deepcopy_and_dtype():
    a = _randomized(UnifiedNorm(8), seed=2)
    b = copy.deepcopy(a)
    x = torch.randn(4, 8)
    assert torch.equal(a(x), b(x))
    h = copy.deepcopy(a).half()
    assert h.scale.dtype == torch.float16
    torch.testing.assert_close(h(x.half()).float(), a(x), rtol=2e-3, atol=2e-3)


def test_un_canonical_descriptor():
    un = _randomized(UnifiedNorm(8))
    assert un.__normc_canonical__() == ("fixed_norm", ["scale", "shift"], {"dim": -1})
    assert UnifiedNorm(8, affine=False).eval().__normc_canonical__() == ("fixed_norm", ["scale", None], {"dim": -1})
    assert un.train().__normc_canonical__() is None


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = norm
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_un_traces_to_one_canonical_fixed_norm(canonical):
    net = _Net(_randomized(UnifiedNorm(8))).eval()
    x = torch.randn(2, 3, 8)
    gm = canonical(net, x)
    nodes = _fixed_nodes(gm)
    assert len(nodes) == 1
    node = nodes[0]
    assert [a.op for a in node.args[1:]] == ["get_attr", "get_attr"]
    assert node.kwargs == {"dim": -1}
    assert torch.equal(gm(x), net(x))  # bit for bit
    assert not any(n.op == "call_module" for n in gm.graph.nodes)


def test_un_symbolic_trace_picks_up_stale_buffers():
    net = _Net(_randomized(UnifiedNorm(8))).eval()
    with torch.no_grad():
        net.norm.weight.mul_(2)
    gm = fx.symbolic_trace(net)
    x = torch.randn(2, 8)
    assert torch.equal(gm(x), net(x))


def test_un_leaf_module_canonicalizes_through_descriptor():
    """A tracer that keeps the module as a leaf reaches __normc_canonical__."""
    from normc.ir.canonicalize import canonicalize

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m, name):
            return hasattr(m, "__normc_canonical__") or super().is_leaf_module(m, name)

    net = _Net(_randomized(UnifiedNorm(8))).eval()
    gm = fx.GraphModule(net, Leaf().trace(net))
    assert any(n.op == "call_module" and n.target == "norm" for n in gm.graph.nodes)
    canonicalize(gm, recognize=False)
    nodes = _fixed_nodes(gm)
    assert len(nodes) == 1 and [a.target for a in nodes[0].args[1:]] == ["norm.scale", "norm.shift"]
    x = torch.randn(5, 8)
    assert torch.equal(gm(x), net(x))


def test_un_exports():
    net = _Net(_randomized(UnifiedNorm(8))).eval()
    x = torch.randn(2, 8)
    ep = torch.export.export(net, (x,))
    assert torch.equal(ep.module()(x), net(x))


# ------------------------------------------------------------------ PowerNorm
def test_pn_eval_matches_formula_and_is_fixed_norm(canonical):
    pn = _randomized(PowerNorm(8, eps=1e-4))
    x = torch.randn(3, 8)
    torch.testing.assert_close(pn(x), pn.weight * x / torch.sqrt(pn.running_phi + 1e-4) + pn.bias)
    assert pn.__normc_canonical__() == ("fixed_norm", ["scale", "shift"], {"dim": -1})
    net = _Net(pn).eval()
    gm = canonical(net, torch.randn(2, 8))
    assert len(_fixed_nodes(gm)) == 1
    assert torch.equal(gm(x), net(x))


def test_pn_group_scaling_is_not_a_fixed_norm(canonical):
    pn = _randomized(PowerNorm(8, group_num=2))
    assert pn.__normc_canonical__() is None
    x = torch.randn(2, 3, 8)
    xs = x.reshape(2, 3, 2, 4)
    gs = (xs / torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(2, 3, 8)
    torch.testing.assert_close(group_scaling(x, 2), gs)
    torch.testing.assert_close(pn(x), pn.weight * gs / torch.sqrt(pn.running_phi + pn.eps) + pn.bias)
    # traced through: the data-dependent scaling stays as ops, only the frozen affine is a fixed_norm
    net = _Net(pn).eval()
    gm = canonical(net, x)
    assert len(_fixed_nodes(gm)) == 1
    assert torch.equal(gm(x), net(x))
    with pytest.raises(ValueError):
        PowerNorm(6, group_num=4)


def test_pn_training_warmup_then_ema():
    pn = PowerNorm(4, alpha_fwd=0.5, warmup_iters=2).train()
    xs = [torch.randn(6, 4) * (i + 1) for i in range(3)]
    v = [x.pow(2).mean(0) for x in xs]
    y0 = pn(xs[0])
    torch.testing.assert_close(y0, xs[0] / torch.sqrt(v[0] + pn.eps))     # warm-up: batch statistic
    pn(xs[1])
    torch.testing.assert_close(pn.running_phi, (v[0] + v[1]) / 2)         # cumulative average
    phi = pn.running_phi.clone()
    y2 = pn(xs[2])
    torch.testing.assert_close(y2, xs[2] / torch.sqrt(phi + pn.eps))       # after: running statistic
    torch.testing.assert_close(pn.running_phi, 0.5 * phi + 0.5 * v[2])
    pad = torch.zeros(6, dtype=torch.bool)
    pad[3:] = True
    pn2 = PowerNorm(4, warmup_iters=10).train()
    pn2(xs[0], pad)
    torch.testing.assert_close(pn2.running_phi, xs[0][:3].pow(2).mean(0))


def test_pn_loads_reference_checkpoint_layout():
    sd = {"weight": torch.rand(4) + 0.5, "bias": torch.randn(4), "running_phi": torch.rand(1, 4, 1, 1) + 0.5,
          "ema_gz": torch.zeros(1, 4, 1, 1), "iters": torch.tensor([7])}
    pn = PowerNorm(4).eval()
    pn.load_state_dict(sd)
    x = torch.randn(2, 4)
    torch.testing.assert_close(pn(x), sd["weight"] * x / torch.sqrt(sd["running_phi"].reshape(4) + pn.eps) + sd["bias"])
