"""The parser: every construct of normc.lark becomes the right typed AST node, with locations."""
from __future__ import annotations

from pathlib import Path

import pytest

from normc.grammar import syntax_tree as T
from normc.grammar.diagnostics import NcError
from normc.grammar.parser import parse_file, parse_text
from normc.errors import NormcError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bn_fold.nc"


def let_expr(expr: str):
    """The AST of one expression, parsed as the `let` of a minimal rule."""
    module = parse_text(f"rule r {{ match y = relu(x) let v = {expr} rewrite y = relu(x) }}")
    return module.rules[0].lets[0].expr


def match_of(match: str) -> list:
    return parse_text(f"rule r {{ match {match} rewrite y = relu(x) }}").rules[0].match


def steps(body: str) -> list:
    return parse_text(f"pipeline {{ {body} }}").pipeline.steps


def syntax_error(source: str):
    with pytest.raises(NcError) as info:
        parse_text(source, "bad.nc")
    return info.value.diagnostics[0]


# ------------------------------------------------------------------ top level
def test_empty_file_and_comments():
    m = parse_text("# only a comment\n\n   # another\n")
    assert (m.uses, m.inputs, m.rules, m.passes, m.pipeline) == ([], [], [], [], None)


def test_use_forms():
    m = parse_text('use std.bn\nuse std.bn as bn\nuse "lib/my.nc" as mine\nuse "x.nc"')
    assert [(u.target, u.alias, u.is_path) for u in m.uses] == [
        ("std.bn", None, False), ("std.bn", "bn", False), ("lib/my.nc", "mine", True), ("x.nc", None, True)]
    assert m.uses[2].loc.line == 3 and m.uses[2].loc.column == 1


def test_input_with_and_without_range():
    m = parse_text("input x: f32[1, 3, 224, 224]\ninput ids: i64[1, 16] in 0 .. 256\n"
                   "input z: f16[4] in -1.5 .. 2e1")
    x, ids, z = m.inputs
    assert (x.name, x.dtype, x.shape, x.range) == ("x", "f32", [1, 3, 224, 224], None)
    assert (ids.dtype, ids.shape, ids.range) == ("i64", [1, 16], (0, 256))
    assert isinstance(ids.range[1], int)
    assert z.range == (-1.5, 20.0)


def test_input_range_without_spaces():
    m = parse_text("input ids: i64[1, 16] in 0..256\ninput x: f32[2] in -1..1")
    assert [i.range for i in m.inputs] == [(0, 256), (-1, 1)]


# ------------------------------------------------------------------ rules
def test_rule_params_with_defaults_including_negative():
    src = ('rule r(alpha: float = 0.5, k: int = -3, eps: float = -1e-5, flag: bool = true, off: bool = false, '
           's: string = "hi", n: float = none, req: float) { match y = relu(x) rewrite y = relu(x) }')
    params = parse_text(src).rules[0].params
    assert [(p.name, p.type, p.default) for p in params] == [
        ("alpha", "float", 0.5), ("k", "int", -3), ("eps", "float", -1e-5), ("flag", "bool", True),
        ("off", "bool", False), ("s", "string", "hi"), ("n", "float", None), ("req", "float", T.NO_DEFAULT)]
    assert isinstance(params[1].default, int)
    assert params[0].loc.column == 8


def test_rule_without_params_and_empty_params():
    a, b = parse_text("rule a { match y = relu(x) rewrite y = relu(x) }\n"
                      "rule b() { match y = relu(x) rewrite y = relu(x) }").rules
    assert a.params == [] and b.params == []
    assert (a.name, a.loc.line, a.loc.column) == ("a", 1, 6)


def test_rule_doc_kind_and_defaults():
    src = 'rule r { doc "folds things" approximate match y = relu(x) rewrite y = relu(x) }\n' \
          "rule s { match y = relu(x) rewrite y = relu(x) }\nrule t { structural match y = relu(x) }"
    r, s, t = parse_text(src).rules
    assert (r.doc, r.kind) == ("folds things", "approximate")
    assert (s.doc, s.kind) == ("", "exact")
    assert t.kind == "structural" and t.rewrites == []


def test_string_escapes():
    r = parse_text(r'rule r { doc "say \"hi\"\tnow" match y = relu(x) rewrite y = relu(x) }').rules[0]
    assert r.doc == 'say "hi"\tnow'


