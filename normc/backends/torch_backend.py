"""Torch outputs: an exported program (.pt2) and a state dict (.safetensors or torch.save)."""
from __future__ import annotations

import contextlib
import os
import re
import types
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch._export.verifier import Verifier

from normc.atomic import atomic_path
from normc.errors import NormcError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS_LINE = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:\s*(.*)$")
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first informative line of an exception, for an error message meant for people.

    Understands the ONNX exporter's long reports: the line under "## Exception summary"
    is the real cause; "The following call raised this error" names the user's line.
    """
    text = _ANSI.sub("", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    kind = type(exc).__name__
    line = lines[0] if lines else ""
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        if rest:
            m = _CLASS_LINE.match(rest[0])
            kind, line = (m.group(1), m.group(2)) if m else (kind, rest[0])
    where = ""
    if "The following call raised this error:" in lines:
        rest = lines[lines.index("The following call raised this error:") + 1:]
        m = _USER_FRAME.search(rest[0]) if rest else None
        if m:
            where = f" (at {m.group(1)}:{m.group(2)})"
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{kind}: {line}{where}" if line else kind


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode for the duration (graph modules are created in training mode; exporting
    one that way makes torch warn and, for dropout or batch norm, trace the training behaviour)."""
    was = getattr(module, "training", False)
    if was:
        try:
            module.eval()
        except NotImplementedError:  # ExportedProgram.module() refuses eval(): its mode is fixed
            was = False
    try:
        yield module
    finally:
        if was:
            module.train(True)


def export_program(module: nn.Module, example_args: tuple, example_kwargs: dict | None = None,
                   dynamic_shapes=None):
    """``torch.export.export(strict=False)`` (in eval mode) with failures as NormcError."""
    from normc.frontend.trace import TRACE_COUNTS
    TRACE_COUNTS["export_graph"] += 1
    try:
        with eval_mode(module), _quiet_pytree():
            return torch.export.export(module, tuple(example_args), kwargs=dict(example_kwargs or {}),
                                       dynamic_shapes=dynamic_shapes, strict=False)
    except NormcError:
        raise
    except Exception as exc:  # torch raises many kinds here; the user needs one line
        raise NormcError(
            f"torch.export failed: {one_line(exc)}",
            hint="check that the example inputs match the model's forward signature; "
            "data-dependent Python control flow cannot be exported",
        ) from exc


def _plain_spec(spec):
    """The same tree with dict subclasses (Hugging Face ModelOutput) as plain dicts: the archive then
    loads with torch alone, without the library that defined the output class."""
    if spec.is_leaf():
        return spec
    kids = spec.children() if hasattr(spec, "children") else spec.children_specs
    children = [_plain_spec(c) for c in kids]
    kind, context = spec.type, spec.context
    if isinstance(kind, type) and issubclass(kind, dict) and kind is not dict and isinstance(context, (list, tuple)):
        kind, context = dict, list(context)
    return pytree.TreeSpec(kind, context, children)


