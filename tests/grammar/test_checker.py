"""The static checker and the loader: every error kind is located and suggests a fix; std checks clean."""
from __future__ import annotations

from pathlib import Path

import pytest

from normc.api import load_rules
from normc.grammar.checker import load_and_check
from normc.grammar.diagnostics import NcError, did_you_mean, nearest
from normc.grammar.loader import STD_DIR, load_std

OK_RULE = "rule ok {{ match y = relu(x) {body} rewrite y = relu(x) }}"

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bn_fold.nc"


def errors(text: str) -> list:
    with pytest.raises(NcError) as info:
        load_rules(text=text)
    return info.value.diagnostics


def first(text: str):
    return errors(text)[0]


def col_of(text: str, token: str, start: int = 0) -> int:
    return text.index(token, start) + 1


# ------------------------------------------------------------------ the standard library
def test_std_library_checks_clean():
    program = load_and_check(text="use std", file="<std-check>")
    std_files = sorted(p.stem for p in STD_DIR.glob("*.nc"))
    assert {"bn", "recognize"} <= set(std_files)
    assert sorted(g[len("std."):] for g in program.groups) == std_files
    assert "std.fold_bn_conv" in program.rules and "std.fold_bn_linear" in program.rules
    for name, rule in program.rules.items():
        assert rule.qualname == name
        assert rule.doc, f"{name} has no doc"


def test_examples_check_clean():
    program = load_rules(EXAMPLE)
    assert program.resolve("std.bn") == ["std.fold_bn_conv", "std.fold_bn_conv_transpose", "std.fold_bn_linear"]
    assert program.main.pipeline is not None


def test_load_std_groups_keep_file_order():
    std = load_std()
    assert std.groups["std.bn"] == ["std.fold_bn_conv", "std.fold_bn_conv_transpose", "std.fold_bn_linear"]
    assert std.groups["std.recognize"][0].startswith("std.")


# ------------------------------------------------------------------ names
def test_unknown_op_suggests_nearest():
    src = "rule r {\n  match y = batch_nrom(x, m?, v?, g?, b?)\n  rewrite y = relu(x)\n}"
    d = first(src)
    assert "unknown op `batch_nrom`" in d.message and d.hint == "did you mean `batch_norm`?"
    assert (d.loc.line, d.loc.column) == (2, 13)


def test_unknown_op_alias_suggests_conv2d():
    d = first("rule r { match y = conv2(x, w, b?) rewrite y = relu(x) }")
    assert "conv" in d.hint


def test_unknown_function_suggests_nearest():
    d = first(OK_RULE.format(body="let s = sqr(x)"))
    assert "unknown function `sqr`" in d.message and "`sqrt`" in d.hint


def test_unbound_name_suggests_nearest():
    src = "rule r { match y = batch_norm(x, mean, var, gamma, beta) let s = gama / sqrt(var) rewrite y = relu(x) }"
    d = first(src)
    assert "`gama` is not bound" in d.message and d.hint == "did you mean `gamma`?"
    assert d.loc.column == col_of(src, "gama /")


def test_unknown_rule_in_pipeline_suggests_nearest():
    d = first("use std.bn\npipeline {\n  apply std.fold_bn_cnv\n}")
    assert "unknown rule `std.fold_bn_cnv`" in d.message and d.hint == "did you mean `std.fold_bn_conv`?"
    assert (d.loc.line, d.loc.column) == (3, 3)


def test_unknown_module_in_use():
    d = first("use std.bnn")
    assert "unknown module `std.bnn`" in d.message and "std.bn" in d.hint


def test_missing_use_path(tmp_path):
    d = first('use "nope.nc"')
    assert "cannot find `nope.nc`" in d.message


def test_use_path_imports_rules_under_alias(tmp_path):
    (tmp_path / "lib.nc").write_text("rule r(a: float = 2) { match y = relu(x) rewrite y = relu(x) }")
    main = tmp_path / "main.nc"
    main.write_text('use "lib.nc" as mine\npipeline { apply mine.r(a = 3) apply mine }')
    program = load_rules(main)
    assert program.resolve("mine.r") == ["mine.r"] and program.resolve("mine") == ["mine.r"]
    main.write_text('use "lib.nc"\npipeline { apply lib.r }')
    assert load_rules(main).resolve("lib.r") == ["lib.r"]


def test_rule_and_group_with_the_same_name_are_reported(tmp_path):
    (tmp_path / "lib.nc").write_text("rule r { match y = relu(x) rewrite y = relu(x) }")
    main = tmp_path / "main.nc"
    main.write_text('use "lib.nc" as a\nrule a { match y = relu(x) rewrite y = relu(x) }\npipeline { apply a }')
    with pytest.raises(NcError) as info:
        load_rules(main)
    assert "`a`" in info.value.diagnostics[0].message


