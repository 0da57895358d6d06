"""`normc prove`: rules checked on their own, on random instances of their patterns."""
from __future__ import annotations

import random

import pytest
import torch

from normc.grammar import syntax_tree as T
from normc.grammar.checker import load_and_check
from normc.grammar.loader import load_std
from normc.verify.prove import (
    TOLERANCE,
    ProveResult,
    _Builder,
    _hints,
    collect_stats,
    format_table,
    prove_program,
    prove_rule,
)

BN = """
rule fold {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
rule fold_no_eps {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
rule never {
  exact
  match   y = relu(x)
  where   1 == 2
  rewrite y = relu(x)
}
rule ln_as_rms {
  approximate
  match   h = layer_norm(x, g?, b?, normalized_shape = ns, eps = eps)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)]
  rewrite h = rms_norm(x, g, eps = eps)
}
rule relu_to_gelu {
  structural
  match   y = relu(x)
  rewrite y = gelu(x)
}
rule crash {
  exact
  match   c = linear(x, w, b?)
          y = relu(c)
  let     v = w * bcast(sum(w, dim = 1), w, 1)
  rewrite y = relu(linear(x, v, b))
}
rule overflow16 {
  exact
  match   y = relu(mul(x, w))
  where   is_param(w)
  rewrite y = relu(div(mul(x, w * 1e6), 1e6))
}
rule loops {
  exact
  match   y = mul(x, w)
  where   is_param(w)
  rewrite y = mul(mul(x, w * 2), 0.5)
}
rule smooth(alpha: float = 0.5) {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)]
  let     s = clamp(clamp(absmax(h), min = 1e-5) ** alpha, min = 1e-5)
  rewrite h = layer_norm(x, (g ?? 1) / s, (beta ?? 0) / s)
          each u: y = linear(h, w * s, b)
}
rule smooth_any {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in any users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)]
  let     s = clamp(absmax(h), min = 1e-5) ** 0.5
  rewrite n = layer_norm(x, (g ?? 1) / s, (beta ?? 0) / s)
          h = mul(n, s)
          each u: y = linear(n, w * s, b)
}
"""


@pytest.fixture(scope="module")
def program():
    return load_and_check(text=BN, file="test.nc")


def test_sound_rule(program):
    r = prove_rule(program.rules["fold"], instances=8)
    assert isinstance(r, ProveResult)
    assert r.verdict == "sound", r.reason
    assert r.applied == 8 and r.instances >= 8
    assert r.counterexample is None
    assert set(r.max_err_by_dtype) == {"float64", "float32", "float16"}
    assert r.tolerance_by_dtype == {k: TOLERANCE[k] for k in ("float64", "float32", "float16")}
    assert r.max_err_by_dtype["float64"] <= 1e-10
    assert r.max_err_by_dtype["float32"] <= 1e-4


def test_unsound_rule_has_a_counterexample(program):
    r = prove_rule(program.rules["fold_no_eps"])
    assert r.verdict == "unsound"
    assert r.reason.startswith("float64")
    assert "pattern:" in r.counterexample and "rewritten:" in r.counterexample
    assert "batch_norm(" in r.counterexample and "seed=0" in r.counterexample


def test_guard_never_true_is_untestable(program):
    r = prove_rule(program.rules["never"])
    assert r.verdict == "untestable" and r.applied == 0
    assert "1 == 2" in r.reason


def test_approximate_rule_reports_its_error(program):
    r = prove_rule(program.rules["ln_as_rms"], instances=6)
    assert r.verdict == "approximate" and r.kind == "approximate"
    assert r.max_err_by_dtype["float64"] > 1e-3  # LayerNorm is not RMSNorm on non-centred inputs


def test_structural_rule_checks_shapes_only(program):
    r = prove_rule(program.rules["relu_to_gelu"], instances=4)
    assert r.verdict == "structural"


def test_crashing_rewrite_is_unsound(program):
    r = prove_rule(program.rules["crash"])
    assert r.verdict == "unsound"
    assert "raised" in r.reason or "does not run" in r.reason or "changed shape" in r.reason


def test_calibration_statistics_and_fanout(program):
    r = prove_rule(program.rules["smooth"], instances=8)
    assert r.verdict == "sound", r.reason + "\n" + str(r.counterexample)
    r = prove_rule(program.rules["smooth_any"], instances=8)
    assert r.verdict == "sound", r.reason + "\n" + str(r.counterexample)


def test_float16_judged_on_its_own(program):
    """Exact in real arithmetic, but the new weight (w * 1e6) overflows float16."""
    r = prove_rule(program.rules["overflow16"], instances=6)
    assert r.max_err_by_dtype["float64"] <= 1e-10 and r.max_err_by_dtype["float32"] <= 1e-5
    if r.verdict == "unsound":
        assert r.reason.startswith("float16")
    else:  # a rewriter that refuses parameters that do not fit the model's dtype
        assert "float16" not in r.max_err_by_dtype


