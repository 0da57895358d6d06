"""Dynamic shapes: which input dims stay symbolic from tracing to the outputs, and inputs at other shapes.

A model is traced with ``torch.export`` and ``Dim.AUTO`` on every dim of every tensor input: torch keeps
a dim symbolic when the model is generic in it and fixes it otherwise (a hidden size read by a weight).
The dims it kept, read back from the program's placeholders, are a :class:`DynamicDims`: one symbol per
independent size (``input_ids`` and ``attention_mask`` share batch and sequence), with its range.

``symbolic_trace`` graphs do not know their shapes: they get *candidate* dims (batch; the sequence of
integer inputs; height and width of images) that verification confirms by running the original there.

torch.export fixes a dim whose example size is 0 or 1, so batch (and sequence) dims of size 1 are
traced at size 2 (the example repeated): the graph then runs at 1 as well (checked on the example).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

Inputs = list[tuple[tuple, dict]]


@dataclass
class DynamicDims:
    """Symbolic input dims. ``dims[i]`` maps dim -> symbol for the i-th tensor leaf of ``(args, kwargs)``
    (pytree order); ``sizes`` is each symbol's size in the example, ``ranges`` its (min, max or None)."""

    dims: list[dict[int, str]]
    sizes: dict[str, int]
    ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    confirmed: bool = True  # False: candidates of a symbolic_trace graph, not yet seen by torch.export
    names: list[str] = field(default_factory=list)  # input name of each leaf (for messages and reports)

    @property
    def symbolic(self) -> bool:
        return any(self.dims)

    def describe(self) -> dict[str, list[str]]:
        """``{input: ["batch", "sequence", 3, ...]}``-like summary for reports (symbols by role name)."""
        out = {}
        for i, d in enumerate(self.dims):
            if d:
                name = self.names[i] if i < len(self.names) else f"input_{i}"
                out[name] = {int(k): v for k, v in sorted(d.items())}
        return out

    def restrict(self, symbols: set[str]) -> DynamicDims:
        """The same with only ``symbols`` kept symbolic."""
        dims = [{k: v for k, v in d.items() if v in symbols} for d in self.dims]
        return dataclasses.replace(self, dims=dims, sizes={s: n for s, n in self.sizes.items() if s in symbols},
                                   ranges={s: r for s, r in self.ranges.items() if s in symbols})


