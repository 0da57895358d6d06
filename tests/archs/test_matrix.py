"""The architecture matrix (tests/archs/matrix.py): every Hugging Face model class listed, built from its
tiny config, through every example pipeline that applies to it; the outcome must be the one written down.

The examples run as written except their `verify dtype f64` steps: the float64 replay re-traces the
whole model (twice the time) and cannot hold at 1e-10 for models that compute their norms in float32
inside (OLMo, LLaMA), which the per-site float64 check of the engine replaces. Verification in fp32
against the original model still gates every pipeline. The default run covers one entry per kind of
mechanism (`fast`); `-m slow` runs the whole matrix. docs/architectures.md is rendered from the same data.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from normc.api import load_rules
from normc.grammar import syntax_tree as T
from normc.pipeline import RunOptions, compile_model

from .matrix import ARCHS, BY_NAME
from .models import build

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_program(stem: str):
    """examples/<stem>.nc, fp32 verification only (see the module docstring)."""
    program = load_rules(EXAMPLES / f"{stem}.nc")
    steps = program.main.pipeline.steps
    program.main.pipeline.steps = [s for s in steps
                                   if not (isinstance(s, T.Verify) and str(s.options.get("dtype", "")) == "f64")]
    return program


@functools.lru_cache(maxsize=4)
def loaded(name: str):
    arch = BY_NAME[name]
    return build(arch.model, arch.config_class, arch.config, arch.inputs)


CASES = [pytest.param(a.name, ex, id=f"{a.name}-{ex}", marks=() if a.fast == ex else pytest.mark.slow)
         for a in ARCHS for ex in a.outcomes]


@pytest.mark.parametrize("name, example", CASES)
def test_architecture(name, example):
    arch = BY_NAME[name]
    want = arch.outcomes[example]
    result = compile_model(example_program(example), loaded(name), RunOptions(write=False, verify_inputs=1))
    report = result.report
    assert result.passed, report["verify"]["failure"]
    before, after = report["graph"]["before"]["op_counts"], report["graph"]["after"]["op_counts"]
    for op, (n_before, n_after) in want.ops.items():
        assert (before.get(op, 0), after.get(op, 0)) == (n_before, n_after), (op, before, after)
    rules = {r["name"]: r for r in report["rules"]}
    for rule, n in want.applied.items():
        assert rules[rule]["applied"] == n, (rule, rules[rule]["applied"], rules[rule]["skipped"][:3])
    if want.reason:
        first = next(iter(want.applied))
        reasons = [s["reason"] for s in rules[first]["skipped"]]
        assert any(want.reason in r for r in reasons), reasons
    # every refusal says what it is about: a reason, naming a node
    for rule in report["rules"]:
        for skipped in rule["skipped"]:
            assert "`" in skipped["reason"] and "an optional operand is absent" not in skipped["reason"], skipped


def test_matrix_covers_the_families():
    assert len({a.model for a in ARCHS}) >= 30
    families = {a.family for a in ARCHS}
    assert {"decoder LM", "encoder", "encoder-decoder's encoder", "vision transformer", "CNN"} <= families
    fast = [a for a in ARCHS if a.fast]
    assert fast and all(a.fast in a.outcomes for a in fast)


def test_architecture_table_is_current():
    """docs/architectures.md is rendered from the matrix: `python -m tests.archs.table` rewrites it."""
    from .table import DOC, render
    assert DOC.read_text() == render(), "docs/architectures.md is stale: run `python -m tests.archs.table`"
