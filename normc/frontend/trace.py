"""Tracing a loaded model to a torch.fx GraphModule.

Plain ``nn.Module`` models are tried with ``torch.fx.symbolic_trace`` first (module-level
graph: ``call_module`` nodes for Conv2d/BatchNorm2d/Linear/...); when that fails, or the
traced graph does not reproduce the model, normc falls back to ``torch.export``.
Hugging Face models and ``.pt2`` programs always go through ``torch.export``
(``strict=False``), followed by ``run_decompositions({})``: the result is a functional
ATen graph (no in-place ops such as ``aten.add_``; eval ``dropout`` becomes ``clone``;
``aten.batch_norm`` becomes ``aten._native_batch_norm_legit_no_training`` + ``getitem``;
``conv2d``, ``linear``, ``layer_norm`` stay as they are).

In both cases the parameters appear as ``get_attr`` nodes whose targets are the original
dotted names (``encoder.stages.0...convolution.weight``), and every node traced inside a
submodule records where it came from in ``meta["normc_module_path"]`` and
``meta["normc_module_type"]`` (from torch's ``meta["nn_module_stack"]``; nodes at the top
level get ``""``). Nodes without that information in torch get no such key.

The graph module owns its weights: they are copied from the loaded module, so rewriting
them never changes ``LoadedModel.module`` (the reference verification runs against).
"""
from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from normc.errors import NormcError
from normc.frontend.shapes import (
    DynamicDims,
    auto_dynamic_shapes,
    candidate_dims,
    dims_of_program,
    export_example,
    leaf_names,
)
from normc.frontend.specs import LoadedModel, forward_arg_names, set_eval

SYMBOLIC = "symbolic_trace"
EXPORT = "torch.export"

# How often normc traced something in this process, by kind: "torch.export" and "symbolic_trace" (of a
# model), "run_decompositions", "export_graph" (a rewritten graph exported for the outputs). Tests and
# benchmarks read differences of it around a run (`trace_counts()`).
TRACE_COUNTS: Counter = Counter()
GUARDS_MODULE = "_guards_fn"  # the input-guard submodule torch.export adds to a graph


def trace_counts() -> dict[str, int]:
    """A snapshot of :data:`TRACE_COUNTS`."""
    return dict(TRACE_COUNTS)


@dataclass
class TraceResult:
    graph_module: fx.GraphModule
    method: str  # "symbolic_trace" or "torch.export"
    notes: list[str] = field(default_factory=list)
    # The decomposed ExportedProgram the graph module came from (torch.export only). It may
    # share weights with the loaded model; rewrite graph_module, not this.
    exported_program: Any = None
    # The symbolic input dims (also in graph_module.meta["normc_dynamic"]); None: traced static
    dynamic: DynamicDims | None = None
    warnings: list[str] = field(default_factory=list)  # things the user should see (a static fallback)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# --------------------------------------------------------------------------- comparison


def compare_outputs(ref: Any, got: Any, rel_tol: float = 1e-4) -> tuple[bool, float, str]:
    """Compare two nested outputs leaf by leaf.

    Returns ``(ok, max_abs_error, reason)``; tensors match when
    ``max|ref - got| <= rel_tol * max(1, max|ref|)``.
    """
    ref_leaves, ref_spec = tree_flatten(ref)
    got_leaves, got_spec = tree_flatten(got)
    if len(ref_leaves) != len(got_leaves):
        return False, float("inf"), f"{len(ref_leaves)} outputs expected, got {len(got_leaves)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref_leaves, got_leaves)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False, float("inf"), f"output {i}: {type(a).__name__} vs {type(b).__name__}"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return False, float("inf"), f"output {i}: {a!r} vs {b!r}"
            continue
        if a.shape != b.shape:
            return False, float("inf"), f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.numel() == 0:
            continue
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b.to(a.dtype)):
                return False, float("inf"), f"output {i}: integer values differ"
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        err = torch.where(both_nan, torch.zeros_like(a64), (a64 - b64).abs())
        max_err = float(err.max()) if err.numel() else 0.0
        if max_err != max_err:  # nan
            return False, float("inf"), f"output {i}: NaN where the model has a number"
        scale = max(1.0, float(a64.abs().nan_to_num(0.0).max()))
        worst = max(worst, max_err)
        if max_err > rel_tol * scale:
            return False, worst, f"output {i}: max abs error {max_err:.3g} (output magnitude {scale:.3g})"
    return True, worst, ""


