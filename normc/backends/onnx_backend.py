"""ONNX lowering (torch.onnx dynamo exporter) and its onnxruntime check."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from normc.atomic import atomic_path
from normc.backends.torch_backend import export_graph, one_line
from normc.errors import NormcError
from normc.verify.compare import (
    OutputDiff,
    Tolerance,
    VerifyResult,
    compare_leaves,
    first_floating_dtype,
    flatten_outputs,
    merge_worst,
    run_model,
    summarize,
)

# protobuf cannot hold a single message over 2 GiB; above this the weights go to a side file
_EXTERNAL_DATA_BYTES = 1_800_000_000


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's chatter ('torchvision is not installed', internal deprecations)."""
    names = ["torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # torch-internal deprecation notices, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _param_bytes(module: Any) -> int:
    seen, total = set(), 0
    tensors = list(module.state_dict.values()) + list(module.constants.values()) if hasattr(module, "graph_signature") \
        else list(module.parameters()) + list(module.buffers())
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def output_names(out_spec: Any, n: int, taken: Sequence[str] = ()) -> list[str]:
    """ONNX output names from the program's output structure: a dict's keys (``logits``,
    ``last_hidden_state``), a namedtuple's fields, ``output_0..n`` for tensors in a tuple or alone;
    nested leaves join their path with ``_``. Unique, and never an input's name."""
    try:
        tree = pytree.tree_unflatten(list(range(n)), out_spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # noqa: BLE001 - an output structure pytree cannot rebuild: plain names
        paths = [None] * n
    names: list[str] = []
    used = set(taken)
    for i, path in enumerate(paths):
        if not path:
            base = f"output_{i}"
        else:
            parts = [_key_name(k) for k in path]
            if isinstance(path[0], pytree.SequenceKey):
                parts[0] = f"output_{parts[0]}"
            base = "_".join(parts)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        names.append(name)
    return names


def export_onnx(
    module: nn.Module | None,
    example_args: tuple,
    example_kwargs: dict | None,
    path: str | os.PathLike,
    opset: int = 18,
    *,
    optimize: bool = True,
    external_data: bool | None = None,
    program: Any = None,
) -> Path:
    """Lower ``program`` (an ExportedProgram; default: :func:`export_graph` of ``module``) with the
    dynamo ONNX exporter and write ``path`` atomically.

    ``external_data`` None: weights inline unless the model is too large for one protobuf
    (then ``<name>.data`` beside the model). Graph inputs are named after the forward
    arguments (``None`` arguments are dropped); outputs follow :func:`flatten_outputs` order and
    are named by :func:`output_names`. Dims the program keeps symbolic stay symbolic.
    """
    path = Path(path)
    if program is None:
        program = export_graph(module, example_args, example_kwargs)[0]
    if external_data is None:
        external_data = _param_bytes(program) > _EXTERNAL_DATA_BYTES
    sig = program.graph_signature
    outs = output_names(program.call_spec.out_spec, len(sig.user_outputs), [str(i) for i in sig.user_inputs])
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=int(opset),
                external_data=bool(external_data),
                optimize=optimize,
                verbose=False,
                output_names=outs,
            )
    except NormcError:
        raise
    except Exception as exc:
        cause = one_line(exc)
        if "No ONNX function found" in cause or "DispatchError" in cause:
            hint = (f"an op has no ONNX translation at opset {opset}: try a newer opset, "
                    "or rewrite it into ops ONNX knows")
        else:
            hint = ("export to torch (.pt2) first to see whether torch.export accepts the model, "
                    "or try another opset")
        raise NormcError(f"ONNX export (opset {opset}) failed: {cause}", hint=hint) from exc
    if onnx_program is None:  # only the legacy exporter returns None
        raise NormcError("ONNX export returned no program", hint="use torch>=2.5 with the dynamo exporter")
    _name_dims(onnx_program, program)

    try:
        if not external_data:
            with atomic_path(path) as tmp:
                onnx_program.save(str(tmp), external_data=False)
        else:
            _save_with_external_data(onnx_program, path)
    except NormcError:
        raise
    except Exception as exc:
        raise NormcError(f"cannot write {path}: {one_line(exc)}",
                         hint="check free disk space and permissions of the output folder") from exc
    return path


def _name_dims(onnx_program: Any, program: Any) -> None:
    """Symbolic dims named by role (``batch``, ``sequence``) instead of torch's ``s72``. Cosmetic: any
    surprise in the exporter's object model leaves the names as they are."""
    try:
        import onnx_ir as ir

        from normc.frontend.shapes import symbol_roles
        roles = symbol_roles(program)
        if not roles:
            return
        graph = onnx_program.model.graph
        values = list(graph.inputs) + list(graph.outputs) + [v for node in graph for v in node.outputs]
        for v in values:
            shape = v.shape
            if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in roles for d in shape.dims):
                continue
            v.shape = ir.Shape([ir.SymbolicDim(roles[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in roles
                                else d for d in shape.dims])
    except Exception:  # noqa: BLE001 - names are a nicety, never a reason to fail an export
        return


def _save_with_external_data(program: Any, path: Path) -> None:
    """Model + ``<name>.data``: written under their final names in a scratch folder beside
    the target, then moved (data first, model last) so a failure leaves neither."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(str(scratch / path.name), external_data=True)
        for f in sorted(scratch.iterdir(), key=lambda p: p.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- onnxruntime
def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with thread spinning off (spinning threads steal CPU
    from whatever runs next, which skews benchmarks on small machines)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise NormcError(f"onnxruntime cannot load {path}: {one_line(exc)}",
                         hint="re-export the model, or try a lower opset") from exc


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            raise NormcError("onnxruntime's Python API cannot take bfloat16 inputs from numpy",
                             hint="verify the ONNX model with float32 or float16 inputs")
        return t.numpy()
    return np.asarray(t)


def _named_leaves(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    return [(f"{prefix}_{i}", x) for i, x in enumerate(leaves)]


def onnx_feed(graph_inputs: Sequence[str], args: tuple, kwargs: dict | None = None,
              hint: str = "call with the same arguments the model was exported with") -> dict[str, np.ndarray]:
    """The ``{graph input name: array}`` feed for one call: keyword tensors go to the graph input of
    the same name, the remaining graph inputs take the positional tensors (flattened) in order."""
    graph_inputs = list(graph_inputs)
    feed: dict[str, np.ndarray] = {}
    leftovers: list[Any] = []
    for key, value in (kwargs or {}).items():
        for name, t in _named_leaves(key, value):
            if name in graph_inputs:
                feed[name] = _to_numpy(t)
            else:
                leftovers.append(t)
    positional = [x for x in pytree.tree_leaves(tuple(args)) if isinstance(x, torch.Tensor)] + leftovers
    free = [n for n in graph_inputs if n not in feed]
    if len(positional) != len(free):
        raise NormcError(
            f"the ONNX graph takes {len(graph_inputs)} input(s) ({', '.join(graph_inputs)}) "
            f"but {len(positional) + len(feed)} tensor(s) were given", hint=hint)
    for name, t in zip(free, positional):
        feed[name] = _to_numpy(t)
    return feed


def run_onnx(session: Any, args: tuple, kwargs: dict | None = None) -> list[np.ndarray]:
    """Run ``session`` on torch inputs; returns the graph outputs in order.

    Keyword tensors go to the graph input of the same name; the remaining graph inputs
    take the positional tensors (nested ones flattened) in order. ``None`` and Python
    scalars are skipped: the exporter drops the former and bakes the latter in.
    """
    feed = onnx_feed([i.name for i in session.get_inputs()], args, kwargs)
    try:
        return list(session.run(None, feed))
    except Exception as exc:
        raise NormcError(f"onnxruntime failed: {one_line(exc)}",
                         hint="inputs must have the shapes and dtypes used at export") from exc


def check_onnx(
    path: str | os.PathLike,
    module: nn.Module,
    inputs: list[tuple[tuple, dict]],
    tol: Tolerance | None = None,
    *,
    session: Any = None,
) -> VerifyResult:
    """Run the torch module and onnxruntime on the same inputs and compare every output
    leaf (ONNX output i = i-th leaf of :func:`flatten_outputs`) with the verify metrics."""
    if not inputs:
        raise NormcError("no inputs to check the ONNX model with",
                         hint="declare an `input` shape or pass calibration data")
    sess = session if session is not None else ort_session(path)
    out_names = [o.name for o in sess.get_outputs()]
    per_input: list[list[OutputDiff]] = []
    for args, kwargs in inputs:
        ref_leaves = flatten_outputs(run_model(module, args, kwargs))
        outs = run_onnx(sess, args, kwargs)
        if len(outs) != len(ref_leaves):
            raise NormcError(
                f"the ONNX model has {len(outs)} output(s) ({', '.join(out_names)}) "
                f"but the torch module {len(ref_leaves)}",
                hint="re-export the model from the same module",
            )
        new_leaves = [(name, torch.from_numpy(np.ascontiguousarray(o))) for (name, _), o in zip(ref_leaves, outs)]
        if tol is None:
            tol = Tolerance.default_for(first_floating_dtype(ref_leaves))
        per_input.append(compare_leaves(ref_leaves, new_leaves, tol))
    return summarize(merge_worst(per_input), len(inputs), tol)


# --------------------------------------------------------------------------- inspection
def _iter_nodes(graph: Any):
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:  # subgraphs of If / Loop / Scan
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def onnx_op_counts(path_or_model: str | os.PathLike | Any) -> dict[str, int]:
    """``op_type -> count`` over the whole model: local functions inlined first, subgraphs
    included. Ops outside the standard domain are keyed ``domain::op_type``."""
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        try:
            model = onnx.load(str(path_or_model), load_external_data=False)
        except Exception as exc:
            raise NormcError(f"cannot read ONNX file {path_or_model}: {one_line(exc)}") from exc
    if model.functions:
        try:
            import onnx.inliner

            model = onnx.inliner.inline_local_functions(model)
        except Exception:  # old onnx: count function bodies once per call site by hand
            model = _inline_by_hand(model)
    counts: Counter[str] = Counter()
    for node in _iter_nodes(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] += 1
    return dict(sorted(counts.items()))


def _inline_by_hand(model: Any) -> Any:
    import onnx

    funcs = {(f.domain, f.name): f for f in model.functions}
    graph = onnx.GraphProto()

    def expand(nodes: Sequence[Any], depth: int = 0):
        for n in nodes:
            f = funcs.get((n.domain, n.op_type))
            if f is not None and depth < 32:
                yield from expand(f.node, depth + 1)
            else:
                yield n

    graph.node.extend(expand(model.graph.node))
    out = onnx.ModelProto()
    out.graph.CopyFrom(graph)
    return out