def test_rule_defined_twice():
    d = first(OK_RULE.format(body="") + "\n" + OK_RULE.format(body=""))
    assert "defined twice" in d.message and d.loc.line == 2


def test_builtin_name_as_pattern_variable():
    d = first("rule r { match y = conv(x, f32, b?) rewrite y = relu(x) }")
    assert "built-in name" in d.message


# ------------------------------------------------------------------ arity
def test_op_pattern_with_too_many_arguments():
    d = first("rule r {\n  match y = relu(x, z, q)\n  rewrite y = relu(x)\n}")
    assert "`relu` takes at most 1" in d.message and "got 3" in d.message
    assert (d.loc.line, d.loc.column) == (2, 13)


def test_op_pattern_with_missing_operands():
    d = first("rule r { match y = conv(x) rewrite y = relu(x) }")
    assert "`w`, `b` not given" in d.message and "`name?`" in d.hint


def test_op_pattern_unknown_keyword():
    d = first("rule r { match y = conv(x, w, b?, strde = 1) rewrite y = relu(x) }")
    assert "no argument `strde`" in d.message and "`stride`" in d.hint


def test_builtin_arity_and_keywords():
    assert "`sqrt` takes 1 arguments; got 2" in first(OK_RULE.format(body="let s = sqrt(x, x)")).message
    d = first(OK_RULE.format(body="let s = clamp(x, mn = 1)"))
    assert "no keyword `mn`" in d.message and "`min`" in d.hint


def test_rewrite_op_missing_required_operand():
    assert "`conv` needs `w`" in first("rule r { match y = conv(x, w, b?) rewrite y = conv(x) }").message


def test_apply_arity_and_keyword_parameters():
    rule = "rule r(alpha: float = 1) { match y = relu(x) rewrite y = relu(x) }\n"
    assert "takes 1 parameters; got 2" in first(rule + "pipeline { apply r(1, 2) }").message
    d = first(rule + "pipeline { apply r(alph = 2) }")
    assert "no parameter `alph`" in d.message and "`alpha`" in d.hint
    assert "group of rules" in first("use std.bn pipeline { apply std.bn(1) }").message
    d = first("use std.bn pipeline { apply std.bn(foo = 1) }")
    assert "in group `std.bn` has no parameter `foo`" in d.message


def test_apply_without_a_required_parameter():
    d = first("rule r(alpha: float) { match y = relu(x) rewrite y = relu(x) }\npipeline { apply r }")
    assert "alpha" in d.message


def test_parameter_type_mismatch():
    d = first('rule r(alpha: float = 1) { match y = relu(x) rewrite y = relu(x) }\npipeline { apply r(alpha = "hi") }')
    assert "alpha" in d.message


# ------------------------------------------------------------------ types
def test_where_that_is_a_number():
    src = "rule r {\n  match y = relu(x)\n  where 3\n  rewrite y = relu(x)\n}"
    d = first(src)
    assert "`where` clause is not a condition" in d.message
    assert (d.loc.line, d.loc.column) == (3, 9)


@pytest.mark.parametrize("where", ["rank(w)", "w", "shape(w)", "b ?? 3"])
def test_where_that_is_not_a_condition(where):
    d = first(f"rule r {{ match y = conv(x, w, b?) where {where} rewrite y = relu(x) }}")
    assert "not a condition" in d.message


def test_boolean_operators_need_conditions():
    d = first(OK_RULE.format(body="where 1 and true"))
    assert "`and` needs conditions on both sides; this is a number" in d.message
    assert "`not` needs a condition" in first(OK_RULE.format(body='where not "a"')).message


@pytest.mark.parametrize("expr, word", [('"a" + 1', "string"), ("[1] * 2", "shape"), ("true - 1", "bool")])
def test_arithmetic_on_non_numbers(expr, word):
    d = first(OK_RULE.format(body=f"let s = {expr}"))
    assert f"cannot take a {word}" in d.message


def test_negating_a_string():
    assert "cannot negate a string" in first(OK_RULE.format(body='let s = -"a"')).message


def test_op_outside_rewrite_and_guard_outside_where():
    d = first(OK_RULE.format(body="let s = relu(x)"))
    assert "op `relu` cannot be called in `let`" in d.message
    d = first(OK_RULE.format(body="let s = single_use(x)"))
    assert "guard: it belongs in `where`" in d.message
    d = first("rule r { match y = conv(x, w, b?) rewrite y = conv(x, w, single_use(w)) }")
    assert "guard" in d.message


