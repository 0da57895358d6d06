"""The matcher: bindings for a pattern at a node, or the first reason it does not fit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from normc.ir.builtins import NodeRef
from normc.ir.graph import op_name
from normc.ir.match import Match, NearMiss, Pattern


class Net(nn.Module):
    """conv2d(+bias) -> bn2d; conv1d(no bias) -> bn1d; linear(no bias); linear(+bias); add/mul in both orders."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv1d(4, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(4)
        self.nob = nn.Linear(16, 8, bias=False)
        self.withb = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.bn2(self.c2(x))                       # [2, 4, 4, 4]
        z = self.bn1(self.c1(y.flatten(2)))            # [2, 4, 16]
        h = torch.relu(self.nob(z))                    # [2, 4, 8]
        a = h + self.withb(h)                          # activation + linear
        b = self.withb(a) + torch.sigmoid(a)           # linear + activation (the other order)
        return (b * self.scale) + (self.scale * a) + (a + a)


@pytest.fixture(scope="module")
def gm(canonical):
    return canonical(Net(), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def prog(rules):
    return rules("""
rule nested { match y = batch_norm(conv2d(x, w, b?), m?, v?, g?, be?, eps = e) rewrite y = relu(x) }
rule stmts  { match c = conv2d(x, w, b?)
                    y = batch_norm(c, m?, v?, g?, be?, eps = e) rewrite y = relu(x) }
rule stmts_reversed { match y = batch_norm(c, m?, v?, g?, be?, eps = e)
                            c = conv2d(x, w, b?) rewrite y = relu(x) }
rule any_conv { match y = batch_norm(conv(x, w, b?), _, _, _, _) rewrite y = relu(x) }
rule conv1 { match y = batch_norm(conv1d(x, w, b?), _, _, _, _) rewrite y = relu(x) }
rule need_bias { match y = batch_norm(conv(x, w, b), _, _, _, _) rewrite y = relu(x) }
rule lin_opt { match y = linear(x, w, b?) rewrite y = relu(x) }
rule lin_req { match y = linear(x, w, b) rewrite y = relu(x) }
rule bn_after_linear { match y = batch_norm(linear(x, w, b?), _, _, _, _) rewrite y = relu(x) }
rule add_linear { match l = linear(h, w, b?)
                        y = add(h, l) rewrite y = relu(h) }
rule add_sig_lin { match y = add(sigmoid(s), linear(s, w, b?)) rewrite y = relu(s) }
rule mul_add { match y = mul(add(p, q), s) rewrite y = relu(s) }
rule same_twice { match y = add(x, x) rewrite y = relu(x) }
rule eval_bn { match y = batch_norm(x, _, _, _, _, training = false) rewrite y = relu(x) }
rule train_bn { match y = batch_norm(x, _, _, _, _, training = true) rewrite y = relu(x) }
rule fan { match h = relu(x)
                 each u in users(h): o = linear(h, w, b?) rewrite h = relu(x) }
""")


def nodes(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == name]


def at(gm, prog, rule, node):
    return Pattern(prog.rules[rule]).match(gm, node)


def names(env):
    return {k: (v.node.name if isinstance(v, NodeRef) else v) for k, v in env.items()}


def test_nested_and_statement_forms_give_the_same_match(gm, prog):
    bn2 = nodes(gm, "batch_norm")[0]
    found = {r: at(gm, prog, r, bn2) for r in ("nested", "stmts", "stmts_reversed")}
    assert all(isinstance(m, Match) for m in found.values())
    envs = {r: names(m.env) for r, m in found.items()}
    common = ["x", "w", "b", "m", "v", "g", "be", "e"]
    assert {k: envs["nested"][k] for k in common} == {k: envs["stmts"][k] for k in common} \
        == {k: envs["stmts_reversed"][k] for k in common}
    assert envs["nested"]["x"] == "x" and envs["nested"]["w"] == "c2_weight" and envs["nested"]["m"] == "bn2_running_mean"
    assert envs["nested"]["e"] == pytest.approx(1e-5)
    assert envs["stmts"]["c"] == envs["nested"]["conv2d"]  # a nested op is named by its op name
    assert found["nested"].root is bn2
    assert [n.name for _, n in found["nested"].op_nodes] == [n.name for _, n in found["stmts"].op_nodes]


def test_only_root_op_nodes_are_candidates(gm, prog):
    relu = nodes(gm, "relu")[0]
    assert at(gm, prog, "nested", relu) is None
    assert at(gm, prog, "nested", next(iter(gm.graph.nodes))) is None  # a placeholder


def test_optional_operand_present_and_absent(gm, prog):
    nob, withb = nodes(gm, "linear")[:2]
    absent, present = at(gm, prog, "lin_opt", nob), at(gm, prog, "lin_opt", withb)
    assert isinstance(absent, Match) and absent.env["b"] is None
    assert isinstance(present, Match) and present.env["b"].node.target == "withb.bias"
    miss = at(gm, prog, "lin_req", nob)
    assert isinstance(miss, NearMiss)
    assert "linear b is absent" in miss.reason and "`b?`" in miss.reason
    assert isinstance(at(gm, prog, "lin_req", withb), Match)


def test_absent_inner_operand_reason(gm, prog):
    bn1 = nodes(gm, "batch_norm")[1]
    miss = at(gm, prog, "need_bias", bn1)
    assert isinstance(miss, NearMiss) and "conv b is absent" in miss.reason


def test_conv2d_alias_rejects_conv1d_with_a_reason(gm, prog):
    bn2, bn1 = nodes(gm, "batch_norm")
    miss = at(gm, prog, "nested", bn1)
    assert isinstance(miss, NearMiss)
    assert miss.reason == "`c1` is a conv1d, not conv2d"
    assert miss.depth >= 1
    assert isinstance(at(gm, prog, "conv1", bn1), Match)
    assert isinstance(at(gm, prog, "conv1", bn2), NearMiss) and "conv2d, not conv1d" in at(gm, prog, "conv1", bn2).reason
    # `conv` matches every rank
    assert isinstance(at(gm, prog, "any_conv", bn1), Match) and isinstance(at(gm, prog, "any_conv", bn2), Match)


def test_near_miss_names_the_module_and_both_ops(gm, prog):
    bn2 = nodes(gm, "batch_norm")[0]
    miss = at(gm, prog, "bn_after_linear", bn2)
    assert isinstance(miss, NearMiss) and miss.root is bn2
    assert miss.reason == "`c2` is conv, not linear"


def test_commutative_add_matches_either_order(gm, prog):
    adds = nodes(gm, "add")
    # a = h + withb(h): the pattern's order
    first = at(gm, prog, "add_linear", adds[0])
    assert isinstance(first, Match) and first.env["w"].node.target == "withb.weight"
    assert first.env["h"].node is nodes(gm, "relu")[0]
    # b = withb(a) + sigmoid(a): the pattern add(sigmoid(s), linear(s, ...)) matches with the operands swapped
    swapped = at(gm, prog, "add_sig_lin", adds[1])
    assert isinstance(swapped, Match), getattr(swapped, "reason", None)
    assert swapped.env["s"].node is adds[0] and swapped.env["w"].node.target == "withb.weight"
    assert isinstance(at(gm, prog, "add_sig_lin", adds[0]), NearMiss)


def test_commutative_mul_matches_either_order(gm, prog):
    muls = nodes(gm, "mul")  # (b * scale) and (scale * a)
    assert len(muls) == 2
    for n in muls:
        m = at(gm, prog, "mul_add", n)
        assert isinstance(m, Match), getattr(m, "reason", None)
        assert m.env["s"].node.target == "scale"
        assert op_name(m.env["y"].node) == "mul"


def test_commutative_mul_swapped_operands(canonical, rules):
    class M(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) * torch.relu(x), torch.relu(x) * torch.sigmoid(x)
    g = canonical(M(), torch.randn(2, 3))
    prog = rules("rule r { match y = mul(sigmoid(s), relu(t)) rewrite y = relu(s) }")
    muls = nodes(g, "mul")
    assert len(muls) == 2
    for n in muls:
        m = Pattern(prog.rules["r"]).match(g, n)
        assert isinstance(m, Match), getattr(m, "reason", None)
        assert m.env["s"].node is m.env["t"].node  # both are x
    # a failure in both orders reports the first order's reason and keeps no partial bindings
    prog = rules("rule r { match y = mul(tanh(s), relu(t)) rewrite y = relu(s) }")
    miss = Pattern(prog.rules["r"]).match(g, muls[0])
    assert isinstance(miss, NearMiss) and "not tanh" in miss.reason


def test_same_variable_twice_must_be_the_same_value(gm, prog):
    adds = nodes(gm, "add")
    results = [at(gm, prog, "same_twice", n) for n in adds]
    matched = [m for m in results if isinstance(m, Match)]
    assert len(matched) == 1  # only a + a
    assert any(isinstance(m, NearMiss) and "bound to two different values" in m.reason for m in results)


def test_literal_keyword_attributes(gm, prog):
    bn2 = nodes(gm, "batch_norm")[0]
    assert isinstance(at(gm, prog, "eval_bn", bn2), Match)
    miss = at(gm, prog, "train_bn", bn2)
    assert isinstance(miss, NearMiss) and miss.reason == "batch_norm training is False, not True"


def test_fan_out_over_users(canonical, rules):
    class Fan(nn.Module):
        def __init__(self, third):
            super().__init__()
            self.q, self.k, self.third = nn.Linear(4, 4), nn.Linear(4, 2, bias=False), third

        def forward(self, x):
            h = torch.relu(x)
            out = self.q(h).sum(-1) + self.k(h).sum(-1)
            return out + h.sum(-1) if self.third else out
    prog = rules("rule fan { match h = relu(x)\n each u in users(h): o = linear(h, w, b?) rewrite h = relu(x) }")
    pattern = Pattern(prog.rules["fan"])
    g = canonical(Fan(False), torch.randn(2, 4))
    m = pattern.match(g, nodes(g, "relu")[0])
    assert isinstance(m, Match)
    envs = m.each["u"]
    assert sorted(e["w"].node.target for e in envs) == ["k.weight", "q.weight"]
    assert sorted(e["b"] is None for e in envs) == [False, True]
    assert all(e["u"].node is e["o"].node for e in envs)
    g = canonical(Fan(True), torch.randn(2, 4))
    miss = pattern.match(g, nodes(g, "relu")[0])
    assert isinstance(miss, NearMiss)
    assert miss.reason.startswith("every user of `h` must match:") and "not linear" in miss.reason


def test_model_inputs_and_parameters_are_not_ops(canonical, rules):
    class P(nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1
    g = canonical(P(), torch.randn(3))
    prog = rules("rule r { match y = relu(conv(x, w, b?)) rewrite y = relu(x) }")
    miss = Pattern(prog.rules["r"]).match(g, nodes(g, "relu")[0])
    assert isinstance(miss, NearMiss) and "not conv" in miss.reason and "x" in miss.reason


def test_commutative_match_with_a_guard_on_the_operand_order(canonical, rules):
    from normc.ir.rewrite import apply_rule

    class AddBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return self.p + torch.relu(x)
    x = torch.randn(2, 4)
    m = AddBias().eval()
    g = canonical(m, x)
    prog = rules("rule r { match y = add(x, b) where is_param(b) rewrite y = sub(x, 0 - b) }")
    report = apply_rule(g, prog.rules["r"])
    assert report.applied == 1, [s.reason for s in report.skipped]
