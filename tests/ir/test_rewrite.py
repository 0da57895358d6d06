"""apply_rule: hand-written rules rewrite canonical graphs exactly, record every site, and refuse with reasons."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.ir.graph import op_counts
from normc.ir.rewrite import FixpointError, apply_rule

FOLD = """
rule fold(eps_min: float = 0) {
  doc "BN folded into the conv before it"
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean, var, gamma, beta, eps = eps)
  where   single_use(c) and not shared(w) and eps > eps_min
  let     s = gamma / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + beta)
}

rule act_let {
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean, var, gamma, beta)
  let     s = x * 2
  rewrite y = conv(x, w * s, b)
}

rule blow_up {
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean, var, gamma, beta)
  let     s = gamma / (var - var)
  rewrite y = conv(x, w * bcast(s, w, 0), b)
}

rule loop {
  match   y = relu(x)
  rewrite y = relu(x)
}

rule fold_scales {
  match   y = mul(mul(x, a), c)
  where   is_param(a) and is_param(c)
  rewrite y = mul(x, a * c)
}

rule fold_affine {
  match   h = layer_norm(x, g, beta)
          each u in users(h): o = linear(h, w, b?)
  rewrite h = layer_norm(x)
          each u: o = linear(h, w * g, (b ?? 0) + sum(w * beta, dim = 1))
}
"""


def _bn(c, g):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


class Blocks(nn.Module):
    """stem (conv+bias, bn); blocks.0/1 (conv no bias, bn); fan (one conv, two bns); shared (one conv, called twice)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(4, g))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), _bn(4, g))
                                     for _ in range(2)])
        self.fan = nn.Conv2d(4, 4, 1)
        self.fan_a, self.fan_b = _bn(4, g), _bn(4, g)
        self.shared = nn.Conv2d(4, 4, 1)
        self.sh_a, self.sh_b = _bn(4, g), _bn(4, g)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(b(x))
        f = self.fan(x)
        x = self.fan_a(f) + self.fan_b(f)
        return self.sh_a(self.shared(x)) + self.sh_b(self.shared(x))


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def prog(rules):
    return rules(FOLD)


@pytest.fixture(scope="module")
def model():
    return Blocks().eval()


@pytest.fixture(scope="module")
def base_gm(canonical, model):
    return canonical(model, X)


@pytest.fixture
def gm(base_gm):
    return copy.deepcopy(base_gm)  # each test rewrites its own copy


def close(gm, model, x=X, tol=1e-5):
    with torch.no_grad():
        ref, got = model(x), gm(x)
    return (ref - got).abs().max().item() <= tol * ref.abs().max().item()


def bn_sites(records):
    return {r.path: r.reason for r in records}


def test_fold_is_exact_and_records_every_site(gm, model, prog):
    report = apply_rule(gm, prog.rules["fold"])
    assert report.name == "fold" and report.kind == "exact"
    assert report.applied == 3
    assert sorted(r.path for r in report.sites) == ["blocks.0.1", "blocks.1.1", "stem.1"]
    assert all(r.new_nodes for r in report.sites)
    skipped = bn_sites(report.skipped)
    assert set(skipped) == {"fan_a", "fan_b", "sh_a", "sh_b"}
    assert skipped["fan_a"] == skipped["fan_b"]
    assert skipped["fan_a"].startswith("conv `fan` output has 2 users: batch_norm `fan_a (")  # names the readers
    assert "shared" in skipped["sh_a"] and "shared.weight" in skipped["sh_b"]
    assert op_counts(gm)["batch_norm"] == 4 and op_counts(gm)["conv"] == 6
    assert close(gm, model)
    # a fresh input too
    assert close(gm, model, torch.randn(1, 3, 9, 7, generator=torch.Generator().manual_seed(5)))
    d = report.to_dict()
    assert d["applied"] == 3 and len(d["skipped"]) == 4 and all(s["reason"] for s in d["skipped"])


