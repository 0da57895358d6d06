"""std.fuse_norm_act: LN+GELU, RMSNorm+SiLU, GroupNorm+SiLU and BN+ReLU become one `norm_act`
node per pair, numerically equal to the unfused pair in eager, after ONNX export (onnxruntime)
and against the kernel reference `normc.kernels.norm_act.norm_act_reference`."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir import ops
from normc.ir.graph import get_param, op_name
from normc.kernels.norm_act import norm_act_reference
from normc.pipeline import RunOptions, compile_model

FUSE = load_rules(text="""
pipeline {
  apply std.fuse_norm_act
  verify rel 1e-6
}
""")


def loaded(module: nn.Module, x: torch.Tensor, name: str) -> LoadedModel:
    return LoadedModel(module.eval(), (x,), {}, [InputSpec.from_example("x", x)], name, False)


def max_rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref.double() - got.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ toys (one norm+act pair each, plus a bystander)
class LnGelu(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.inp, self.ln, self.out = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 8)

    def forward(self, x):
        return self.out(F.gelu(self.ln(self.inp(x))))


class RmsSilu(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.inp, self.rms, self.out = nn.Linear(d, d), nn.RMSNorm(d, eps=1e-6), nn.Linear(d, 8)

    def forward(self, x):
        return self.out(F.silu(self.rms(self.inp(x))))


class GnSilu(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.gn, self.out = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(4, c), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.out(F.silu(self.gn(self.conv(x))))


class BnRelu(nn.Module):
    """A BN that cannot fold (it reads the input directly), followed by ReLU."""

    def __init__(self, c=6):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm2d)):
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
                if b is not None:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return m.eval()


CASES = {
    # name: (module factory, input shape, norm kind, activation)
    "ln_gelu": (LnGelu, (2, 5, 24), "layer_norm", "gelu"),
    "rms_silu": (RmsSilu, (2, 5, 24), "rms_norm", "silu"),
    "gn_silu": (GnSilu, (2, 3, 6, 6), "group_norm", "silu"),
    "bn_relu": (BnRelu, (2, 6, 5, 5), "batch_norm", "relu"),
}


@pytest.fixture(scope="module")
def fused():
    """name -> (module, x, CompileResult), each toy fused once."""
    out = {}
    for i, (name, (factory, shape, _, _)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        m = _randomize(factory(), seed=i)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i)) * 2 + 0.3
        out[name] = (m, x, compile_model(FUSE, loaded(m, x, name), RunOptions(write=False)))
    return out


def _norm_act_nodes(gm):
    return [n for n in gm.graph.nodes if op_name(n, gm) == "norm_act"]


@pytest.mark.parametrize("name", list(CASES))
def test_one_norm_act_node_per_pair(fused, name):
    _, _, result = fused[name]
    norm_kind, act = CASES[name][2], CASES[name][3]
    assert result.passed, result.report["verify"]
    before, after = result.report["graph"]["before"]["op_counts"], result.report["graph"]["after"]["op_counts"]
    assert before.get(norm_kind) == 1 and before.get(act) == 1
    assert after.get("norm_act") == 1
    assert norm_kind not in after and act not in after
    nodes = _norm_act_nodes(result.graph_module)
    assert len(nodes) == 1
    assert nodes[0].kwargs["norm"] == norm_kind and nodes[0].kwargs["activation"] == act
    applied = {r["name"]: r["applied"] for r in result.report["rules"]}
    assert sum(applied.values()) == 1


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_unfused_eager(fused, name):
    m, x, result = fused[name]
    with torch.no_grad():
        ref, got = m(x), result.graph_module(x)
    assert max_rel(ref, got) <= 1e-6
    assert result.report["verify"]["max_rel_err"] <= 1e-6


@pytest.mark.parametrize("name", ["ln_gelu", "rms_silu"])
def test_norm_act_reference_agrees(fused, name):
    """The kernel spec (fp32 math, one rounding) gives the same values as the fused node."""
    m, x, result = fused[name]
    gm = result.graph_module
    (node,) = _norm_act_nodes(gm)
    params = [get_param(gm, a) if isinstance(a, torch.fx.Node) else a for a in node.args[1:]]
    params += [None] * (4 - len(params))
    w, b = params[0], params[1]
    h = m.inp(x).detach()
    eps = node.kwargs.get("eps")
    assert eps is not None
    ref = norm_act_reference(h, w, b, CASES[name][2], CASES[name][3], eps)
    with torch.no_grad():
        got = ops.norm_act(h, *params, **node.kwargs)
        unfused = F.gelu(m.ln(h)) if name == "ln_gelu" else F.silu(m.rms(h))
    assert max_rel(unfused, ref) <= 1e-6
    assert max_rel(got, ref) <= 1e-6


class AllPairs(nn.Module):
    """The four toys side by side: one ONNX export covers every fused pair."""

    def __init__(self):
        super().__init__()
        self.toys = nn.ModuleList([_randomize(CASES[name][0](), seed=i) for i, name in enumerate(CASES)])

    def forward(self, a, b, c, d):
        return tuple(toy(x) for toy, x in zip(self.toys, (a, b, c, d)))


def test_onnx_export_of_fused_pairs_matches(tmp_path):
    """The fused graph exports to ONNX; onnxruntime agrees with the unfused eager pairs (<= 1e-6 rel)."""
    pytest.importorskip("onnxruntime")
    from normc.backends.onnx_backend import export_onnx, onnx_op_counts, ort_session, run_onnx
    g = torch.Generator().manual_seed(3)
    xs = tuple(torch.randn(CASES[name][1], generator=g) * 2 + 0.3 for name in CASES)
    m = AllPairs().eval()
    specs = [InputSpec.from_example(f"x{i}", x) for i, x in enumerate(xs)]
    result = compile_model(FUSE, LoadedModel(m, xs, {}, specs, "all_pairs", False), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert result.report["graph"]["after"]["op_counts"].get("norm_act") == 4
    path = export_onnx(result.graph_module, xs, {}, tmp_path / "fused.onnx")
    counts = onnx_op_counts(path)
    assert counts, "empty ONNX graph"
    sess = ort_session(path, threads=1)
    xs2 = tuple(torch.randn(x.shape, generator=g) * 1.5 for x in xs)
    for inputs in (xs, xs2):
        got = run_onnx(sess, inputs)
        with torch.no_grad():
            ref = m(*inputs)
        assert len(got) == 4
        for name, r, o in zip(CASES, ref, got):
            assert max_rel(r, torch.from_numpy(o)) <= 1e-6, name


def test_not_fused_when_norm_output_has_two_users():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(16)

        def forward(self, x):
            h = self.ln(x)
            return F.gelu(h) + h

    x = torch.randn(2, 16)
    result = compile_model(FUSE, loaded(TwoUsers(), x, "two_users"), RunOptions(write=False))
    assert result.passed
    assert "norm_act" not in result.report["graph"]["after"]["op_counts"]
    rule = next(r for r in result.report["rules"] if r["name"] == "std.fuse_layer_norm_gelu")
    assert rule["applied"] == 0


def test_rmsnorm_with_default_eps_is_fused():
    class DefaultEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.rms = nn.RMSNorm(16)

        def forward(self, x):
            return F.silu(self.rms(x))

    x = torch.randn(2, 3, 16)
    result = compile_model(FUSE, loaded(DefaultEps(), x, "default_eps"), RunOptions(write=False))
    assert result.passed
    rule = next(r for r in result.report["rules"] if r["name"] == "std.fuse_rms_norm_silu")
    assert rule["applied"] == 1, rule["skipped"]
    assert result.report["graph"]["after"]["op_counts"].get("norm_act") == 1