@contextlib.contextmanager
def _quiet_pytree():
    """torch's own deprecation notice about pytree ``LeafSpec``, raised inside export and save."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def plain_outputs(module: nn.Module):
    """``module`` (a graph module from torch.export) returning plain containers for the duration; other
    modules as they are. Swaps the output spec in place (no copy of the weights) and restores it."""
    codegen = getattr(getattr(module, "graph", None), "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    plain = _plain_spec(info.out_spec) if info is not None and info.out_spec is not None else None
    if plain is None or plain == info.out_spec:
        yield module
        return
    codegen.pytree_info = info._replace(out_spec=plain)
    module.recompile()
    try:
        yield module
    finally:
        codegen.pytree_info = info
        module.recompile()


def export_graph(gm: nn.Module, example_args: tuple, example_kwargs: dict | None = None) -> tuple[object, list[str]]:
    """The ExportedProgram of a rewritten graph, for every output (.pt2, ONNX, TensorRT): exported once,
    with the dims symbolic that the trace found symbolic (``gm.meta["normc_dynamic"]``), at the example
    the model was traced at, and with plain output containers. Returns it and warnings for the user
    (a dim the rewritten graph no longer keeps symbolic)."""
    from normc.frontend.shapes import auto_dynamic_shapes, dims_of_program

    meta = getattr(gm, "meta", None) or {}
    dyn = meta.get("normc_dynamic")
    args, kwargs = meta.get("normc_trace_example") or (tuple(example_args), dict(example_kwargs or {}))
    warnings: list[str] = []
    with plain_outputs(gm) as module:
        if dyn is None:
            return export_program(module, example_args, example_kwargs), warnings
        try:
            ep = export_program(module, args, kwargs, auto_dynamic_shapes(module, args, kwargs, only=dyn))
        except NormcError as exc:
            warnings.append(f"the outputs are static: exporting with dynamic shapes failed ({exc.message})")
            return export_program(module, example_args, example_kwargs), warnings
    got = dims_of_program(ep, args, kwargs, dyn.names)
    lost = [f"{dyn.names[i] if i < len(dyn.names) else i}[{d}]" for i, dims in enumerate(dyn.dims)
            for d in dims if d not in got.dims[i]]
    if lost:
        warnings.append("the rewritten graph fixes " + ", ".join(lost) + " to the example size: the outputs "
                        "take only that size there")
    return ep, warnings


class _RewrittenGraphVerifier(Verifier):
    """The checks of an ATen program, with normc's canonical ops (plain Python functions) allowed as call
    targets: a program built by :func:`program_of_graph` holds them until an exporter retraces it."""
    dialect = "NORMC_REWRITTEN"

    def allowed_op_types(self) -> tuple:
        return (torch._ops.OpOverload, torch._ops.HigherOrderOperator, types.FunctionType,
                types.BuiltinFunctionType)


def program_of_graph(gm: nn.Module) -> Any | None:
    """The rewritten graph as an ExportedProgram without tracing it again, or None where that cannot be
    built (a graph from symbolic_trace, submodule calls, attributes that are not tensors).

    Its inputs are the graph's own placeholders (their fake values and the trace's range constraints keep
    the dims symbolic), its weights the graph's tensors (shared, not copied), lifted to inputs. The graph
    still calls normc's canonical ops: it is for an exporter that retraces to ATen (the ONNX exporter's
    decompositions do), where it saves the whole second torch.export (the ONNX output is then checked with
    onnxruntime as ever). Every other output gets :func:`export_graph`'s program."""
    from torch._guards import detect_fake_mode
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (
        ConstantArgument,
        ExportGraphSignature,
        InputKind,
        InputSpec,
        OutputKind,
        OutputSpec,
        TensorArgument,
    )

    from normc.frontend.trace import GUARDS_MODULE
    from normc.ir.graph import param_at
    info = getattr(getattr(getattr(gm, "graph", None), "_codegen", None), "pytree_info", None)
    ranges = (getattr(gm, "meta", None) or {}).get("normc_range_constraints")
    if info is None or ranges is None:
        return None
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in inputs])
    if fake_mode is None or any(n.op == "call_method" or (n.op == "call_module" and n.target != GUARDS_MODULE)
                                for n in nodes):
        return None
    graph = fx.Graph()
    env: dict = {}
    specs, state, lifted = [], {}, {}  # lifted: id(tensor) -> placeholder (a tensor under two names: one input)
    for n in nodes:
        if n.op != "get_attr" or n in env:
            continue
        t = param_at(gm, n.target)
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) not in lifted:
            ph = graph.placeholder("p_" + re.sub(r"\W", "_", n.target))
            ph.meta["val"] = fake_mode.from_tensor(t, static_shapes=True)
            param = isinstance(t, nn.Parameter)
            specs.append(InputSpec(InputKind.PARAMETER if param else InputKind.BUFFER, TensorArgument(ph.name),
                                   n.target, persistent=None if param else True))
            state[n.target] = t
            lifted[id(t)] = ph
        env[n] = lifted[id(t)]
    for n in inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
        specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(env[n].name), None))
    outputs = []
    for n in nodes:
        if n.op in ("placeholder", "get_attr") or n.op == "call_module":  # call_module: the input guards,
            continue                                                       # which the program derives itself
        if n.op == "output":
            leaves = [env[a] if isinstance(a, fx.Node) else a for a in pytree.tree_leaves(n.args[0])]
            outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(a.name) if isinstance(a, fx.Node)
                                  else ConstantArgument("", a), None) for a in leaves]
            graph.output(tuple(leaves))
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        env[n].meta.setdefault("val", None)  # nodes a rewrite created: the retrace gives them their values
    call = ModuleCallSignature([], [], info.in_spec, _plain_spec(info.out_spec))
    try:
        return torch.export.ExportedProgram(nn.Module(), graph, ExportGraphSignature(specs, outputs), state,
                                            dict(ranges), [ModuleCallEntry("", call)],
                                            verifiers=[_RewrittenGraphVerifier])
    except Exception:  # noqa: BLE001 - the program is a shortcut; the caller traces the graph instead
        return None


def save_pt2(module: nn.Module, example_args: tuple, example_kwargs: dict | None, path: str | os.PathLike,
             *, program=None) -> Path:
    """Save ``program`` (default: :func:`export_graph` of ``module``) to ``path`` atomically.

    Hugging Face output classes become plain dicts (same keys), so loading needs torch only."""
    path = Path(path)
    ep = program if program is not None else export_graph(module, example_args, example_kwargs)[0]
    with atomic_path(path) as tmp, _quiet_pytree():
        # a file object: torch.export.save warns on names that do not end in .pt2
        with open(tmp, "wb") as f:
            torch.export.save(ep, f)
    return path


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """Load a .pt2 file written by :func:`save_pt2` as a callable module."""
    path = Path(path)
    if not path.is_file():
        raise NormcError(f"no such file: {path}", hint="give the path of a .pt2 file written by `normc export torch`")
    try:
        with open(path, "rb") as f:
            return torch.export.load(f).module()
    except Exception as exc:
        raise NormcError(f"cannot load {path} as a torch.export program: {one_line(exc)}",
                         hint="the file must be written by torch.export.save (normc export torch)") from exc


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except Exception:  # tensors without storage (meta, fake)
        return (t.device.type, id(t))


def plain_state_dict(module: nn.Module | dict) -> dict[str, torch.Tensor]:
    """A detached state dict where no two tensors share memory and all are contiguous.

    Aliased entries (tied weights, views of one buffer) are cloned so that every key is
    written and the file loads with ``safetensors.torch.load_file`` into any consumer.
    """
    sd = module if isinstance(module, dict) else module.state_dict()
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue  # extra state objects cannot go into safetensors
        t = t.detach()
        key = _storage_key(t)
        if key in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(key)
        out[name] = t
    return out


def save_state_dict(module: nn.Module | dict, path: str | os.PathLike) -> Path:
    """Write the module's weights: ``.safetensors`` by extension, otherwise ``torch.save``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = plain_state_dict(module)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    else:
        sd: Any = module if isinstance(module, dict) else module.state_dict()
        with atomic_path(path) as tmp:
            torch.save(sd, tmp)
    return path