def test_nested_pattern():
    (stmt,) = match_of("y = batch_norm(conv2d(x, w, b?), mean, var, gamma, beta)")
    assert isinstance(stmt, T.MatchStmt) and stmt.target == "y"
    assert stmt.call.op == "batch_norm"
    inner = stmt.call.args[0]
    assert isinstance(inner, T.PCall) and inner.op == "conv2d"
    assert [(a.name, a.optional) for a in inner.args] == [("x", False), ("w", False), ("b", True)]
    assert [a.name for a in stmt.call.args[1:]] == ["mean", "var", "gamma", "beta"]


def test_statement_patterns_with_semicolons_and_newlines():
    stmts = match_of("c = conv(x, w, b?);\n y = batch_norm(c, m?, v?, g?, be?, eps = eps)")
    assert [s.target for s in stmts] == ["c", "y"]
    assert stmts[1].call.args[0] == T.PVar("c", False, stmts[1].call.args[0].loc)
    assert stmts[1].loc.line == 2


def test_wildcard_optional_keyword_and_literal_pattern_args():
    (stmt,) = match_of('y = batch_norm(x, _, v?, _, _, eps = e, training = false, momentum = -0.5, '
                       'note = "s", flag = true, n = 3)')
    args = stmt.call.args
    assert isinstance(args[1], T.PWild) and isinstance(args[3], T.PWild)
    assert args[2].optional is True
    kw = dict(stmt.call.kwargs)
    assert kw["eps"] == T.PVar("e", False, kw["eps"].loc)
    assert [kw[k].value for k in ("training", "momentum", "note", "flag", "n")] == [False, -0.5, "s", True, 3]
    assert all(isinstance(kw[k], T.PLit) for k in ("training", "momentum", "note", "flag", "n"))


def test_keyword_pattern_arg_can_be_a_call():
    (stmt,) = match_of("y = add(a = relu(x), b = _)")
    kw = dict(stmt.call.kwargs)
    assert isinstance(kw["a"], T.PCall) and kw["a"].op == "relu"
    assert isinstance(kw["b"], T.PWild)


def test_each_users_fan_out():
    stmts = match_of("h = layer_norm(x, g?, beta?)\n each u in users(h): y_u = linear(h, W_u, b_u?)")
    each = stmts[1]
    assert isinstance(each, T.EachStmt)
    assert (each.var, each.source, each.body.target, each.body.call.op) == ("u", "h", "y_u", "linear")
    assert each.loc.line == 2


def test_each_any_users_is_a_partial_fan_out():
    stmts = match_of("h = relu(x)\n each u in any users(h): o = linear(h, w, b?)")
    assert stmts[1].partial is True
    assert match_of("h = relu(x)\n each u in users(h): o = linear(h, w, b?)")[1].partial is False


def test_where_let_rewrite_and_each_rewrite():
    src = """
rule smooth(alpha: float = 0.5) {
  match   h = layer_norm(x, g, beta, eps = eps); each u in users(h): y_u = linear(h, W_u, b_u)
  where   single_use(x) and not shared(g)
  where   rank(g) == 1
  let     s = clamp(absmax(h) ** alpha, 1e-5); t = s * 2
          z = t
  rewrite h = layer_norm(x, g / s, beta / s, eps = eps)
          each u: y_u = linear(h, W_u * s, b_u)
}"""
    r = parse_text(src).rules[0]
    # two where clauses are joined with `and`
    assert isinstance(r.where, T.Binary) and r.where.op == "and"
    assert isinstance(r.where.right, T.Binary) and r.where.right.op == "=="
    assert isinstance(r.where.left.right, T.Unary) and r.where.left.right.op == "not"
    assert [(l.name, type(l.expr).__name__) for l in r.lets] == [("s", "Call"), ("t", "Binary"), ("z", "Name")]
    assert [(w.target, w.each) for w in r.rewrites] == [("h", None), ("y_u", "u")]
    assert r.rewrites[0].expr.func == "layer_norm"
    assert r.rewrites[0].expr.kwargs[0][0] == "eps"
    assert r.rewrites[1].loc.line == 9


# ------------------------------------------------------------------ expressions
def test_arithmetic_precedence():
    e = let_expr("1 + 2 * 3 - 4 / 5")
    # ((1 + (2 * 3)) - (4 / 5))
    assert e.op == "-" and e.left.op == "+" and e.left.right.op == "*" and e.right.op == "/"