def test_dead_nodes_and_unused_parameters_are_removed(gm, prog):
    apply_rule(gm, prog.rules["fold"])
    params = {k for k, _ in gm.named_parameters()} | {k for k, _ in gm.named_buffers()}
    for gone in ("stem.1.weight", "stem.1.running_mean", "blocks.0.1.running_var", "blocks.1.1.bias", "stem.0.weight",
                 "blocks.0.0.weight"):
        assert gone not in params
    for kept in ("fan_a.running_mean", "sh_b.weight", "shared.weight", "fan.bias"):
        assert kept in params
    assert sum(1 for p in params if p.startswith("_normc.")) == 6  # new weight + bias for 3 convs
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert params == read  # nothing that no node reads, nothing read that does not exist
    assert all(n.users or n.op == "output" for n in gm.graph.nodes)  # no dead nodes
    gm.graph.lint()


def test_new_parameters_are_named_after_the_folded_module(gm, prog):
    apply_rule(gm, prog.rules["fold"])
    names = {k for k, _ in gm.named_parameters()}
    assert {"_normc.stem_0_weight", "_normc.stem_0_bias", "_normc.blocks_0_0_bias"} <= names
    assert gm.get_parameter("_normc.blocks_0_0_bias").shape == (4,)


def test_fixpoint_second_application_changes_nothing(gm, prog):
    apply_rule(gm, prog.rules["fold"])
    code = gm.code
    again = apply_rule(gm, prog.rules["fold"])
    assert again.applied == 0 and len(again.skipped) == 4
    assert gm.code == code


def test_fixpoint_needs_several_matches_in_a_chain(canonical, prog):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(2)
            self.a, self.c, self.d, self.e = (nn.Parameter(torch.rand(4, generator=g) + 0.5) for _ in range(4))

        def forward(self, x):
            return torch.relu(x) * self.a * self.c * self.d * self.e
    m = Chain().eval()
    x = torch.randn(3, 4)
    g = canonical(m, x)
    report = apply_rule(g, prog.rules["fold_scales"])
    assert report.applied == 3
    assert op_counts(g) == {"mul": 1, "relu": 1}
    assert len(list(g.parameters())) == 1
    assert close(g, m, x)


def test_a_rule_that_recreates_its_pattern_raises(gm, prog):
    with pytest.raises(FixpointError, match="still matches after"):
        apply_rule(gm, prog.rules["loop"], max_sweeps=4)


def test_scope_glob_limits_sites(gm, model, prog):
    report = apply_rule(gm, prog.rules["fold"], scope="blocks.*")
    assert sorted(r.path for r in report.sites) == ["blocks.0.1", "blocks.1.1"]
    assert op_counts(gm)["batch_norm"] == 5
    assert close(gm, model)
    report = apply_rule(gm, prog.rules["fold"], scope="nothing.*")
    assert report.applied == 0


def test_scope_from_a_pipeline_apply_on(make_loaded, model, rules):
    from normc.pipeline import RunOptions, compile_model
    program = rules(FOLD + 'pipeline { apply fold(eps_min = 0) on "blocks.*" verify rel 1e-5 }')
    result = compile_model(program, make_loaded(model, X), RunOptions(write=False, verify_inputs=1))
    assert result.passed
    (rep,) = result.report["rules"]
    assert [s["site"].split(" ")[0] for s in rep["sites"]] == ["blocks.0.1", "blocks.1.1"]
    assert result.report["graph"]["after"]["op_counts"]["batch_norm"] == 5
    assert result.report["steps"][0]["step"] == 'apply fold on "blocks.*"'


def test_rule_parameters_default_and_override(gm, prog):
    report = apply_rule(gm, prog.rules["fold"], args={"eps_min": 1.0})
    assert report.applied == 0
    reasons = bn_sites(report.skipped)
    assert reasons["stem.1"] == "`eps > eps_min` is false"
    assert apply_rule(gm, prog.rules["fold"], args={"eps_min": 1e-6}).applied == 3


def test_let_on_an_activation_is_refused(gm, prog):
    code = gm.code
    report = apply_rule(gm, prog.rules["act_let"])
    assert report.applied == 0
    reasons = set(bn_sites(report.skipped).values())
    assert reasons and all("activation, not a parameter" in r for r in reasons)
    assert any("`x` is an activation" in r or "is an activation, not a parameter: it has no value at compile time" in r
               for r in reasons)
    assert gm.code == code


