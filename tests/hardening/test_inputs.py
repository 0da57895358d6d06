"""Bad input gives a located exit-2 error, never an internal one: string escapes, numbers,
nesting depth, non-UTF-8 bytes, verify options, --samples, and failing `let` math (issue 13)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normc.api import load_rules
from normc.cli import main
from normc.grammar.diagnostics import NcError
from normc.grammar.literals import LiteralError, decode_number, decode_string
from normc.grammar.parser import MAX_DEPTH, parse_file, parse_text
from normc.pipeline import RunOptions, compile_model
from tests.conftest import loaded_model

RULE = "rule r {{ match y = relu(x) let v = {} rewrite y = relu(x) }}"


def error_of(source: str, file: str = "t.nc") -> NcError:
    with pytest.raises(NcError) as info:
        load_rules(text=source) if file == "<string>" else parse_text(source, file)
    return info.value


# ------------------------------------------------------------------ strings
@pytest.mark.parametrize("text, value", [
    (r'"a\nb"', "a\nb"), (r'"\t\\\""', '\t\\"'), (r'"\x41\u00e9\U0001F600"', "Aé\U0001F600"),
    (r'"\N{GREEK SMALL LETTER ALPHA}"', "α"), ('"plain"', "plain"), ('""', ""), (r'"\0"', "\0"),
])
def test_string_escapes_decode(text, value):
    assert decode_string(text) == value
    assert parse_text(RULE.format(text)).rules[0].lets[0].expr.value == value


@pytest.mark.parametrize("escape, message", [
    (r"\N{NO SUCH NAME}", "no Unicode character is named `NO SUCH NAME`"),
    (r"\x4", "`\\x` needs exactly 2 hexadecimal digits"),
    (r"\u12", "`\\u` needs exactly 4 hexadecimal digits"),
    (r"\UFFFFFFFF", "beyond the last Unicode code point"),
    (r"\ud800", "is a surrogate"),
    (r"\q", "unknown escape `\\q`"),
    (r"\N", "`\\N` needs a character name in braces"),
])
def test_bad_escape_is_located(escape, message):
    source = "# a comment\n" + RULE.format(f'"ab{escape}"')
    e = error_of(source)
    d = e.diagnostics[0]
    assert message in d.message
    assert (d.loc.file, d.loc.line) == ("t.nc", 2)
    assert source.splitlines()[1][d.loc.column - 1] == "\\"  # the caret is on the backslash
    assert "^" in e.render() and "fix:" in e.render()


# ------------------------------------------------------------------ numbers
def test_huge_integer_is_located():
    e = error_of(RULE.format("1" * 5000))
    assert "too large" in e.diagnostics[0].message and e.diagnostics[0].loc.column == 36
    assert len(e.render()) < 1000  # the 5,000 digits are not echoed whole


def test_float_overflow_is_located():
    assert "too large for a float" in error_of(RULE.format("1e999")).diagnostics[0].message
    assert decode_number("1e308") == 1e308
    assert decode_number("9223372036854775807") == 2 ** 63 - 1
    with pytest.raises(LiteralError):
        decode_number("9223372036854775808")


def test_huge_dim_and_calibration_count_are_located():
    assert "too large" in error_of("input x: f32[" + "9" * 40 + "]").diagnostics[0].message
    assert "too large" in error_of('pipeline { calibrate from "random" samples ' + "9" * 5000 + " }").diagnostics[0].message


# ------------------------------------------------------------------ nesting depth
@pytest.mark.parametrize("expr", [
    "-" * 10_000 + "1", "not " * 5_000 + "true", "+".join(["1"] * 20_000), "sqrt(" * 500 + "1" + ")" * 500,
    "[" * 300 + "1" + "]" * 300, "x" + "[0]" * 300, "2 ** " * 300 + "2",
])
def test_deep_nesting_is_refused_with_the_limit(expr):
    e = error_of(RULE.format(expr))
    assert e.diagnostics[0].message == f"expression nested too deeply (limit {MAX_DEPTH})"
    assert e.diagnostics[0].loc.line == 1 and e.diagnostics[0].loc.column >= 36


def test_deep_pattern_is_refused():
    src = "rule r { match y = " + "relu(" * 300 + "x" + ")" * 300 + " rewrite y = relu(x) }"
    assert "nested too deeply" in error_of(src).diagnostics[0].message


@pytest.mark.parametrize("expr", [
    "-" * (MAX_DEPTH - 1) + "1", "+".join(["1"] * MAX_DEPTH), "sqrt(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1),
    "2 ** " * (MAX_DEPTH - 1) + "2",
])
def test_nesting_up_to_the_limit_is_checked_without_recursion_error(expr):
    # the whole front end (parse, build, check) must cope with every depth the parser accepts
    source = f"rule r {{ match y = relu(x) where {'not ' * (MAX_DEPTH - 1)}true let v = {expr} rewrite y = relu(x) }}"
    load_rules(text=source + "\npipeline { apply r }")


# ------------------------------------------------------------------ encoding
def test_non_utf8_file_is_located(tmp_path):
    path = tmp_path / "bad.nc"
    path.write_bytes(b"# fine\nrule r\xff { }\n")
    with pytest.raises(NcError) as info:
        parse_file(path)
    d = info.value.diagnostics[0]
    assert (d.loc.line, d.loc.column) == (2, 7) and "0xff is not UTF-8" in d.message
    path.write_bytes(b'pipeline { calibrate from "caf\xe9" }\n')  # latin-1 inside a string
    with pytest.raises(NcError) as info:
        parse_file(path)
    assert info.value.diagnostics[0].loc.column == 31


def test_non_utf8_file_exits_2_from_the_cli(tmp_path):
    path = tmp_path / "bad.nc"
    path.write_bytes(b"rule \x80\x81 { }\n")
    result = CliRunner().invoke(main, ["check", str(path), "zoo:cnn"])
    assert result.exit_code == 2, result.output
    assert "bad.nc:1:6" in result.output and "not UTF-8" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ verify options, --samples
@pytest.mark.parametrize("opts, words", [
    ("rel nan", "`verify rel` is not a number"), ("rel -1", "`verify rel` must be greater than 0"),
    ("rel 0", "must be greater than 0"), ("max_rel inf", "is not a number"),
    ("max_abs -1e-3", "must not be negative"), ("samples 0", "must be a positive integer"),
    ("samples 1.5", "must be a positive integer"), ("seed x", "must be an integer"),
    ("dtype f128", "must be one of"), ("approx max_rel -0.1", "`verify approx max_rel` must be greater than 0"),
    ("approx cosine 2", "between -1 and 1"),
])
def test_bad_verify_option_is_refused(opts, words):
    e = error_of(f"pipeline {{\n  verify {opts}\n}}", "<string>")
    assert words in e.diagnostics[0].message and e.diagnostics[0].loc.line == 2


def test_good_verify_options_are_accepted():
    load_rules(text="pipeline { verify rel 1e-4 max_abs 0 samples 2 seed 3 dtype f64 approx cosine 0.99 }")


@pytest.mark.parametrize("step, words", [
    ("export onnx opset 0", "is not an ONNX opset"), ("export onnx opset 18.5", "is not an ONNX opset"),
    ('calibrate from "random" samples 0', "must be at least 1"),
    ("apply std.smooth(alpha = 1 / 0)", "cannot compute `alpha` of `std.smooth`: division by zero"),
])
def test_bad_step_values_are_refused(step, words):
    assert words in error_of(f"pipeline {{ {step} }}", "<string>").diagnostics[0].message


def test_samples_option_must_be_positive():
    result = CliRunner().invoke(main, ["check", "examples/bn_fold.nc", "zoo:cnn", "--samples", "-1"])
    assert result.exit_code == 2 and "--samples" in result.output


# ------------------------------------------------------------------ failing math refuses the site
@pytest.mark.parametrize("let, reason", [
    ("1 / 0", "division by zero"), ("eps / 0", "division by zero"), ("10.0 ** 400", "`**` failed"),
    ("(0 - 1) ** 0.5", "no real result"), ("9223372036854775807 ** 9223372036854775807", "too large to compute"),
    ("sqrt(0 - var)", "non-finite"),
])
def test_let_math_failure_refuses_the_site(let, reason):
    program = load_rules(text=f"""
