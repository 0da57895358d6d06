"""Assertions for pytest (or any test runner): is a model equivalent, does a rewrite verify?

    from normc.testing import assert_equivalent, assert_rewrite_verifies

    def test_fold_keeps_my_model():
        assert_rewrite_verifies("rules/fold.nc", MyNet(), example_inputs=torch.randn(2, 3, 32, 32))

    def test_export_matches():
        assert_equivalent(reference, candidate, [torch.randn(4, 16) for _ in range(8)], rtol=1e-5)

Both raise ``AssertionError`` with a per-output table (max abs / max rel / cosine) when
the models differ; errors in the test's own inputs (a bad ``.nc`` file, a reference
model that does not run on the inputs given) keep their normc error type.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import NormcError, VerificationFailed
from .verify import Tolerance, VerifyResult, verify_models

__all__ = ["assert_equivalent", "assert_rewrite_verifies", "format_outputs", "normalize_inputs"]


# --------------------------------------------------------------------------- inputs
def _one(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], dict):
        return tuple(item[0]), dict(item[1])
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise TypeError(f"cannot use a {type(item).__name__} as model inputs: give a tensor, a tuple of positional "
                    "arguments, a dict of keyword arguments, or an (args, kwargs) pair")


def normalize_inputs(inputs: Any) -> list[tuple[tuple, dict]]:
    """Inputs in the form ``verify_models`` takes: a list of ``(args, kwargs)``.

    * a tensor                      -> one input, ``model(t)``
    * a tuple                       -> one input, ``model(*tuple)``
    * a dict                        -> one input, ``model(**dict)``
    * a list                        -> one input per item; each item is a tensor, a tuple of
                                       args, a dict of kwargs, or an ``(args_tuple, kwargs_dict)`` pair
    """
    if isinstance(inputs, list):
        if not inputs:
            raise ValueError("no inputs: give at least one tensor, tuple of args or (args, kwargs) pair")
        return [_one(item) for item in inputs]
    return [_one(inputs)]


# --------------------------------------------------------------------------- formatting
def _num(x: Any, spec: str = ".3g") -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-" if x is None else str(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def format_outputs(outputs: Sequence[dict]) -> str:
    """A plain-text table of verified outputs (``VerifyResult.to_dict()["outputs"]`` entries)."""
    header = ("output", "shape", "dtype", "max_abs", "max_rel", "cosine", "status")
    rows = [header]
    for o in outputs:
        status = "ok" if o.get("passed") else "FAIL" + (f" ({o['note']})" if o.get("note") else "")
        shape = "[" + ", ".join(str(s) for s in o.get("shape") or []) + "]"
        rows.append((str(o.get("name")), shape, str(o.get("dtype", "")), _num(o.get("max_abs")),
                     _num(o.get("max_rel")), _num(o.get("cosine"), ".9f"), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells) + "  " + r[-1])
    return "\n".join(lines)


def _tol_text(tol: dict | None) -> str:
    if not tol:
        return "default"
    parts = [f"max_abs {_num(tol['max_abs'], 'g')}" if tol.get("max_abs") is not None else "",
             f"rel {_num(tol['max_rel'], 'g')}" if tol.get("max_rel") is not None else ""]
    return " ".join(p for p in parts if p) or "none"


def _verify_block(v: dict) -> str:
    head = (f"max_abs {_num(v.get('max_abs_err'))}, max_rel {_num(v.get('max_rel_err'))}, "
            f"min cosine {_num(v.get('min_cosine'), '.9f')} over {v.get('n_inputs', '?')} input(s); "
            f"tolerance {_tol_text(v.get('tolerance'))}")
    outs = v.get("outputs") or []
    return head + ("\n" + format_outputs(outs) if outs else "")


# --------------------------------------------------------------------------- assert_equivalent
def assert_equivalent(model_a, model_b, inputs, rtol: float | None = 1e-5, atol: float | None = None) -> VerifyResult:
    """Assert that ``model_b`` computes what ``model_a`` (the reference) computes on ``inputs``.

    ``inputs``: see :func:`normalize_inputs` (a tensor, a tuple of args, or a list of inputs).
    ``rtol`` bounds normc's relative error ``max|a-b| / max|a|`` per output (relative to the
    output's largest magnitude, not elementwise); ``atol`` bounds ``max|a-b|``. Both None:
    the default for the output dtype (fp32 1e-5, fp16/bf16 1e-2, fp64 1e-10 relative).
    Every output leaf (tuples, dicts, HF ModelOutputs) is compared; integer outputs exactly.
    Returns the ``VerifyResult``; raises ``AssertionError`` with a per-output table.
    """
    tol = None if rtol is None and atol is None else Tolerance(max_abs=atol, max_rel=rtol)
    cases = normalize_inputs(inputs)
    try:
        result = verify_models(model_a, model_b, cases, tol)
    except VerificationFailed as e:  # the candidate did not run
        raise AssertionError(f"models are not equivalent: {e.message}") from e
    except NormcError as e:
        if e.message.startswith("output structure differs"):
            raise AssertionError(f"models are not equivalent: {e.message}") from e
        raise
    if not result.passed:
        d = result.to_dict()
        raise AssertionError(f"models are not equivalent ({_num(d['max_rel_err'])} relative, "
                             f"{_num(d['max_abs_err'])} absolute error):\n{_verify_block(d)}")
    return result


# --------------------------------------------------------------------------- assert_rewrite_verifies
def _program(rules):
    from .api import load_rules
    from .grammar.loader import Program
    if isinstance(rules, Program):
        return rules
    if isinstance(rules, os.PathLike):
        return load_rules(Path(rules))
    if isinstance(rules, str):
        s = rules.strip()
        if "\n" not in s and (s.endswith(".nc") or os.path.isfile(s)):
            return load_rules(s)
        return load_rules(text=rules)
    raise TypeError(f"rules must be a .nc path, .nc source text or a Program, not {type(rules).__name__}")


def _loaded(program, model, example_inputs, example_kwargs, weights, allow_pickle):
    from .frontend import LoadedModel, load_model
    from .frontend.specs import forward_arg_names, sample_examples, specs_from_examples
    from .pipeline.runner import input_specs_from_decls

    if isinstance(model, LoadedModel):
        return model
    args, kwargs = _one(example_inputs) if example_inputs is not None else (None, {})
    kwargs.update(example_kwargs or {})
    if isinstance(model, str):
        if args is None and not kwargs:
            from .api import load
            return load(program, model, weights=weights, allow_pickle=allow_pickle)
        loaded = load_model(model, weights=weights, allow_pickle=allow_pickle, example_args=args or ())
        if kwargs:
            loaded.example_kwargs = kwargs
            loaded.input_specs = specs_from_examples(loaded.example_args, kwargs, forward_arg_names(loaded.module))
        return loaded
    if isinstance(model, torch.nn.Module):
        module = copy.deepcopy(model).eval() if model.training else model  # never flip the caller's module
        if args is None and not kwargs:
            if not program.main.inputs:
                raise TypeError("give the model's example inputs: assert_rewrite_verifies(rules, model, "
                                "example_inputs=torch.randn(...)), or declare `input` lines in the rules")
            specs = input_specs_from_decls(program.main.inputs)
            return LoadedModel(module, sample_examples(specs), {}, specs, type(model).__name__, False)
        args = args or ()
        specs = specs_from_examples(args, kwargs, forward_arg_names(module))
        return LoadedModel(module, args, kwargs, specs, type(model).__name__, False)
    raise TypeError(f"model must be an nn.Module, a model source such as 'zoo:cnn', or a LoadedModel, "
                    f"not {type(model).__name__}")


def _sites(rule: dict, limit: int = 4) -> str:
    sites = [s.get("site", "") for s in rule.get("sites") or []]
    text = ", ".join(sites[:limit]) + (f", ... ({len(sites)} in all)" if len(sites) > limit else "")
    return f"{rule.get('name')} applied at {rule.get('applied', 0)} site(s)" + (f": {text}" if text else "")


def _failure_message(report: dict) -> str:
    v = report.get("verify") or {}
    rules = {r.get("name"): r for r in report.get("rules") or []}
    lines = [f"rewrite does not verify on {report.get('model')}: {v.get('failure') or 'verification failed'}"]
    bad = next((s for s in report.get("steps") or [] if s.get("verify") and not s["verify"].get("passed", True)), None)
    if bad is not None:
        lines.append(f"failing step: `{bad.get('step')}`")
        for name in bad.get("rules") or []:
            if name in rules:
                lines.append("  " + _sites(rules[name]))
        bv = bad["verify"]
        lines.append(f"tolerance {_tol_text(bv.get('tolerance'))}, {bv.get('n_inputs', '?')} input(s):")
        lines.append(format_outputs(bv.get("outputs") or []))
    elif v.get("outputs") is not None:
        lines.append(_verify_block(v))
    return "\n".join(lines)


def assert_rewrite_verifies(rules, model, *, example_inputs=None, example_kwargs: dict | None = None,
                            samples: int = 4, seed: int = 0, weights: str | None = None, allow_pickle: bool = False,
                            require_applied: bool = True, **options):
    """Assert that a rules file's pipeline keeps ``model`` equivalent (what ``normc check`` does).

    ``rules``: a ``.nc`` path, ``.nc`` source text, or a loaded ``Program``.
    ``model``: an ``nn.Module`` (with ``example_inputs=`` a tensor / tuple of args / dict, and
    optionally ``example_kwargs=``; or the rules' ``input`` declarations), a model source
    string (``"zoo:cnn"``, ``"model.py:build"``, ...), or a ``LoadedModel``.
    ``samples``/``seed``: random verification inputs besides the example one.
    ``require_applied``: fail when no rule applied anywhere (a rule that never matches
    "verifies" vacuously). Other keyword options go to ``RunOptions``. Nothing is written.

    Returns the ``CompileResult``; raises ``AssertionError`` naming the failing step, the rules
    applied in it (with their sites) and the per-output numbers.
    """
    from .pipeline import RunOptions, compile_model

    program = _program(rules)
    loaded = _loaded(program, model, example_inputs, example_kwargs, weights, allow_pickle)
    opts = RunOptions(verify_inputs=samples, seed=seed, write=False, **options)
    try:
        result = compile_model(program, loaded, opts)
    except VerificationFailed as e:
        raise AssertionError(f"rewrite does not verify on {loaded.source}: {e.message}"
                             + (f"\n  fix: {e.hint}" if e.hint else "")) from e
    report = result.report
    if not result.passed:
        raise AssertionError(_failure_message(report))
    if require_applied and not any(r.get("applied") for r in report.get("rules") or []):
        near = [f"  {r.get('name')}: {s.get('site')}: {s.get('reason')}"
                for r in report.get("rules") or [] for s in (r.get("near_misses") or [])[:5]]
        skipped = [f"  {r.get('name')}: {s.get('site')}: {s.get('reason')}"
                   for r in report.get("rules") or [] for s in (r.get("skipped") or [])[:5]]
        msg = f"no rule applied anywhere on {loaded.source}"
        if not report.get("rules"):
            msg += " (the pipeline applies no rules: does the file have `pipeline { apply ... }`?)"
        if skipped:
            msg += "\nskipped sites:\n" + "\n".join(skipped)
        if near:
            msg += "\nnear misses:\n" + "\n".join(near)
        raise AssertionError(msg + "\n(pass require_applied=False if that is expected)")
    return result