def test_self_reproducing_rule_is_reported_not_hung(program):
    r = prove_rule(program.rules["loops"], instances=4)
    assert r.verdict == "unsound" and "FixpointError" in r.reason


def test_fanout_instances_have_one_to_three_users(program):
    rule = program.rules["smooth"]
    counts = set()
    rng = random.Random(0)
    for i in range(30):
        b = _Builder(rule, rng, torch.Generator().manual_seed(i), "normal", _hints(rule))
        try:
            gm, inputs, outs = b.build()
        except Exception:
            continue
        h = next(n for n in gm.graph.nodes if n.name == "h")
        counts.add(len(h.users))
        assert len(outs) == len(h.users)  # the fan-out source itself is not an output
    assert counts <= {1, 2, 3} and len(counts) >= 2


def test_partial_fanout_instances_have_other_readers(program):
    rule = program.rules["smooth_any"]
    rng = random.Random(1)
    others = 0
    for i in range(30):
        b = _Builder(rule, rng, torch.Generator().manual_seed(i), "normal", _hints(rule))
        gm, _, _ = b.build()
        h = next(n for n in gm.graph.nodes if n.name == "h")
        others += sum(1 for u in h.users if u.op == "output" or u.name.startswith(("residual", "relu")))
    assert others > 0


def test_collect_stats_is_per_channel():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    x = torch.tensor([[-1.0, 2.0, -3.0], [4.0, -5.0, 0.5]])
    stats = collect_stats(gm, (x,))
    node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert torch.equal(stats.get(node, "absmax"), torch.tensor([4.0, 5.0, 3.0], dtype=torch.float64))
    assert torch.equal(stats.get(node, "min"), torch.tensor([-1.0, -5.0, -3.0], dtype=torch.float64))


def test_deterministic(program):
    a = prove_rule(program.rules["fold"], instances=4, seed=3).to_dict()
    b = prove_rule(program.rules["fold"], instances=4, seed=3).to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_dtypes_argument(program):
    r = prove_rule(program.rules["fold"], instances=3, dtypes=(torch.float64,))
    assert set(r.max_err_by_dtype) == {"float64"}


def test_extern_pass_is_listed_not_proved():
    std = load_std()
    externs = [n for n, r in std.rules.items() if isinstance(r, T.ExternPass)]
    if not externs:
        pytest.skip("no global pass in the standard library")
    r = prove_rule(std.rules[externs[0]])
    assert r.verdict == "global" and r.reason == "global pass: checked on models"


def test_prove_program_by_group_and_table():
    std = load_std()
    results = prove_program(std, ["std.bn"], instances=4)
    assert [r.name for r in results] == std.groups["std.bn"]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["rule", "kind", "applied/tried"]
    assert "float64 max rel" in lines[0] and "verdict" in lines[0]
    for r in results:
        assert any(line.startswith(r.name) and r.verdict in line for line in lines)
    with pytest.raises(KeyError):
        prove_program(std, ["std.nope"])


def test_whole_standard_library_proves():
    # (its runtime is measured, not asserted: `time normc prove --std`)
    results = prove_program(load_std())
    assert len(results) == len(load_std().rules)
    assert all(r.verdict in ("sound", "unsound", "untestable", "global", "approximate", "structural") for r in results)
    assert not [r for r in results if r.verdict == "untestable"], format_table(results)


def _one_op_rules():
    from normc.ir.ops import ALIASES, OPS
    names = list(OPS) + list(ALIASES)
    text = []
    for name in names:
        schema = OPS[ALIASES[name][0]] if name in ALIASES else OPS[name]
        args = ", ".join(o.name + ("?" if o.optional else "") for o in schema.operands)
        text.append(f"rule one_{name} {{\n exact\n match y = {name}({args})\n rewrite y = relu(y)\n}}\n")
    return load_and_check(text="\n".join(text), file="ops.nc")


def test_every_canonical_op_has_an_instance_generator():
    """Random instances of a one-op pattern build, run, and match that pattern, for the whole vocabulary."""
    from normc.ir.match import Match, Pattern
    from normc.ir.ops import OPS
    from normc.verify.prove import _GENERATORS, UNARY_OPS, _Invalid
    missing = set(OPS) - set(_GENERATORS) - UNARY_OPS
    assert not missing, f"ops without an instance generator in normc/verify/prove.py: {sorted(missing)}"
    program = _one_op_rules()
    for name, rule in program.rules.items():
        if not name.startswith("one_"):
            continue
        rng, ok = random.Random(name), 0
        for i in range(6):
            b = _Builder(rule, rng, torch.Generator().manual_seed(i), "normal", _hints(rule))
            try:
                gm, inputs, outs = b.build()
            except _Invalid:
                continue
            root = next(n for n in gm.graph.nodes if n.name == "y")
            if isinstance(Pattern(rule).match(gm, root), Match) and all(torch.isfinite(o).all() for o in outs):
                ok += 1
        assert ok >= 3, f"{name}: only {ok}/6 valid instances"