def test_non_finite_new_values_refuse_the_site_and_leave_the_graph_untouched(gm, prog):
    code = gm.code
    params = {k: v.clone() for k, v in gm.state_dict().items()}
    report = apply_rule(gm, prog.rules["blow_up"])
    assert report.applied == 0
    assert all("non-finite" in r.reason for r in report.skipped) and len(report.skipped) == 7
    assert gm.code == code
    assert all(torch.equal(params[k], v) for k, v in gm.state_dict().items())


def test_dry_run_reports_sites_without_changing_the_graph(gm, prog):
    code = gm.code
    report = apply_rule(gm, prog.rules["fold"], dry_run=True)
    assert report.applied == 3 and len(report.skipped) == 4
    assert gm.code == code


def test_excluded_sites_are_rolled_back(gm, model, prog):
    report = apply_rule(gm, prog.rules["fold"], exclude={"batch_norm"})  # the stem's bn node
    assert report.applied == 2
    assert bn_sites(report.skipped)["stem.1"].startswith("rolled back")
    assert close(gm, model)


def test_users_module_is_never_mutated(gm, model, prog):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_rule(gm, prog.rules["fold"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_each_user_rewrite(canonical, prog):
    class Fan(nn.Module):
        def __init__(self, third):
            super().__init__()
            self.ln, self.q, self.k, self.third = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 4, bias=False), third
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                self.ln.weight.copy_(torch.rand(8, generator=g) + 0.5)
                self.ln.bias.copy_(torch.randn(8, generator=g))

        def forward(self, x):
            h = self.ln(x)
            out = self.q(h) + self.k(h).sum(-1, keepdim=True)
            return out + torch.relu(h) if self.third else out
    x = torch.randn(2, 3, 8)
    m = Fan(False).eval()
    g = canonical(m, x)
    report = apply_rule(g, prog.rules["fold_affine"])
    assert report.applied == 1 and report.sites[0].path == "ln"
    ln = [n for n in g.graph.nodes if n.op == "call_function" and n.name.startswith("layer_norm")]
    assert len(ln) == 1 and all(a is None for a in ln[0].args[1:])  # affine-free
    assert ln[0].kwargs["normalized_shape"] == (8,)                   # attributes inherited
    names = {k for k, _ in g.named_parameters()}
    assert names == {"_normc.q_weight", "_normc.q_bias", "_normc.k_weight", "_normc.k_bias"}
    assert close(g, m, x)
    # one reader is not a linear: the site is refused with the reason
    m = Fan(True).eval()
    g = canonical(m, x)
    report = apply_rule(g, prog.rules["fold_affine"])
    assert report.applied == 0
    (rec,) = report.skipped + report.near_misses
    assert "every user of `h` must match" in rec.reason and "relu" in rec.reason
    assert close(g, m, x)


def test_std_fold_bn_conv_edge_cases(canonical):
    """std.fold_bn_conv: no affine, grouped conv, conv3d, large eps fold exactly; no running stats is refused."""
    from normc.grammar.loader import load_std

    class Edge(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(4)
            self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)
            self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
            self.c3, self.b3 = nn.Conv2d(4, 4, 1, groups=2), _bn(4, g)
            self.b3.eps = 0.1
            self.c4, self.b4 = nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)
            with torch.no_grad():
                self.b1.running_mean.copy_(torch.randn(4, generator=g))
                self.b1.running_var.copy_(torch.rand(4, generator=g) + 0.5)
                self.b4.running_var.copy_(torch.rand(2, generator=g) + 0.5)
                self.b4.weight.copy_(torch.rand(2, generator=g) + 0.5)

        def forward(self, x):
            y = self.b3(self.c3(self.b2(self.c2(self.b1(self.c1(x))))))
            return self.b4(self.c4(y.unsqueeze(1)))
    m = Edge().eval()
    g = canonical(m, X)
    report = apply_rule(g, load_std().rules["std.fold_bn_conv"])
    assert sorted(r.path for r in report.sites) == ["b1", "b3", "b4"]
    assert bn_sites(report.skipped) == {"b2": "batch_norm `b2` has no running statistics (track_running_stats=False)"}
    assert op_counts(g)["batch_norm"] == 1
    assert close(g, m)