rule r {{ match y = batch_norm(c, mean, var, gamma, beta, eps = eps)
  let s = {let}
  rewrite y = batch_norm(c, mean, var, gamma * s, beta, eps = eps) }}
pipeline {{ apply r }}""")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    result = compile_model(program, loaded_model(model, torch.randn(1, 3, 8, 8)), RunOptions(write=False))
    (rule,) = result.report["rules"]
    assert rule["applied"] == 0 and len(rule["skipped"]) == 1
    assert reason in rule["skipped"][0]["reason"]


def test_apply_argument_of_the_wrong_kind_is_a_check_error():
    # found by the fuzzer: these reached the evaluator and raised TypeError
    for arg in ('rank(("" < -2))', "false[::2]"):
        e = error_of(f"pipeline {{ apply std.smooth(alpha = {arg}) }}", "<string>")
        assert "cannot compute `alpha` of `std.smooth`" in e.diagnostics[0].message


def test_guard_that_cannot_be_evaluated_refuses_the_site():
    program = load_rules(text='rule r { match y = relu(x) where "a" < 2 rewrite y = relu(x) }\npipeline { apply r }')
    result = compile_model(program, loaded_model(nn.Sequential(nn.ReLU()).eval(), torch.randn(2, 3)), RunOptions(write=False))
    (rule,) = result.report["rules"]
    assert rule["applied"] == 0 and "could not be evaluated" in rule["skipped"][0]["reason"]