def test_power_is_right_associative_and_binds_tighter_than_unary_minus():
    e = let_expr("2 ** 3 ** 2")
    assert e.op == "**" and e.left.value == 2 and e.right.op == "**"
    assert (e.right.left.value, e.right.right.value) == (3, 2)
    e = let_expr("-x ** 2")
    assert isinstance(e, T.Unary) and e.op == "-" and e.operand.op == "**"
    e = let_expr("a ** -b")
    assert e.op == "**" and isinstance(e.right, T.Unary)


def test_negative_number_literal_is_folded():
    e = let_expr("-2.5")
    assert isinstance(e, T.Num) and e.value == -2.5
    e = let_expr("3 - -2")
    assert e.op == "-" and e.right.value == -2


@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
def test_comparisons(op):
    e = let_expr(f"a + 1 {op} b")
    assert isinstance(e, T.Binary) and e.op == op and e.left.op == "+"


def test_boolean_operators_precedence():
    e = let_expr("not a or b and c")
    # (not a) or (b and c)
    assert e.op == "or" and isinstance(e.left, T.Unary) and e.left.op == "not" and e.right.op == "and"
    e = let_expr("not not a")
    assert e.op == "not" and e.operand.op == "not"


def test_coalesce_is_lowest_and_left_associative():
    e = let_expr("a ?? b ?? c or d")
    assert e.op == "??" and e.left.op == "??" and e.right.op == "or"
    e = let_expr("(b ?? 0) - mean")
    assert e.op == "-" and e.left.op == "??"


def test_literals_true_false_none_strings_numbers():
    assert let_expr("true") == T.Const(True, let_expr("true").loc)
    assert let_expr("false").value is False
    e = let_expr("none")
    assert isinstance(e, T.Const) and e.value is None
    assert let_expr('"a b"').value == "a b"
    assert let_expr("7").value == 7 and isinstance(let_expr("7").value, int)
    assert let_expr("1e-5").value == 1e-5
    assert let_expr(".5").value == 0.5
    assert let_expr("2.").value == 2.0


def test_list_literals():
    e = let_expr("[1, -2, x]")
    assert isinstance(e, T.ListLit) and [type(i).__name__ for i in e.items] == ["Num", "Num", "Name"]
    assert e.items[1].value == -2
    assert let_expr("[]").items == []
    assert isinstance(let_expr("[[1], []]").items[0], T.ListLit)


def test_calls_with_keywords():
    e = let_expr("absmax(w, dim = 0, keepdim = true)")
    assert isinstance(e, T.Call) and e.func == "absmax"
    assert [type(a).__name__ for a in e.args] == ["Name"]
    assert [k for k, _ in e.kwargs] == ["dim", "keepdim"]
    assert let_expr("f()").args == []


def test_indexing_slices_none_ellipsis():
    e = let_expr("w[:, none, ..., 1:2:3]")
    assert isinstance(e, T.Index)
    full, new_axis, dots, sl = e.items
    assert isinstance(full, T.Slice) and (full.start, full.stop, full.step) == (None, None, None)
    assert isinstance(new_axis, T.Const) and new_axis.value is None
    assert isinstance(dots, T.Ellipsis_)
    assert (sl.start.value, sl.stop.value, sl.step.value) == (1, 2, 3)


@pytest.mark.parametrize("text, parts", [
    ("w[1:]", (1, None, None)), ("w[:2]", (None, 2, None)), ("w[::2]", (None, None, 2)),
    ("w[1::]", (1, None, None)), ("w[-1:]", (-1, None, None)),
])
def test_slice_forms(text, parts):
    (sl,) = let_expr(text).items
    assert isinstance(sl, T.Slice)
    assert tuple(None if p is None else p.value for p in (sl.start, sl.stop, sl.step)) == parts


def test_chained_indexing_and_index_of_call():
    e = let_expr("s[0][1]")
    assert isinstance(e, T.Index) and isinstance(e.value, T.Index)
    e = let_expr("sqrt(v)[:, none]")
    assert isinstance(e.value, T.Call)


def test_expression_locations():
    e = let_expr("gamma / sqrt(var + eps)")
    # rule r { match y = relu(x) let v = gamma ...
    assert (e.left.loc.line, e.left.loc.column, e.left.loc.end_column) == (1, 36, 41)
    assert e.right.loc.column == 44  # the call is located at its name


# ------------------------------------------------------------------ pipeline
def test_pipeline_apply_forms():
    a, b, c, d = steps('apply std.bn\n apply smooth(0.8, alpha = -1) on "blocks.*";\n apply r()\n apply my.r on "a"')
    assert (a.rule, a.args, a.kwargs, a.scope) == ("std.bn", [], [], None)
    assert b.rule == "smooth" and b.args[0].value == 0.8 and b.kwargs[0][0] == "alpha" and b.kwargs[0][1].value == -1
    assert b.scope == "blocks.*"
    assert (c.rule, c.args) == ("r", [])
    assert (d.rule, d.scope) == ("my.r", "a")