# --------------------------------------------------------------------------- annotations


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return f"{t.__module__}.{t.__qualname__}"
    return str(t)


def annotate_module_paths(gm: fx.GraphModule, missing_means_top: bool = False) -> int:
    """Copy the innermost entry of torch's ``nn_module_stack`` into ``normc_module_path`` /
    ``normc_module_type``; return how many nodes got one.

    ``missing_means_top``: symbolic_trace leaves ``nn_module_stack`` out for nodes at the
    top level of the model; with this flag such call nodes get path ``""``."""
    n_done = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        path: str | None = None
        typ: str | None = None
        if node.op == "call_module":
            path = str(node.target)
            try:
                typ = _type_name(type(gm.get_submodule(path)))
            except AttributeError:
                typ = None
        stack = node.meta.get("nn_module_stack")
        if path is None and stack:
            last = list(stack.values())[-1]
            if isinstance(last, tuple) and len(last) == 2:
                path, typ = str(last[0]), _type_name(last[1])
        if path is None and stack is not None:
            path = ""  # empty stack: the node is at the top level of the model
        if path is None and missing_means_top and node.op in ("call_function", "call_method"):
            path = ""
        if path is not None:
            node.meta["normc_module_path"] = path
            if typ is not None:
                node.meta["normc_module_type"] = typ
            n_done += 1
    return n_done


def module_path(node: fx.Node) -> str | None:
    """The dotted path of the module a node was traced in ("" = top level), if known."""
    return node.meta.get("normc_module_path")


