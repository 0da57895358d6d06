"""Functions the language can call in `where`, `let` and `rewrite` clauses.

Guards read the graph (users, sharing, shapes, module paths); value functions compute
new parameters on real tensors, in float64. Each builtin declares its arity and result
type so the checker can reject a wrong call before any model is loaded.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .graph import ParamIndex, get_param, index_keeps_last_dim, module_path, module_type, op_name, site_name


class RefuseSite(Exception):
    """A site cannot be rewritten; the message is the reason shown to the user."""


@dataclass
class Guard:
    """A boolean with the reasons it is true or false (so `not shared(w)` explains itself)."""
    value: bool
    why_false: str = ""
    why_true: str = ""

    def __bool__(self):
        return self.value


@dataclass
class NodeRef:
    """A pattern variable bound to a graph value."""
    node: fx.Node


DTYPE_NAMES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
               "i64": torch.int64, "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool}
DTYPE_BY_TORCH = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass
class Builtin:
    name: str
    min_args: int
    max_args: int
    returns: str  # tensor | number | bool | string | shape | any
    fn: Callable
    kwargs: tuple[str, ...] = ()
    doc: str = ""
    guard: bool = False  # reads the graph: only in `where`


class EvalContext:
    """What builtins may look at: the graph and the calibration statistics of this run."""

    def __init__(self, gm: fx.GraphModule, stats=None):
        self.gm = gm
        self.stats = stats  # normc.verify.calibrate.Statistics or None
        self.param_index: ParamIndex | None = None  # set by the rewriter, which keeps it up to date
        self.keep_exact_values = False  # an observer wants new parameters' float64 values (per-site checks)

    def param_users(self, node: fx.Node) -> list[fx.Node]:
        """Every node reading the parameter `node` reads (same target or same storage)."""
        index = self.param_index if self.param_index is not None else ParamIndex(self.gm)
        return index.users(node)

    def tensor(self, v, what: str = "value") -> torch.Tensor:
        """A bound value as a float64 tensor (parameters are read from the module)."""
        if isinstance(v, NodeRef):
            node = v.node
            if node.op != "get_attr":
                raise RefuseSite(f"`{site_name(node)}` is an activation, not a parameter: it has no value at compile time")
            t = get_param(self.gm, node).detach()
            return t.to(torch.float64) if t.is_floating_point() else t
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (int, float, bool)):
            return torch.tensor(v, dtype=torch.float64)
        if v is None:
            raise RefuseSite(f"{what} is absent (use `x ?? default` for optional operands)")
        if isinstance(v, (list, tuple)):
            return torch.tensor(v, dtype=torch.float64)
        raise RefuseSite(f"{what} is not a tensor")


def _node(v, fname) -> fx.Node:
    if not isinstance(v, NodeRef):
        raise RefuseSite(f"{fname}() needs a pattern variable bound to a graph value")
    return v.node


def _shape(ctx, v):
    if isinstance(v, NodeRef):
        n = v.node
        if n.op == "get_attr":
            return tuple(get_param(ctx.gm, n).shape)
        if "normc_shape" in n.meta:
            return tuple(n.meta["normc_shape"])
        raise RefuseSite(f"the shape of `{site_name(n)}` is unknown")
    return tuple(ctx.tensor(v).shape)


# ------------------------------------------------------------------ guards
def _describe_reader(u: fx.Node) -> str:
    if u.op == "output":
        return "the model output"
    from .canonicalize import reads_shape_only
    what = f"{op_name(u) or u.op} `{site_name(u)}`"
    return what + (" (reads its shape)" if reads_shape_only(u) else "")


def _single_use(ctx, v):
    n = _node(v, "single_use")
    users = list(n.users)
    what = f"{op_name(n) or n.op} `{module_path(n) or n.name}` output"
    if len(users) == 1:
        return Guard(True, why_true=f"{what} has one user")
    named = ", ".join(_describe_reader(u) for u in users[:4]) + (", ..." if len(users) > 4 else "")
    return Guard(False, why_false=f"{what} has {len(users)} users: {named}" if users else f"{what} is not read")


def _shared(ctx, v):
    n = _node(v, "shared")
    if n.op != "get_attr":
        k = len(n.users)
        return Guard(k > 1, f"`{n.name}` has one user", f"`{n.name}` has {k} users")
    users = ctx.param_users(n)
    k = len(users)
    return Guard(k > 1, why_false=f"parameter `{n.target}` is used once",
                 why_true=f"parameter `{n.target}` is shared by {k} call sites (a module called twice or a tied weight)")


def _present(ctx, v):
    return Guard(v is not None, "an optional operand is absent", "an optional operand is present")


def _has_affine(ctx, v):
    """A norm with a gain or a shift to fold (OLMo's LayerNorm has neither)."""
    n = _node(v, "has_affine")
    args = list(n.args) + [None] * 3
    ok = args[1] is not None or (op_name(n) != "rms_norm" and args[2] is not None)
    where = f"{op_name(n)} `{site_name(n)}`"
    return Guard(ok, f"{where} has no affine to fold (no weight, no bias)", f"{where} has an affine")


def _is_param(ctx, v):
    ok = isinstance(v, NodeRef) and v.node.op == "get_attr"
    name = site_name(v.node) if isinstance(v, NodeRef) else repr(v)
    return Guard(ok, f"`{name}` is not a parameter", f"`{name}` is a parameter")


def _frozen_stats(ctx, v):
    n = _node(v, "frozen_stats")
    training = n.kwargs.get("training", False)
    has_stats = len(n.args) > 2 and n.args[1] is not None and n.args[2] is not None
    where = module_path(n) or n.name
    if not has_stats:
        return Guard(False, f"batch_norm `{where}` has no running statistics (track_running_stats=False)")
    if training:
        return Guard(False, f"batch_norm `{where}` is in training mode (it normalises by batch statistics)")
    return Guard(True, why_true=f"batch_norm `{where}` uses frozen statistics")


def _glob(ctx, text, pattern):
    if isinstance(text, NodeRef):
        text = module_path(text.node)
    ok = fnmatch.fnmatchcase(str(text), str(pattern))
    return Guard(ok, f"`{text}` does not match \"{pattern}\"", f"`{text}` matches \"{pattern}\"")


def _all_zero(ctx, v):
    vals = v if isinstance(v, (list, tuple)) else [v]
    ok = all((x == 0) if not isinstance(x, str) else x == "valid" for x in vals)
    return Guard(ok, f"{tuple(vals)} is not all zero", f"{tuple(vals)} is all zero")


def _len(ctx, v):
    if isinstance(v, (NodeRef, fx.Node)):
        raise RefuseSite("the attribute is computed at run time (e.g. a shape read from a tensor), not a constant")
    return len(v) if isinstance(v, (list, tuple)) else (0 if v is None else 1)


def _keeps_last_dim(ctx, index, v):
    ok = index_keeps_last_dim(index, len(_shape(ctx, v)))
    return Guard(ok, f"index {index!r} takes part of the last dim or moves it", f"index {index!r} keeps the last dim")


def _rank(ctx, v):
    return len(_shape(ctx, v))


def _dtype(ctx, v):
    if isinstance(v, NodeRef):
        n = v.node
        dt = get_param(ctx.gm, n).dtype if n.op == "get_attr" else n.meta.get("normc_dtype")
    else:
        dt = ctx.tensor(v).dtype
    return DTYPE_BY_TORCH.get(dt, str(dt))


_PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def _precision(ctx, v):
    """Significand bits of a value's dtype (f64 53, f32 24, f16 11, bf16 8; 0 for integers)."""
    if isinstance(v, NodeRef):
        n = v.node
        dt = get_param(ctx.gm, n).dtype if n.op == "get_attr" else n.meta.get("normc_dtype")
    else:
        dt = ctx.tensor(v).dtype
    if dt is None:
        raise RefuseSite("the dtype of the value is unknown")
    return _PRECISION.get(dt, 0)


def _users(ctx, v):
    return len(_node(v, "users").users)


# ------------------------------------------------------------------ values (float64 tensors)
def _t(ctx, v):
    return ctx.tensor(v)


def _reduce(fn):
    def reduce(ctx, x, dim=None, keepdim=False):
        t = _t(ctx, x)
        if dim is None:
            return fn(t)
        dims = tuple(dim) if isinstance(dim, (list, tuple)) else (int(dim),)
        return fn(t, dim=dims, keepdim=bool(keepdim))
    return reduce


def _amax(t, dim=None, keepdim=False):
    return t.amax() if dim is None else t.amax(dim=dim, keepdim=keepdim)


def _amin(t, dim=None, keepdim=False):
    return t.amin() if dim is None else t.amin(dim=dim, keepdim=keepdim)


def _stat(kind):
    """absmax/min/max/mean/rms: of a parameter along dims, or of an activation from calibration."""
    reducers = {"absmax": lambda t, **k: _amax(t.abs(), **k), "max": _amax, "min": _amin,
                "mean": lambda t, dim=None, keepdim=False: t.mean() if dim is None else t.mean(dim=dim, keepdim=keepdim),
                "rms": lambda t, dim=None, keepdim=False: (t * t).mean().sqrt() if dim is None
                else (t * t).mean(dim=dim, keepdim=keepdim).sqrt(),
                "sum": lambda t, dim=None, keepdim=False: t.sum() if dim is None else t.sum(dim=dim, keepdim=keepdim)}

    def stat(ctx, x, dim=None, keepdim=False):
        if isinstance(x, NodeRef) and x.node.op != "get_attr" and kind != "sum":
            if ctx.stats is None:
                raise RefuseSite(f"{kind}({x.node.name}) needs calibration statistics: add `calibrate` before this step")
            return ctx.stats.get(x.node, kind)  # per channel (last dim), float64
        # a max is exact in a float parameter's own dtype: no float64 copy of a whole weight for it
        own = get_param(ctx.gm, x.node).detach() if isinstance(x, NodeRef) and x.node.op == "get_attr" \
            and kind in ("absmax", "max", "min") else None
        native = own is not None and own.is_floating_point()
        t = own if native else _t(ctx, x)
        if dim is None:
            r = reducers[kind](t)
        else:
            dims = tuple(dim) if isinstance(dim, (list, tuple)) else (int(dim),)
            r = reducers[kind](t, dim=dims, keepdim=bool(keepdim))
        return r.to(torch.float64) if native else r
    return stat


def _bcast(ctx, s, like, dim=0, groups=1):
    """Reshape a vector so it broadcasts along `dim` of `like` (w * bcast(s, w, 0) scales output channels).
    With `groups` > 1, `like` is a grouped weight whose dim 0 holds the groups one after another and `s` has
    groups × size(like, dim) entries, group-major: a transposed conv weight [in, out/groups, k...] scaled per
    output channel is w * bcast(s, w, 1, groups = g)."""
    s = _t(ctx, s)
    shape_like = _shape(ctx, like)
    rank, dim, groups = len(shape_like), int(dim), int(groups)
    shape = [1] * rank
    shape[dim] = -1
    if groups == 1:
        return s.reshape(shape)
    if dim == 0 or shape_like[0] % groups or s.numel() != groups * shape_like[dim]:
        raise RefuseSite(f"bcast: {s.numel()} values do not split into {groups} groups of dim {dim} of a "
                         f"{list(shape_like)} tensor")
    per_group = shape_like[0] // groups  # rows of dim 0 in each group
    grid = s.reshape(groups, 1, shape_like[dim]).expand(groups, per_group, shape_like[dim])
    out = [shape_like[0]] + [1] * (rank - 1)
    out[dim] = shape_like[dim]
    return grid.reshape(shape_like[0], shape_like[dim]).reshape(out)


def _reshape(ctx, x, shape):
    return _t(ctx, x).reshape([int(v) for v in shape])


def _transpose(ctx, x):
    return _t(ctx, x).transpose(0, 1) if _t(ctx, x).dim() >= 2 else _t(ctx, x)


def _clamp(ctx, x, min=None, max=None):
    return _t(ctx, x).clamp(min=min, max=max)


def _size(ctx, x, dim=None):
    shape = _shape(ctx, x)
    return shape if dim is None else shape[int(dim)]


def _where(ctx, cond, a, b):
    return torch.where(_t(ctx, cond).bool(), _t(ctx, a), _t(ctx, b))


def _unary(fn):
    return lambda ctx, x: fn(_t(ctx, x))


def _binary(fn):
    return lambda ctx, a, b: fn(_t(ctx, a), _t(ctx, b))


def _b(name, lo, hi, returns, fn, kwargs=(), doc="", guard=False):
    return Builtin(name, lo, hi, returns, fn, tuple(kwargs), doc, guard)


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    # guards
    _b("single_use", 1, 1, "bool", _single_use, doc="the value has exactly one user", guard=True),
    _b("shared", 1, 1, "bool", _shared, doc="the parameter is read by more than one call site", guard=True),
    _b("present", 1, 1, "bool", _present, doc="an optional operand is present", guard=True),
    _b("has_affine", 1, 1, "bool", _has_affine, doc="a norm has a gain or a shift (something to fold)", guard=True),
    _b("is_param", 1, 1, "bool", _is_param, doc="the value is a parameter (known at compile time)", guard=True),
    _b("frozen_stats", 1, 1, "bool", _frozen_stats, doc="a batch_norm uses running statistics (eval mode)", guard=True),
    _b("glob", 2, 2, "bool", _glob, doc="a string (or a value's module path) matches a glob", guard=True),
    _b("all_zero", 1, 1, "bool", _all_zero, doc="an attribute (padding) is zero everywhere", guard=True),
    _b("is_number", 1, 1, "bool", lambda ctx, v: Guard(isinstance(v, (int, float)) and not isinstance(v, bool),
                                                       f"{v!r} is not a constant number", "a constant number"),
       doc="a constant number (not a graph value)", guard=True),
    _b("len", 1, 1, "number", _len, doc="length of a list attribute (normalized_shape)"),
    _b("keeps_last_dim", 2, 2, "bool", _keeps_last_dim, doc="an index leaves the last dim of a value whole", guard=True),
    _b("rank", 1, 1, "number", _rank, doc="number of dims"),
    _b("shape", 1, 1, "shape", lambda ctx, v: list(_shape(ctx, v)), doc="the shape, as a list"),
    _b("size", 1, 2, "number", _size, doc="size(x, dim)"),
    _b("dtype", 1, 1, "string", _dtype, doc="dtype name: f32, f64, f16, bf16, i64, ..."),
    _b("users", 1, 1, "number", _users, doc="number of users of a value"),
    _b("precision", 1, 1, "number", _precision, doc="significand bits of a value's dtype (f64 53, f32 24, f16 11, bf16 8)"),
    _b("path", 1, 1, "string", lambda ctx, v: module_path(_node(v, "path")), doc="module path of a value"),
    _b("module_type", 1, 1, "string", lambda ctx, v: module_type(_node(v, "module_type")), doc="class name of the module"),
    _b("op", 1, 1, "string", lambda ctx, v: op_name(_node(v, "op")) or "", doc="canonical op name of a value"),
    # values
    _b("sqrt", 1, 1, "tensor", _unary(torch.sqrt)), _b("rsqrt", 1, 1, "tensor", _unary(torch.rsqrt)),
    _b("abs", 1, 1, "tensor", _unary(torch.abs)), _b("exp", 1, 1, "tensor", _unary(torch.exp)),
    _b("log", 1, 1, "tensor", _unary(torch.log)), _b("pow", 2, 2, "tensor", _binary(torch.pow)),
    _b("maximum", 2, 2, "tensor", _binary(torch.maximum)), _b("minimum", 2, 2, "tensor", _binary(torch.minimum)),
    _b("clamp", 1, 3, "tensor", _clamp, ("min", "max")),
    _b("sum", 1, 3, "tensor", _stat("sum"), ("dim", "keepdim")),
    _b("mean", 1, 3, "tensor", _stat("mean"), ("dim", "keepdim")),
    _b("max", 1, 3, "tensor", _stat("max"), ("dim", "keepdim")),
    _b("min", 1, 3, "tensor", _stat("min"), ("dim", "keepdim")),
    _b("absmax", 1, 3, "tensor", _stat("absmax"), ("dim", "keepdim"), doc="max |x| of a parameter along dims, or per channel of an activation (calibration)"),
    _b("rms", 1, 3, "tensor", _stat("rms"), ("dim", "keepdim")),
    _b("bcast", 2, 4, "tensor", _bcast, ("dim", "groups"),
       doc="reshape a vector to broadcast along dim of another tensor (groups: per group of a grouped weight)"),
    _b("reshape", 2, 2, "tensor", _reshape), _b("t", 1, 1, "tensor", _transpose, doc="swap the first two dims"),
    _b("where", 3, 3, "tensor", _where),
    _b("ones_like", 1, 1, "tensor", _unary(torch.ones_like)), _b("zeros_like", 1, 1, "tensor", _unary(torch.zeros_like)),
]}

# names usable as constants in expressions
CONSTANTS = dict(DTYPE_NAMES)
