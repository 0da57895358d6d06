"""Global passes: Python functions a `.nc` file may name with `impl "module:func"`.

A function becomes a pass only by being decorated here; `impl` cannot reach any other
callable (`normc.passes.prenorm:importlib` names a module attribute, not a pass). The
checker resolves every `impl` when the program is checked, so a wrong target is a located
error before any model is loaded.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable

PACKAGE = "normc.passes"
_PASSES: dict[str, Callable] = {}
_TARGET = re.compile(r"normc\.passes(\.[A-Za-z_][A-Za-z0-9_]*)+:[A-Za-z_][A-Za-z0-9_]*")


def global_pass(fn: Callable) -> Callable:
    """Declare `fn(gm, *, ctx, scope, loaded, dry_run, **params) -> RuleReport` as a global pass."""
    _PASSES[f"{fn.__module__}:{fn.__name__}"] = fn
    fn.__normc_pass__ = True
    return fn


class PassNotFound(LookupError):
    """`impl` names no declared pass; the message says what is wrong, `hint` how to fix it."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


def resolve_pass(target: str) -> Callable:
    """The pass `target` ("normc.passes.module:function") names; raises PassNotFound."""
    if not _TARGET.fullmatch(target):
        raise PassNotFound(f"`{target}` is not a pass inside {PACKAGE}",
                           f'write impl "{PACKAGE}.MODULE:FUNCTION"; write a `rule` for your own rewrites')
    module_name, _, func = target.partition(":")
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise PassNotFound(f"no module `{module_name}`", f"the passes are {', '.join(declared()) or 'none'}")
    module = importlib.import_module(module_name)  # normc's own code: importing it declares its passes
    fn = _PASSES.get(target)
    if fn is None:
        what = "is not declared as a pass" if hasattr(module, func) else "does not exist"
        raise PassNotFound(f"`{func}` in `{module_name}` {what}",
                           f"the passes are {', '.join(declared())}; a pass is declared with @global_pass")
    return fn


def declared() -> list[str]:
    return sorted(_PASSES)