def test_pipeline_verify_with_approx_gates():
    (v,) = steps("verify max_abs 1e-5 rel 1e-4 dtype f16 samples 8 approx max_rel 0.1 approx cosine 0.99")
    assert v.options == {"max_abs": 1e-5, "rel": 1e-4, "dtype": "f16", "samples": 8}
    assert v.approx == {"max_rel": 0.1, "cosine": 0.99}
    (v,) = steps("verify;")
    assert v.options == {} and v.approx == {}


def test_pipeline_export_and_calibrate():
    e1, e2, e3, c1, c2 = steps('export onnx opset 18 dynamic true_ to "m.onnx"\n export torch to "m.pt2";\n'
                               'export tensorrt fp16 1\n calibrate from "calib.pt" samples 64\n calibrate from "c"')
    assert (e1.format, e1.options, e1.path) == ("onnx", {"opset": 18, "dynamic": "true_"}, "m.onnx")
    assert (e2.format, e2.options, e2.path) == ("torch", {}, "m.pt2")
    assert (e3.format, e3.options, e3.path) == ("tensorrt", {"fp16": 1}, None)
    assert (c1.source, c1.samples) == ("calib.pt", 64)
    assert (c2.source, c2.samples) == ("c", None)


def test_full_example_file_parses():
    m = parse_file(EXAMPLE)
    assert [u.target for u in m.uses] == ["std.bn"]
    assert [type(s).__name__ for s in m.pipeline.steps] == ["Apply", "Verify"]
    assert m.pipeline.steps[1].options == {"rel": 1e-5}


def test_extern_pass_declaration():
    (p,) = parse_text('pass global_x(untie: bool = true) { doc "d" exact impl "normc.passes.x:run" }').passes
    assert (p.name, p.doc, p.kind, p.impl, [q.name for q in p.params]) == ("global_x", "d", "exact", "normc.passes.x:run", ["untie"])


# ------------------------------------------------------------------ syntax errors
def test_unexpected_character_is_located():
    d = syntax_error("rule r {\n  match y = relu(x) $\n}")
    assert (d.loc.file, d.loc.line, d.loc.column) == ("bad.nc", 2, 21)
    assert "unexpected character `$`" in d.message


def test_unexpected_token_lists_what_was_expected():
    d = syntax_error("rule r {\n  match y = relu(x,)\n}")
    assert (d.loc.line, d.loc.column) == (2, 20)
    assert "unexpected `)`" in d.message and "expected" in d.hint


def test_unexpected_end_of_file():
    d = syntax_error("rule r { match y = relu(x)")
    assert "end of file" in d.message


def test_two_pipelines_rejected():
    d = syntax_error("pipeline { }\npipeline { verify }")
    assert d.loc.line == 2 and "at most one" in d.message


def test_render_shows_line_and_caret_under_the_token():
    with pytest.raises(NcError) as info:
        parse_text("use std.bn\npipeline {\n  apply std.bn on 3\n}", "p.nc")
    text = info.value.render()
    lines = text.splitlines()
    assert lines[0].startswith("p.nc:3:19: error:")
    src = next(l for l in lines if l.endswith("apply std.bn on 3"))
    caret = lines[lines.index(src) + 1]
    assert caret.index("^") == src.index("3", src.index("on"))


def test_parse_file_missing_is_a_normc_error(tmp_path):
    with pytest.raises(NormcError) as info:
        parse_file(tmp_path / "nope.nc")
    assert "cannot read rules file" in info.value.message


@pytest.mark.parametrize("source", [
    "rule { match y = relu(x) rewrite y = relu(x) }",        # no name
    "rule r { match y = relu(x) rewrite }",                   # empty rewrite
    "rule r { match relu(x) rewrite y = relu(x) }",           # no target
    "input x: f32[]",                                         # no dims
    "input x: f32[1.5]",                                      # dims are integers
    "pipeline { apply }",
    "pipeline { calibrate samples 3 }",
    "rule r { match y = relu(x?) ? rewrite y = relu(x) }",
])
def test_malformed_sources_are_located_errors(source):
    d = syntax_error(source)
    assert d.loc.line >= 1 and d.loc.column >= 1 and d.message
