"""`impl` targets are resolved when the program is checked: a module under normc.passes and a
function declared with @global_pass; nothing else can be reached (issue 13)."""
from __future__ import annotations

import pytest

from normc.api import load_rules
from normc.grammar.diagnostics import NcError
from normc.grammar.loader import load_std
from normc.passes.registry import PassNotFound, declared, resolve_pass


def check_error(impl: str):
    with pytest.raises(NcError) as info:
        load_rules(text=f'# passes\npass p {{ exact impl "{impl}" }}')
    d = info.value.diagnostics[0]
    assert (d.loc.line, d.loc.column) == (2, 6)  # the pass's name
    return d


@pytest.mark.parametrize("impl, words", [
    ("normc.passes.prenorm:importlib", "does not exist"),
    ("normc.passes.prenorm:torch", "is not declared as a pass"),       # a module attribute, not a pass
    ("normc.passes.prenorm:_to_rms", "is not declared as a pass"),     # a helper function
    ("normc.passes.prenorm:nosuch", "does not exist"),
    ("normc.passes.nosuch:run", "no module `normc.passes.nosuch`"),
    ("normc.passes.registry:global_pass", "is not declared as a pass"),
    ("normc.passes.prenorm", "is not a pass inside normc.passes"),
    ("normc.passes.prenorm:to_rmsnorm()", "is not a pass inside normc.passes"),
    ("normc.passes..x:run", "is not a pass inside normc.passes"),
    ("os:system", "must be implemented inside normc.passes"),
])
def test_bad_impl_is_a_check_error(impl, words):
    d = check_error(impl)
    assert words in d.message and d.hint


def test_every_std_pass_resolves_to_a_declared_pass():
    program = load_std()
    impls = [rule.impl for rule in program.rules.values() if hasattr(rule, "impl")]
    assert impls, "the standard library declares global passes"
    for impl in impls:
        assert resolve_pass(impl).__normc_pass__
        assert impl in declared()


def test_declared_pass_is_accepted():
    program = load_rules(text='pass mine { exact impl "normc.passes.constants:fold_constants" }\npipeline { apply mine }')
    assert "mine" in program.rules


def test_resolve_refuses_undeclared_callables():
    with pytest.raises(PassNotFound):
        resolve_pass("normc.passes.constants:_evaluate")
