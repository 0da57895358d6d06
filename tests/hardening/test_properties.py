"""Property-based tests of the front end (hypothesis): generated well-formed programs parse,
literals round-trip, nesting is refused exactly past the limit, and random or damaged programs
raise normc's own error type and nothing else (issue 13). Derandomized, so every run tries the
same examples; tools/fuzz_nc.py explores further (docs/fuzzing.md)."""
from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normc.errors import NormcError
from normc.grammar.checker import load_and_check
from normc.grammar.diagnostics import NcError
from normc.grammar.literals import decode_number, decode_string
from normc.grammar.parser import MAX_DEPTH, decode_source, parse_text
from tools import ncgen

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
RULE = "rule r {{ match y = relu(x) let v = {} rewrite y = relu(x) }}"


def only_normc_errors(text: str) -> None:
    try:
        load_and_check(text=text, file="gen.nc")
    except NormcError as e:
        assert e.render()  # and it renders


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_well_formed_programs_parse_and_check_cleanly(rng):
    text = ncgen.program(rng, valid_literals=True)
    parse_text(text, "gen.nc")  # must not raise: the program is well-formed
    only_normc_errors(text)


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_programs_with_bad_literals_raise_only_normc_errors(rng):
    only_normc_errors(ncgen.program(rng))


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_damaged_programs_raise_only_normc_errors(rng):
    data = ncgen.mutate(ncgen.program(rng, valid_literals=rng.random() < 0.5), rng)
    try:
        text = decode_source(data, "gen.nc")
    except NcError:
        return
    only_normc_errors(text)


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_random_expressions_check_or_fail_cleanly(rng):
    expr = ncgen.expression(rng, depth=rng.randrange(1, 8), names=["x", "eps"])
    only_normc_errors(RULE.format(expr))
    only_normc_errors(f"pipeline {{ apply std.smooth(alpha = {ncgen.expression(rng, 5, names=('none', '2'))}) }}")


def escape(s: str, rng) -> str:
    """`s` as a .nc string literal, each character written raw or as one of its escapes."""
    out = []
    for ch in s:
        cp = ord(ch)
        forced = ch in '"\\\n'
        k = rng.randrange(5)
        if forced and k == 0:
            k = 1
        if k == 0:
            out.append(ch)
        elif k == 1 or (k == 2 and cp > 0xFF) or (k == 3 and cp > 0xFFFF):
            out.append(f"\\U{cp:08x}")
        elif k == 2:
            out.append(f"\\x{cp:02X}")
        elif k == 3:
            out.append(f"\\u{cp:04x}")
        else:
            simple = {"\n": "\\n", "\t": "\\t", "\\": "\\\\", '"': '\\"', "\r": "\\r", "\0": "\\0"}
            out.append(simple.get(ch, f"\\U{cp:08X}"))
    return '"' + "".join(out) + '"'


@SETTINGS
@given(st.text(max_size=40), st.randoms(use_true_random=False))
def test_strings_round_trip_through_escapes(s, rng):
    literal = escape(s, rng)
    assert decode_string(literal) == s
    assert parse_text(RULE.format(literal)).rules[0].lets[0].expr.value == s


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list('abc"\\xuUN{}0123456789 ')), max_size=30))
def test_any_string_body_decodes_or_is_located(body):
    source = RULE.format('"' + body.replace("\n", "") + '"')
    try:
        parse_text(source, "s.nc")
    except NcError as e:
        d = e.diagnostics[0]
        assert d.loc.line == 1 and 1 <= d.loc.column <= len(source)


@SETTINGS
@given(st.integers(min_value=0, max_value=2 ** 63 - 1))
def test_integers_round_trip(n):
    assert decode_number(str(n)) == n


@SETTINGS
@given(st.integers(min_value=2 ** 63, max_value=10 ** 4000))  # hypothesis cannot print longer ints
def test_integers_past_64_bits_are_located(n):
    try:
        parse_text(RULE.format(n), "n.nc")
    except NcError as e:
        assert "too large" in e.diagnostics[0].message and e.diagnostics[0].loc.column == 36
    else:
        raise AssertionError("accepted")


@SETTINGS
@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_floats_round_trip(f):
    text = repr(f)
    assert math.isfinite(decode_number(text)) and decode_number(text) == f


@SETTINGS
@given(st.integers(min_value=1, max_value=3 * MAX_DEPTH),
       st.sampled_from(["-{}", "not {}", "sqrt({})", "[{}]", "{}[0]", "{} + 1", "2 ** {}", "f({})"]))
def test_nesting_is_refused_exactly_past_the_limit(depth, form):
    expr = "x" if form != "not {}" else "true"
    for _ in range(depth):
        expr = form.format(expr)
    try:
        parse_text(RULE.format(expr), "d.nc")
    except NcError as e:
        assert depth > MAX_DEPTH and e.diagnostics[0].message == f"expression nested too deeply (limit {MAX_DEPTH})"
    else:
        assert depth <= MAX_DEPTH