def tensor_leaves(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    return pytree.tree_flatten((tuple(args), dict(kwargs or {})))


def leaf_names(args: tuple, kwargs: dict, arg_names: list[str] | None = None) -> list[str]:
    """A name per leaf of ``(args, kwargs)``: forward's parameter name or the keyword (``name_i`` inside
    a nested value)."""
    names: list[str] = []
    arg_names = list(arg_names or [])
    for i, a in enumerate(args):
        base = arg_names[i] if i < len(arg_names) else f"arg{i}"
        leaves = pytree.tree_leaves(a)
        names += [base] if len(leaves) == 1 else [f"{base}_{j}" for j in range(len(leaves))]
    for k, v in (kwargs or {}).items():
        leaves = pytree.tree_leaves(v)
        names += [k] if len(leaves) == 1 else [f"{k}_{j}" for j in range(len(leaves))]
    return names


# --------------------------------------------------------------------------- before tracing
def _bumpable(t: torch.Tensor, dim: int) -> bool:
    """Dims traced at 2 when the example has 1: batch, and the sequence of integer (token) inputs."""
    return dim == 0 or (dim == 1 and t.dim() == 2 and not t.is_floating_point())


def export_example(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """The example with size-1 batch/sequence dims repeated to 2 (torch.export fixes sizes 0 and 1);
    returns ``(args, kwargs, changed)``."""
    changed = False

    def bump(x):
        nonlocal changed
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        for d in range(min(x.dim(), 2)):
            if x.shape[d] == 1 and _bumpable(x, d):
                x = torch.cat([x, x], dim=d)
                changed = True
        return x

    new_args, new_kwargs = pytree.tree_map(bump, (tuple(args), dict(kwargs or {})))
    return new_args, new_kwargs, changed


def auto_dynamic_shapes(module, args: tuple, kwargs: dict, only: DynamicDims | None = None):
    """``dynamic_shapes`` for ``torch.export.export(module, args, kwargs)``: ``Dim.AUTO`` on every dim of
    every tensor input (or, with ``only``, on the dims it lists)."""
    from torch.export import Dim, ShapesCollection

    sc = ShapesCollection()
    leaves, _ = tensor_leaves(args, kwargs)
    any_dim = False
    for i, t in enumerate(leaves):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        if only is None:
            spec = {d: Dim.AUTO for d in range(t.dim())}
        else:
            spec = {d: Dim.AUTO for d in (only.dims[i] if i < len(only.dims) else {})}
        if spec:
            sc[t] = spec
            any_dim = True
    return sc.dynamic_shapes(module, tuple(args), dict(kwargs or {})) if any_dim else None


# --------------------------------------------------------------------------- after tracing
def _role(t, d: int, name: str) -> str:
    """What a dim is, for people: batch, sequence (integer inputs), height/width (images), else name_dimD."""
    rank = len(t.shape)
    floating = t.dtype.is_floating_point or t.dtype.is_complex
    if d == 0:
        return "batch"
    if d == 1 and rank == 2 and not floating:
        return "sequence"
    if rank == 4 and floating and d in (2, 3):
        return "height" if d == 2 else "width"
    return f"{name}_dim{d}"


def symbol_roles(ep) -> dict[str, str]:
    """``{torch symbol: role name}`` for the symbols of an ExportedProgram's user inputs (``s72`` ->
    ``batch``): the first input dim a symbol sizes names it; names stay unique."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    roles: dict[str, str] = {}
    used: set[str] = set()
    for pname in ep.graph_signature.user_inputs:
        val = placeholders[pname].meta.get("val") if pname in placeholders else None
        if not hasattr(val, "shape"):
            continue
        for d, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt) and getattr(s.node.expr, "is_Symbol", False) and str(s.node.expr) not in roles:
                base = name = _role(val, d, str(pname))
                k = 1
                while name in used:
                    k += 1
                    name = f"{base}_{k}"
                used.add(name)
                roles[str(s.node.expr)] = name
    return roles


def dims_of_program(ep, args: tuple, kwargs: dict, names: list[str] | None = None) -> DynamicDims:
    """The symbolic dims of an ExportedProgram's user inputs (matched to the leaves of ``(args, kwargs)``),
    symbols named by role (batch, sequence, height, width)."""
    leaves, _ = tensor_leaves(args, kwargs)
    user = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    dims: list[dict[int, str]] = [{} for _ in leaves]
    sizes: dict[str, int] = {}
    ranges: dict[str, tuple[int, int | None]] = {}
    if len(user) != len(leaves):
        return DynamicDims(dims, sizes, ranges, True, names or [])
    roles = symbol_roles(ep)
    bounds = {str(k): v for k, v in ep.range_constraints.items()}
    for i, (pname, t) in enumerate(zip(user, leaves)):
        val = placeholders[pname].meta.get("val") if pname in placeholders else None
        if not isinstance(t, torch.Tensor) or not hasattr(val, "shape"):
            continue
        for d, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt) and getattr(s.node.expr, "is_Symbol", False):
                raw = str(s.node.expr)
                sym = roles.get(raw, raw)
                dims[i][d] = sym
                sizes.setdefault(sym, int(t.shape[d]))
                vr = bounds.get(raw)
                if vr is not None:
                    ranges[sym] = (_bound(vr.lower) or 0, _bound(vr.upper))
    return DynamicDims(dims, sizes, ranges, True, names or [])


def _bound(v) -> int | None:
    """An int bound of a value range; None for an infinite one."""
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def candidate_dims(args: tuple, kwargs: dict, names: list[str] | None = None) -> DynamicDims:
    """Dims a shape-generic (symbolic_trace) graph probably is generic in: batch (dim 0 of every input),
    the sequence of integer inputs of rank 2, height and width of rank-4 float inputs."""
    leaves, _ = tensor_leaves(args, kwargs)
    dims: list[dict[int, str]] = []
    sizes: dict[str, int] = {}
    for i, t in enumerate(leaves):
        d: dict[int, str] = {}
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            want = {0: "batch"}
            if t.dim() == 2 and not (t.is_floating_point() or t.is_complex()):
                want[1] = "sequence"
            if t.dim() == 4 and t.is_floating_point():
                want[2], want[3] = f"height_{i}", f"width_{i}"
            for k, sym in want.items():
                size = int(t.shape[k])
                if sizes.setdefault(sym, size) == size:  # inputs that disagree on a size do not share it
                    d[k] = sym
        dims.append(d)
    return DynamicDims(dims, sizes, {}, False, names or [])


# --------------------------------------------------------------------------- inputs at other shapes
def _other_size(size: int, lo: int, hi: int | None, variant: int, batch: bool) -> int:
    """Variant 0: batch + 2, other dims about halved; variant 1: batch 1 (2 if it was 1), others + 1."""
    lo = max(lo, 1)
    if variant == 0:
        want = size + 2 if batch else max(lo, size // 2 + 1)
    else:
        want = (2 if size == 1 else 1) if batch else size + 1
    if hi is not None:
        want = min(want, hi)
    want = max(want, lo)
    if want == size:  # the range leaves no room on that side: the other side
        want = size + 1 if hi is None or size + 1 <= hi else size - 1
    return want if want >= lo else size


def _resize(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``t`` with dim ``dim`` of size ``n``: cut, or the example repeated."""
    size = t.shape[dim]
    if n <= size:
        return t.narrow(dim, 0, n).clone()
    reps = [1] * t.dim()
    reps[dim] = -(-n // size)
    return t.repeat(*reps).narrow(dim, 0, n).clone()


def resized_inputs(dyn: DynamicDims, args: tuple, kwargs: dict, new_sizes: dict[str, int],
                   specs: list | None = None, generator: torch.Generator | None = None) -> tuple[tuple, dict]:
    """The example at ``new_sizes`` (symbol -> size): drawn from the input specs when there is one spec
    per tensor leaf, else the example cut or repeated."""
    leaves, tree = tensor_leaves(args, kwargs)
    out = []
    use_specs = specs is not None and len(specs) == len(leaves) and all(
        isinstance(t, torch.Tensor) and tuple(getattr(s, "shape", ())) == tuple(t.shape) for s, t in zip(specs, leaves))
    for i, t in enumerate(leaves):
        d = dyn.dims[i] if i < len(dyn.dims) else {}
        if not isinstance(t, torch.Tensor) or not d:
            out.append(t)
            continue
        shape = list(t.shape)
        for k, sym in d.items():
            shape[k] = new_sizes.get(sym, shape[k])
        if use_specs and generator is not None:
            out.append(dataclasses.replace(specs[i], shape=tuple(shape)).sample(generator))
            continue
        for k, n in enumerate(shape):
            if n != t.shape[k]:
                t = _resize(t, k, n)
        out.append(t)
    a, kw = pytree.tree_unflatten(out, tree)
    return tuple(a), dict(kw)


def inputs_at_other_shapes(dyn: DynamicDims | None, args: tuple, kwargs: dict, *, specs: list | None = None,
                           n: int = 2, seed: int = 0, check: Callable[[tuple, dict], object] | None = None,
                           notes: list[str] | None = None) -> tuple[Inputs, set[str]]:
    """Up to ``n`` input sets at shapes other than the example's, one per variant of the symbolic sizes.

    ``check(args, kwargs)`` runs the original model (it raises where the model cannot take that shape,
    e.g. a sequence past its position table): a variant it refuses is retried with the batch alone
    changed, then dropped. Returns the inputs and the symbols they varied (the dims verified dynamic)."""
    if dyn is None or not dyn.symbolic:
        return [], set()
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    batch_syms = {d[0] for d in dyn.dims if 0 in d}
    found: Inputs = []
    varied: set[str] = set()
    for variant in range(n):
        sizes = {s: _other_size(e, *dyn.ranges.get(s, (1, None)), variant, s in batch_syms)
                 for s, e in dyn.sizes.items()}
        tries = [sizes]
        batch_only = {s: v for s, v in sizes.items() if s in batch_syms}
        if batch_only and batch_only != sizes:
            tries.append(batch_only)
        for attempt in tries:
            attempt = {s: v for s, v in attempt.items() if v != dyn.sizes[s]}
            if not attempt:
                continue
            a, kw = resized_inputs(dyn, args, kwargs, attempt, specs, gen)
            if check is not None:
                try:
                    check(a, kw)
                except Exception as e:  # noqa: BLE001 - the model itself cannot take this shape
                    if notes is not None:
                        shape = ", ".join(f"{s}={v}" for s, v in sorted(attempt.items()))
                        notes.append(f"the model does not run at {shape} ({type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})")
                    continue
            found.append((a, kw))
            varied |= set(attempt)
            break
    return found, varied


def input_shapes(args: tuple, kwargs: dict) -> tuple:
    """The shapes of the tensor leaves (to tell inputs at the example shape from the others)."""
    leaves, _ = tensor_leaves(args, kwargs)
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves)
