"""The engine without a model: fx graphs built by hand (as tinygrad builds UOps), one matcher or
rewriter feature per test."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from normc.ir import ops
from normc.ir.graph import annotate_shapes, live
from normc.ir.match import Match, MatchStatus, NearMiss, Pattern
from normc.ir.rewrite import FixpointError, apply_rule


class G:
    """A canonical graph written by hand: g.input(), g.param(...), g.op("relu", x), g.out(...)."""

    def __init__(self):
        self.root = torch.nn.Module()
        self.graph = fx.Graph()
        self.gen = torch.Generator().manual_seed(0)
        self.inputs = []

    def input(self, *shape):
        self.inputs.append(torch.randn(*shape, generator=self.gen))
        return self.graph.placeholder(f"x{len(self.inputs) - 1}")

    def param(self, name, *shape, tensor=None):
        value = tensor if tensor is not None else torch.rand(*shape, generator=self.gen) + 0.5
        self.root.register_parameter(name, value if isinstance(value, torch.nn.Parameter)
                                     else torch.nn.Parameter(value, requires_grad=False))
        return self.graph.get_attr(name)

    def op(self, name, *operands, **attrs):
        schema = ops.OPS[name]
        args = list(operands) + [None] * (len(schema.operands) - len(operands))
        return self.graph.call_function(schema.impl, tuple(args), attrs)

    def out(self, *values):
        self.graph.output(values[0] if len(values) == 1 else tuple(values))
        gm = fx.GraphModule(self.root, self.graph)
        annotate_shapes(gm, tuple(self.inputs), {})
        return gm

    def run(self, gm):
        with torch.no_grad():
            return gm(*self.inputs)


def rule(rules, text, name="r"):
    return rules(text).rules[name]


def at(rules, text, gm, node):
    return Pattern(rule(rules, text)).match(gm, node)


def test_optional_operand_binds_none_when_absent(rules):
    g = G()
    x = g.input(2, 4)
    with_b = g.op("linear", x, g.param("w1", 4, 4), g.param("b1", 4))
    without = g.op("linear", with_b, g.param("w2", 4, 4))
    gm = g.out(without)
    text = "rule r { match y = linear(x, w, b?) rewrite y = relu(x) }"
    m1, m2 = at(rules, text, gm, with_b), at(rules, text, gm, without)
    assert isinstance(m1, Match) and m1.env["b"].node.target == "b1"
    assert isinstance(m2, Match) and m2.env["b"] is None
    miss = at(rules, "rule r { match y = linear(x, w, b) rewrite y = relu(x) }", gm, without)
    assert isinstance(miss, NearMiss) and "write `b?`" in miss.reason


def test_commutative_op_matches_its_operands_in_either_order(rules):
    g = G()
    x = g.input(3)
    s, r = g.op("sigmoid", x), g.op("relu", x)
    written, swapped = g.op("add", s, r), g.op("add", r, s)
    gm = g.out(written, swapped)
    text = "rule r { match y = add(sigmoid(a), relu(b)) rewrite y = relu(a) }"
    for node in (written, swapped):
        m = at(rules, text, gm, node)
        assert isinstance(m, Match) and m.env["a"].node is x and m.env["b"].node is x


def test_matches_yields_every_operand_order_lazily(rules):
    g = G()
    x = g.input(3)
    p = g.op("add", g.op("relu", x), g.op("tanh", x))
    gm = g.out(p)
    pattern = Pattern(rule(rules, "rule r { match y = add(u, v) rewrite y = relu(u) }"))
    found = list(pattern.matches(gm, p))
    assert [(m.env["u"].node.name, m.env["v"].node.name) for m in found] == [("relu", "tanh"), ("tanh", "relu")]
    lazy = iter(pattern.matches(gm, p))
    assert next(lazy).env["u"].node.name == "relu"  # the second order is not built until asked for


def test_guard_chooses_among_every_order_of_many_commutative_ops(rules):
    """Seven commutative ops (128 orders, the old matcher explored 16): the parameters sit on the
    right of the first and third inner adds, on the left of the others; the guard finds the order."""
    g = G()
    x = g.input(4)
    leaves = []
    for i, param_first in enumerate([False, True, False, True]):
        act, par = g.op("relu", x) if i % 2 else g.op("tanh", x), g.param(f"p{i}", 4)
        leaves.append(g.op("add", par, act) if param_first else g.op("add", act, par))
    y = g.op("add", g.op("add", leaves[0], leaves[1]), g.op("add", leaves[2], leaves[3]))
    gm = g.out(y)
    before = g.run(gm)
    r = rule(rules, """rule r {
      match y = add(add(add(p1, q1), add(p2, q2)), add(add(p3, q3), add(p4, q4)))
      where is_param(p1) and is_param(p2) and is_param(p3) and is_param(p4)
      rewrite y = add(add(add(q1, q2), add(q3, q4)), p1 + p2 + p3 + p4)
    }""")
    report = apply_rule(gm, r)
    assert report.applied == 1, [s.reason for s in report.skipped]
    assert report.stats.matches == 1  # only the outer add has the pattern's shape
    assert torch.allclose(g.run(gm), before, atol=1e-6)


def test_same_variable_twice_must_be_one_value(rules):
    g = G()
    x = g.input(3)
    same, other = g.op("add", x, x), g.op("add", x, g.op("relu", x))
    gm = g.out(same, other)
    text = "rule r { match y = add(v, v) rewrite y = mul(v, 2) }"
    assert isinstance(at(rules, text, gm, same), Match)
    miss = at(rules, text, gm, other)
    assert isinstance(miss, NearMiss) and "bound to two different values" in miss.reason


def test_literal_attribute_must_equal(rules):
    g = G()
    x = g.input(2, 3)
    last, first = g.op("softmax", x, dim=-1), g.op("softmax", x, dim=0)
    gm = g.out(last, first)
    text = "rule r { match y = softmax(x, dim = -1) rewrite y = relu(x) }"
    assert isinstance(at(rules, text, gm, last), Match)
    miss = at(rules, text, gm, first)
    assert isinstance(miss, NearMiss) and miss.reason == "softmax dim is 0, not -1" and miss.depth == 1


def test_near_miss_keeps_the_node_at_fault_and_its_status(rules):
    g = G()
    x = g.input(3)
    t = g.op("tanh", x)
    y = g.op("relu", g.op("sigmoid", t))
    gm = g.out(y)
    miss = at(rules, "rule r { match y = relu(sigmoid(relu(x))) rewrite y = relu(x) }", gm, y)
    assert isinstance(miss, NearMiss)
    assert miss.node is t and miss.depth == 2 and miss.status is MatchStatus.STRUCTURE and miss.refusal
    shallow = at(rules, "rule r { match y = relu(tanh(x)) rewrite y = relu(x) }", gm, y)
    assert shallow.depth == 1 and not shallow.refusal


def test_fan_out_over_every_user_and_over_any_user(rules):
    g = G()
    x = g.input(2, 4)
    h = g.op("relu", x)
    a = g.op("linear", h, g.param("wa", 4, 4))
    b = g.op("linear", h, g.param("wb", 2, 4), g.param("bb", 2))
    other = g.op("tanh", h)
    gm = g.out(a, b, other)
    every = "rule r { match h = relu(x)\n each u in users(h): o = linear(h, w, b?) rewrite h = relu(x) }"
    miss = at(rules, every, gm, h)
    assert isinstance(miss, NearMiss) and miss.status is MatchStatus.FANOUT and miss.node is other
    assert miss.reason.startswith("every user of `h` must match:")
    anyone = "rule r { match h = relu(x)\n each u in any users(h): o = linear(h, w, b?) rewrite h = relu(x) }"
    m = at(rules, anyone, gm, h)
    assert isinstance(m, Match)
    assert sorted(e["w"].node.target for e in m.each["u"]) == ["wa", "wb"]
    assert [e["b"] is None for e in m.each["u"]] == [True, False]


def test_statement_read_twice_is_one_node(rules):
    g = G()
    x = g.input(3)
    r = g.op("relu", x)
    twice, two = g.op("mul", r, r), g.op("mul", r, g.op("relu", x))
    gm = g.out(twice, two)
    text = "rule r { match h = relu(x)\n y = mul(h, h) rewrite y = mul(h, h) }"
    assert isinstance(at(rules, text, gm, twice), Match)
    miss = at(rules, text, gm, two)
    assert isinstance(miss, NearMiss) and "`h` would be two different values" in miss.reason


def test_a_fixpoint_down_a_chain_is_one_pass(rules):
    """Each site makes the next one: the worklist reaches it in the same sweep (graph order); the new
    nodes are looked at once more in a second sweep, as a re-sweep would, and nothing else is."""
    g = G()
    y = g.op("relu", g.input(4))
    for i in range(6):
        y = g.op("mul", y, g.param(f"s{i}", 4))
    gm = g.out(y)
    before = g.run(gm)
    r = rule(rules, "rule r { match y = mul(mul(x, a), c) where is_param(a) and is_param(c) "
                    "rewrite y = mul(x, a * c) }")
    report = apply_rule(gm, r)
    assert report.applied == 5 and report.stats.sweeps == 2
    assert report.stats.visited == 6 + 1  # the 6 muls, then the one new mul still alive
    assert torch.allclose(g.run(gm), before)
    assert [n.name for n in gm.graph.nodes if n.op == "call_function"] == ["relu", "mul_10"]


def test_a_rule_that_recreates_itself_stops_after_max_sweeps(rules):
    g = G()
    gm = g.out(g.op("relu", g.input(3)))
    with pytest.raises(FixpointError, match="still matches after 3 sweeps"):
        apply_rule(gm, rule(rules, "rule r { match y = relu(x) rewrite y = relu(x) }"), max_sweeps=3)


def test_a_site_erases_only_what_it_left_dead(rules):
    g = G()
    x = g.input(4)
    keep = g.op("tanh", x)
    s = g.op("sigmoid", keep)
    y = g.op("relu", s)
    gm = g.out(y, keep)
    r = rule(rules, "rule r { match y = relu(sigmoid(x)) rewrite y = relu(x) }")
    report = apply_rule(gm, r)
    assert report.applied == 1
    assert not live(s) and live(keep)  # the sigmoid nobody reads is gone; its input stays (an output reads it)
    assert report.stats.cleanup >= 2


def test_new_nodes_carry_their_shape_dtype_and_rule(rules):
    g = G()
    x = g.input(2, 3)
    y = g.op("mul", g.op("add", x, g.param("b", 3)), g.param("s", 3))
    gm = g.out(g.op("softmax", y, dim=0))
    r = rule(rules, "rule r { match y = mul(add(x, b), s) where is_param(b) and is_param(s) "
                    "rewrite y = add(mul(x, s), b * s) }")
    report = apply_rule(gm, r)
    assert report.applied == 1
    new = [n for n in gm.graph.nodes if n.meta.get("normc_rule") == "r"]
    assert sorted(n.op for n in new) == ["call_function", "call_function", "get_attr"]  # mul, add, b * s
    assert all(n.meta["normc_rule_loc"].endswith(":1") for n in new)
    recorded = {n.name: (n.meta["normc_shape"], n.meta["normc_dtype"]) for n in gm.graph.nodes if n.op != "output"}
    annotate_shapes(gm, tuple(g.inputs), {})
    assert recorded == {n.name: (n.meta["normc_shape"], n.meta["normc_dtype"]) for n in gm.graph.nodes
                        if n.op != "output"}


def test_tied_weights_are_shared(rules):
    g = G()
    x = g.input(2, 4)
    w = torch.nn.Parameter(torch.randn(4, 4, generator=g.gen), requires_grad=False)
    a = g.op("linear", x, g.param("wa", tensor=w))
    b = g.op("linear", a, g.param("wb", tensor=w))  # another name, the same tensor
    c = g.op("linear", b, g.param("wc", 4, 4))
    gm = g.out(c)
    r = rule(rules, "rule r { match y = linear(x, w, _) where not shared(w) rewrite y = matmul(x, t(w)) }")
    report = apply_rule(gm, r)
    assert [s.path or s.key for s in report.sites] == ["linear_2"]
    assert {s.key for s in report.skipped} == {"linear", "linear_1"}
    assert all("shared by 2 call sites" in s.reason and s.status is MatchStatus.GUARD for s in report.skipped)


def test_parameters_made_by_earlier_sites_are_seen_by_later_guards(rules):
    """The second site's `a` is the parameter the first site made: `shared(a)` asks the rewriter's
    index, which learned it when it was created."""
    g = G()
    y = g.op("relu", g.input(4))
    for i in range(3):
        y = g.op("mul", y, g.param(f"s{i}", 4))
    gm = g.out(y)
    before = g.run(gm)
    r = rule(rules, "rule r { match y = mul(mul(x, a), c) where is_param(a) and not shared(a) and not shared(c) "
                    "rewrite y = mul(x, a * c) }")
    report = apply_rule(gm, r)
    assert report.applied == 2 and not report.skipped
    assert torch.allclose(g.run(gm), before)


def test_recognizers_cost_nothing_where_nothing_matches(rules, monkeypatch):
    """Without explanations, a candidate whose operands have the wrong ops is turned away before any
    matching, and no cleanup runs when nothing applied."""
    import normc.ir.rewrite as rewrite
    g = G()
    y = g.input(4)
    for i in range(10):
        y = g.op("mul", g.op("tanh", y), g.param(f"s{i}", 4))
    gm = g.out(y)
    code = gm.code
    finished = []
    monkeypatch.setattr(rewrite, "finish", lambda gm: finished.append(gm))
    r = rule(rules, "rule r { match y = mul(x, inv_sqrt(add(v, eps))) rewrite y = relu(x) }")
    report = apply_rule(gm, r, explain=False)
    assert report.applied == 0 and report.stats.visited == 10 and report.stats.rejected == 10
    assert report.stats.attempts == 0 and not report.near_misses
    explained = apply_rule(gm, r)
    assert explained.stats.attempts == 10 and len(explained.near_misses) == 10
    assert not finished and gm.code == code