def inplace_ops(gm: fx.GraphModule) -> list[str]:
    """Names of the mutating ATen ops left in ``gm`` (``aten.add_`` etc.)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target._schema.is_mutable:
                found.append(str(node.target))
    return found


# --------------------------------------------------------------------------- tracing


def _own_copy(module: torch.nn.Module, notes: list[str]) -> torch.nn.Module:
    try:
        return copy.deepcopy(module)
    except Exception as e:  # noqa: BLE001
        notes.append(f"could not copy the model ({_one_line(e)}); the graph shares its weights")
        return module


def _reference(loaded: LoadedModel) -> Any:
    with torch.no_grad():
        return loaded.module(*loaded.example_args, **loaded.example_kwargs)


def _symbolic(module: torch.nn.Module, loaded: LoadedModel, ref: Any) -> fx.GraphModule:
    TRACE_COUNTS["symbolic_trace"] += 1
    gm = fx.symbolic_trace(module)
    with torch.no_grad():
        if loaded.example_kwargs:
            out = gm(*loaded.example_args, **loaded.example_kwargs)
        else:
            from torch.fx.passes.shape_prop import ShapeProp

            out = ShapeProp(gm).propagate(*loaded.example_args)  # also records meta["tensor_meta"]
    ok, _, reason = compare_outputs(ref, out)
    if not ok:
        raise RuntimeError(f"the traced graph does not reproduce the model ({reason})")
    return gm


def needs_decompositions(ep) -> bool:
    """Whether canonicalization needs the functional ATen graph: in-place (mutating) ops or higher-order
    ops (autocast / no_grad regions) in the exported graph. Otherwise the graph is used as traced
    (decomposing re-traces the whole program: the most expensive step on large models)."""
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return True
        if isinstance(target, torch._ops.OpOverload) and (target._schema.is_mutable or target in _DECOMPOSED_FORMS):
            return True
        if target in _CASTS and _plain_cast(node) is None:
            return True
    return False


# ops of torch.export's graph that canonicalization knows in their decomposed form only
_DECOMPOSED_FORMS = {torch.ops.aten.to.other, torch.ops.aten.to.prim_dtype, torch.ops.aten.to.prim_Device,
                     torch.ops.aten.to.prim_other}
_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device}


def _plain_cast(node: fx.Node):
    """For ``aten.to`` that only changes the dtype (device and layout as the input's): ``("cast", dtype)``
    or ``("same", None)`` when it changes nothing; None otherwise (decomposition then handles it)."""
    names = [a.name for a in node.target._schema.arguments]
    kw = dict(zip(names, node.args))
    kw.update(node.kwargs)
    src = kw.get("self")
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    device, layout = kw.get("device"), kw.get("layout")
    if device is not None and torch.device(device) != val.device:
        return None
    if layout not in (None, torch.strided) or kw.get("memory_format") not in (None, torch.preserve_format):
        return None
    dtype = kw.get("dtype")
    return ("same", None) if dtype is None or dtype == val.dtype else ("cast", dtype)


def _casts_to_copies(gm: fx.GraphModule) -> None:
    """``aten.to`` (training IR) as the ``aten._to_copy`` decomposition would leave it: a dtype change
    becomes ``_to_copy(x, dtype=...)``, a no-op disappears. Local and linear, instead of re-tracing."""
    changed = False
    for target in _CASTS:
        for node in list(gm.graph.find_nodes(op="call_function", target=target)):
            kind = _plain_cast(node)
            src = node.args[0]
            if kind is None:
                continue
            if kind[0] == "same":
                node.replace_all_uses_with(src)
            else:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(torch.ops.aten._to_copy.default, (src,), {"dtype": kind[1]})
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _finish_export(ep, loaded: LoadedModel, ref: Any, notes: list[str]) -> tuple[fx.GraphModule, Any]:
    if needs_decompositions(ep):
        TRACE_COUNTS["run_decompositions"] += 1
        ep = ep.run_decompositions({})
    gm = ep.module()
    gm.meta["normc_range_constraints"] = dict(ep.range_constraints)  # the outputs' program reuses them
    _casts_to_copies(gm)
    set_eval(gm)
    training_bn = [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in (
        "aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.default",
        "aten.native_batch_norm.default")]
    if training_bn:
        notes.append(f"{len(training_bn)} batch norms run in training mode (the model was exported in "
                     "train mode); re-export it after model.eval()")
    left = inplace_ops(gm)
    if left:
        notes.append("in-place ops remain after decomposition: " + ", ".join(sorted(set(left))))
    with torch.no_grad():
        out = gm(*loaded.example_args, **loaded.example_kwargs)
    ok, _, reason = compare_outputs(ref, out)
    if not ok:
        raise NormcError(
            f"the torch.export graph of `{loaded.source}` does not reproduce the model: {reason}",
            hint="the model's forward probably depends on Python state that tracing freezes; "
            "make it deterministic in eval mode",
        )
    return gm, ep


def _quiet(fn):
    """Hide torch's own deprecation chatter (e.g. pytree ``LeafSpec``) raised inside export."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            return fn(*args, **kwargs)

    return wrapper


def _mark(gm: fx.GraphModule, dyn: DynamicDims | None, example: tuple | None, warned: list[str] | None = None) -> None:
    """Keep the dynamic dims and the example they were traced at with the graph (the outputs export it
    that way), and the warnings of the trace (the runner reports them)."""
    gm.meta["normc_dynamic"] = dyn if dyn is not None and dyn.symbolic else None
    gm.meta["normc_trace_example"] = example
    gm.meta["normc_trace_warnings"] = list(warned or [])


def _export_original(module, args, kwargs, dynamic_shapes=None):
    TRACE_COUNTS["torch.export"] += 1
    return torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes, strict=False)