# ------------------------------------------------------------------ structure
def test_rule_without_match_or_rewrite():
    assert "has no `match` clause" in first("rule r { rewrite y = relu(x) }").message
    assert "has no `rewrite` clause" in first("rule r { match y = relu(x) }").message
    load_rules(text="rule r { structural match y = relu(x) }")  # structural rules may only match


def test_matched_twice_and_let_rebinding():
    assert "`y` is matched twice" in first("rule r { match y = relu(x) y = relu(z) rewrite y = relu(x) }").message
    assert "`w` is already bound" in first("rule r { match y = conv(x, w, b?) let w = 1 rewrite y = relu(x) }").message


def test_rewrite_targets():
    d = first("rule r { match y = relu(x) let s = 1 rewrite s = relu(x) }")
    assert "`s` is not a graph value" in d.message
    d = first("rule r { match y = conv(x, w, b?) rewrite y = sqrt(w) }")
    assert "a rewrite must produce an op call" in d.message
    # a new value, read by a later rewrite
    load_rules(text="rule r { match y = relu(x) rewrite t = sigmoid(x) y = mul(t, x) }")
    # ... but only after it is defined
    d = first("rule r { match y = relu(x) rewrite y = mul(t, x) t = sigmoid(x) }")
    assert "`t` is not bound" in d.message


def test_misspelled_rewrite_target_is_an_error():
    d = first("rule r { match y = relu(x) rewrite yy = sigmoid(x) }")
    assert "yy" in d.message and "`y`" in (d.hint or "")


def test_fan_out_reductions():
    load_rules(text="""
rule r {
  match   h = relu(x)
          each u in users(h): o = linear(h, w, b?)
  let     s = max_u(absmax(w, dim = 0))
  rewrite h = relu(x)
          each u: o = linear(h, w * s, b)
}""")
    d = first("rule r { match h = relu(x) let s = max_q(x) rewrite h = relu(x) }")
    assert "unknown function `max_q`" in d.message
    d = first("rule r { match h = relu(x) each u in users(h): o = linear(h, w, b?) let s = max_u(w, w) "
              "rewrite h = relu(x) }")
    assert "`max_u` takes one expression" in d.message


def test_each_rewrite_without_fan_out_and_unbound_fan_out_source():
    d = first("rule r { match y = relu(x) rewrite each u: y = relu(x) }")
    assert "`each u` names no fan-out" in d.message
    d = first("rule r { match y = relu(x) each u in users(q): z = relu(y) rewrite y = relu(x) }")
    assert "`q` is not bound by the match" in d.message


def test_fan_out_rule_checks_clean():
    load_rules(text="""
rule fold {
  match   h = layer_norm(x, g, beta)
          each u in users(h): y = linear(h, w, b?)
  where   rank(g) == 1
  let     s = g * 1
  rewrite h = layer_norm(x)
          each u: y = linear(h, w * s, (b ?? 0) + sum(w * beta, dim = 1))
}""")


def test_pipeline_options():
    assert "unknown verify option `max_abz`" in first("pipeline { verify max_abz 1 }").message
    assert "unknown approx gate `cosin`" in first("pipeline { verify approx cosin 1 }").message
    d = first('pipeline { export onx to "a.onnx" }')
    assert "unknown export format `onx`" in d.message and "`onnx`" in d.hint
    assert "has no option `opsett`" in first('pipeline { export onnx opsett 18 to "a.onnx" }').message


def test_declarations():
    d = first("input x: f33[1, 2]")
    assert "unknown dtype `f33`" in d.message and "`f32`" in d.hint
    d = first("rule r(a: flot = 1) { match y = relu(x) rewrite y = relu(x) }")
    assert "unknown parameter type `flot`" in d.message and "`float`" in d.hint
    assert "must be implemented inside normc.passes" in first('pass p { impl "os:system" }').message


def test_all_errors_are_reported_together_with_source():
    with pytest.raises(NcError) as info:
        load_rules(text="rule r { match y = relu(x) let s = foo(x); t = bar(x) rewrite y = relu(x) }")
    err = info.value
    assert [d.message for d in err.diagnostics] == ["unknown function `foo`", "unknown function `bar`"]
    text = err.render()
    assert text.count("error:") == 2 and text.count("^") == 6
    assert err.exit_code == 2


def test_nearest_and_did_you_mean():
    assert nearest("lienar", ["linear", "conv"]) == "linear"
    assert nearest("zzz", ["linear", "conv"]) is None
    assert did_you_mean("cnv", ["conv"]) == "did you mean `conv`?"
    assert did_you_mean("qqqq", ["conv"]) is None
