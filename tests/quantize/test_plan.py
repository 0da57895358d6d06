"""Which linears a quantize step selects: module globs, patterns over the canonical graph, guards."""
from __future__ import annotations

from normc.quantize.plan import make_plan

from .conftest import step_of


def schemes(plan):
    return {lp.name: lp.scheme for lp in plan.linears}


def test_default_plans_every_linear_in_graph_order(block_graph):
    plan = make_plan(block_graph, step_of(""))
    assert [lp.name for lp in plan.linears] == ["up", "down", "head"]
    assert all(lp.scheme.quantized for lp in plan.linears) and not plan.warnings
    assert plan.linears[0].weight.shape == (64, 32)


def test_pattern_selects_the_linear_after_gelu(block_graph):
    plan = make_plan(block_graph, step_of("match linear(gelu(x), w, b?): keep fp32"))
    s = schemes(plan)
    assert not s["down"].quantized and s["up"].quantized and s["head"].quantized
    assert plan.by_name()["down"].set_by[-1].startswith("match linear(...) (line 1)")


def test_guard_filters_matches(block_graph):
    # `down` reads a GELU, but its weight is not 32 wide: the guard refuses it
    plan = make_plan(block_graph, step_of("match linear(x, w, b?) where shape(w)[1] == 32: activations fp32"))
    s = schemes(plan)
    assert s["up"].act == "fp32" and s["head"].act == "fp32" and s["down"].act == "uint8"


def test_module_glob_and_nearest_name_when_nothing_matches(block_graph):
    plan = make_plan(block_graph, step_of('on "h*": first_tokens 1\n on "dwn": keep fp32'))
    s = schemes(plan)
    assert s["head"].first_tokens == 1 and s["up"].first_tokens == 0
    assert plan.warnings == ['`on "dwn" (line 2)` selects no linear; did you mean `down`?']


def test_plan_report_names_cpu_and_schemes(block_graph):
    d = make_plan(block_graph, step_of('on "down": activations per_token dynamic')).to_dict()
    assert set(d["cpu"]) >= {"vnni", "u8s8_saturates"} and "saturat" in d["cpu_verdict"]
    assert sum(d["schemes"].values()) == 3
    assert any("dynamic per_token" in k for k in d["schemes"])