@_quiet
def trace_model(loaded: LoadedModel, *, copy_weights: bool = True, dynamic: bool = True) -> TraceResult:
    """Trace ``loaded`` to an FX GraphModule that reproduces it on the example inputs.

    ``copy_weights``: give the graph its own copy of the weights (default), so rewriting
    them leaves ``loaded.module`` untouched.
    ``dynamic``: keep batch and sequence (and whatever else the model is generic in) symbolic; a model
    that torch.export cannot trace that way is traced static, with a warning naming the reason.
    """
    if loaded.example_args is None:
        raise NormcError(f"`{loaded.source}` has no example inputs to trace with",
                         hint="declare the inputs in the .nc file, e.g. `input x: f32[1, 3, 224, 224]`")
    notes: list[str] = []
    set_eval(loaded.module)
    try:
        ref = _reference(loaded)
    except Exception as e:  # noqa: BLE001
        raise NormcError(f"running `{loaded.source}` on its example inputs failed: {_one_line(e)}",
                         hint="check the declared input shapes and dtypes against the model's forward") from e
    names = leaf_names(loaded.example_args, loaded.example_kwargs, forward_arg_names(loaded.module))

    if loaded.exported_program is not None:
        ep = loaded.exported_program
        try:
            gm, ep = _finish_export(ep, loaded, ref, notes)
        except NormcError:
            raise
        except Exception as e:  # noqa: BLE001
            raise NormcError(f"decomposing the exported program `{loaded.source}` failed: {_one_line(e)}",
                             hint="re-export the model with the torch version installed here") from e
        if copy_weights:
            gm = _own_copy(gm, notes)
        dyn = dims_of_program(ep, loaded.example_args, loaded.example_kwargs, names)
        _mark(gm, dyn, (tuple(loaded.example_args), dict(loaded.example_kwargs)))
        result = TraceResult(gm, EXPORT, notes, ep, dyn if dyn.symbolic else None)
        annotate_module_paths(result.graph_module)
        return result

    module = _own_copy(loaded.module, notes) if copy_weights else loaded.module

    if not loaded.is_hf:
        try:
            gm = _symbolic(module, loaded, ref)
            annotate_module_paths(gm, missing_means_top=True)
            dyn = candidate_dims(loaded.example_args, loaded.example_kwargs, names) if dynamic else None
            ex_args, ex_kwargs, _ = export_example(loaded.example_args, loaded.example_kwargs)
            _mark(gm, dyn, (ex_args, ex_kwargs) if dyn is not None else
                  (tuple(loaded.example_args), dict(loaded.example_kwargs)))
            return TraceResult(gm, SYMBOLIC, notes, None, dyn if dyn is not None and dyn.symbolic else None)
        except Exception as e:  # noqa: BLE001 - any failure means: try torch.export instead
            notes.append(f"symbolic_trace failed ({_one_line(e)}); used torch.export instead")
    else:
        notes.append("Hugging Face model: traced with torch.export")

    warned: list[str] = []
    if dynamic:
        ex_args, ex_kwargs, _ = export_example(loaded.example_args, loaded.example_kwargs)
        try:
            shapes = auto_dynamic_shapes(module, ex_args, ex_kwargs)
            ep = _export_original(module, ex_args, ex_kwargs, shapes)
            gm, ep = _finish_export(ep, loaded, ref, notes)
            dyn = dims_of_program(ep, ex_args, ex_kwargs, names)
            annotate_module_paths(gm)
            _mark(gm, dyn, (ex_args, ex_kwargs))
            return TraceResult(gm, EXPORT, notes, ep, dyn if dyn.symbolic else None, warned)
        except Exception as e:  # noqa: BLE001 - a static trace may still work
            warned.append(f"shapes are static: tracing `{loaded.source}` with dynamic shapes failed "
                          f"({_one_line(e)}); the outputs run at the example shape only")

    try:
        ep = _export_original(module, loaded.example_args, loaded.example_kwargs)
    except Exception as e:  # noqa: BLE001
        why = "; symbolic_trace also failed" if any(n.startswith("symbolic_trace failed") for n in notes) else ""
        raise NormcError(
            f"cannot trace `{loaded.source}` with torch.export: {_one_line(e)}{why}",
            hint="remove data-dependent Python control flow from forward (or set config.use_cache=False "
            "for Hugging Face models); see the torch.export docs on graph breaks",
        ) from e
    try:
        gm, ep = _finish_export(ep, loaded, ref, notes)
    except NormcError:
        raise
    except Exception as e:  # noqa: BLE001
        raise NormcError(f"the torch.export graph of `{loaded.source}` does not run: {_one_line(e)}",
                         hint="report this model to the normc authors with the torch version") from e
    annotate_module_paths(gm)
    _mark(gm, None, (tuple(loaded.example_args), dict(loaded.example_kwargs)), warned)
    return TraceResult(gm, EXPORT, notes, ep, None, warned)
