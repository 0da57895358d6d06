"""The `quantize int8 { ... }` step in the language: parsing, located errors with nearest names, schemes."""
from __future__ import annotations

import pytest

from normc.api import load_rules
from normc.grammar.diagnostics import NcError
from normc.quantize.settings import Scheme, default_scheme, entry_scheme

from .conftest import step_of


def errors(body: str) -> list:
    with pytest.raises(NcError) as info:
        load_rules(text="pipeline {\n  quantize int8 {\n" + body + "\n  }\n}")
    return info.value.diagnostics


def test_full_block_parses_and_checks():
    program = load_rules(text='''pipeline {
  quantize int8 {
    default: weights int8 per_channel symmetric, activations uint8 static asymmetric
    on "*.output.dense": activations per_token dynamic
    match linear(gelu(x), w, b?) where single_use(x): keep fp32
  }
  verify approx min_cosine 0.998 approx mean_cosine 0.999 samples 256 data "builtin:heldout"
}''')
    step = program.main.pipeline.steps[0]
    assert [e.kind for e in step.entries] == ["default", "on", "match"]
    assert step.entries[1].glob == "*.output.dense"
    assert step.entries[2].pattern.op == "linear" and step.entries[2].where is not None


@pytest.mark.parametrize("body, message, hint, line, token", [
    ("    default: weight int8", "unknown quantization setting `weight`", "did you mean `weights`?", 3, "weight"),
    ("    default: activations uint8 statc", "`statc` is not a word of `activations`", "did you mean `static`?", 3, "statc"),
    ('    on "x": first_tokens 0', "`first_tokens` takes one positive integer", "e.g. `first_tokens 1`", 3, "0"),
    ("    default: weights per_group", "`per_group` needs a positive integer", "e.g. `per_group 128`", 3, "per_group"),
    ("    default: activations per_token static", "need `dynamic`", "per_token dynamic", 3, "activations"),
    ("    default: activations fp32 dynamic", "fp32 activations are not quantized", "uint8", 3, "activations"),
    ("    default: weights per_tensor per_channel", "contradicts an earlier word", "one choice", 3, "per_channel"),
    ("    match lnear(x, w, b?): keep fp32", "unknown op `lnear`", "did you mean `linear`?", 3, "lnear"),
    ("    match relu(x): keep fp32", "its root op is `relu`", "match linear(", 3, "relu"),
    ("    match linear(gelu(x), w, b?) where single_us(x): keep fp32", "unknown function `single_us`",
     "did you mean `single_use`?", 3, "single_us"),
    ("    match linear(x, w, b?) where y > 1: keep fp32", "`y` is not bound", None, 3, "y >"),
])
def test_wrong_words_are_located_with_a_fix(body, message, hint, line, token):
    d = errors(body)[0]
    assert message in d.message
    if hint:
        assert hint in (d.hint or "")
    assert (d.loc.line, d.loc.column) == (line, body.index(token) + 1)


def test_unknown_precision_and_two_defaults():
    with pytest.raises(NcError) as info:
        load_rules(text="pipeline { quantize int4 { default: keep fp32\n default: keep fp32 } }")
    messages = [d.message for d in info.value.diagnostics]
    assert "unknown precision `quantize int4`" in messages[0]
    assert any("at most one `default:`" in m for m in messages)


def test_every_error_is_reported_at_once():
    assert len(errors("    default: weight int8, activations statc\n    on \"x\": keep fp16")) == 3


def test_defaults_are_onnxruntimes_x86_choice():
    s = default_scheme(step_of(""))
    assert s == Scheme() and s.quantized and s.act == "uint8" and not s.act_symmetric
    assert s.weight_granularity == "per_channel" and s.weight_range == "auto"
    assert s.reduce_range(True) and not s.reduce_range(False)


@pytest.mark.parametrize("words, expect", [
    ("keep fp32", {"quantized": False}),
    ("activations fp32", {"act": "fp32"}),
    ("activations per_token dynamic", {"act_dynamic": True, "act_granularity": "per_token"}),
    ("activations int8 symmetric", {"act": "int8", "act_symmetric": True}),
    ("first_tokens 2", {"first_tokens": 2}),
    ("weights per_group 64 full_range", {"weight_granularity": "per_group", "weight_group": 64, "weight_range": "full"}),
])
def test_each_scheme_word(words, expect):
    step = step_of('on "x": ' + words)
    s = entry_scheme(default_scheme(step), step.entries[0])
    for k, v in expect.items():
        assert getattr(s, k) == v, k
    assert s.weight_only == (words == "activations fp32")


def test_later_entries_override_earlier_words_only():
    step = step_of('default: keep fp32\n on "a": activations per_token dynamic\n on "a": weights per_tensor')
    s = default_scheme(step)
    assert not s.quantized
    s = entry_scheme(entry_scheme(s, step.entries[1]), step.entries[2])
    assert s.quantized and s.act_dynamic and s.weight_granularity == "per_tensor"


def test_minilm_example_checks_clean():
    from pathlib import Path
    program = load_rules(Path(__file__).resolve().parents[2] / "examples" / "minilm_int8.nc")
    kinds = [type(s).__name__ for s in program.main.pipeline.steps]
    assert kinds == ["Calibrate", "Apply", "Verify", "Quantize", "Verify"]
