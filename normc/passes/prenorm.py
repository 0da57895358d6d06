"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm (Jiang et al. 2023), as a global pass.

If every tensor written into the residual stream has zero mean over the hidden dim, each
LayerNorm reading the stream equals an RMSNorm with the same eps. So:

1. find the stream: walking back from every LayerNorm, the `add`s (every branch of parallel
   blocks) and the ops that carry it without mixing channels (reshapes, permutes, token
   selection, pooling over tokens), tracking which axis holds the hidden channels;
2. check every writer is affine and can be recentred (linear, embedding, conv with one group,
   parameters such as CLS / position tables, a per-channel scale such as LayerScale, through
   reshapes and concatenation), and every stream value is read only by LayerNorms or by the
   stream itself (no post-LN, no un-normed residual output);
3. recentre the writers (`W - mean over the output dim`, `b - mean(b)`, tables minus their
   row mean; a LayerScale `λ` is folded into the writer first and its multiply dropped) — a
   recentred table gets its own tensor, so a tied LM head is untied. A stream that *starts* at a
   norm (BLOOM's `word_embeddings_layernorm`, CLIP's `pre_layrnorm`) gets one centring op
   `y - mean(y)` after it: its per-channel affine cannot centre it alone;
4. replace the LayerNorm readers by RMSNorm (same eps; a LayerNorm bias stays as an add).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..ir import ops
from ..ir.canonicalize import reads_shape_only
from ..ir.graph import aten_base, get_param, index_keeps_last_dim, module_path, new_param, op_name, param_users, site_name
from ..ir.rewrite import RuleReport, SiteRecord, finish
from .registry import global_pass

_NORMS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "fixed_norm", "norm_act", "crms_norm")


class Refuse(Exception):
    pass


@dataclass
class _Action:
    kind: str            # linear | conv | conv_transpose | table | param | centre
    node: fx.Node        # the node that reads the parameter(s) (centre: the norm whose output starts the stream)
    param_nodes: list    # get_attr nodes to recentre (weight, bias) or (table,) / (param,)
    axis: int | None     # the axis of the hidden dim in the (first) parameter; None: the parameter lacks it
    scale: torch.Tensor | None = None  # per-channel factor folded in first (LayerScale), float64 [hidden]


@dataclass
class _Stream:
    readers: list
    adds: set = field(default_factory=set)           # stream values: adds and the ops carrying the stream
    axis: dict = field(default_factory=dict)         # stream value -> the axis of its hidden channels
    writers: list = field(default_factory=list)      # (writer, its hidden axis, the stream node it feeds, its reader)
    actions: list = field(default_factory=list)
    bypass: list = field(default_factory=list)       # per-channel multiplies folded into their writers
    hidden: int = 0


def _shape(node) -> tuple | None:
    shape = node.meta.get("normc_shape") if isinstance(node, fx.Node) else None
    return tuple(shape) if shape is not None else None


def _rank(node) -> int | None:
    shape = _shape(node)
    return len(shape) if shape is not None else None


def _hidden(node) -> int | None:
    shape = _shape(node)
    return shape[-1] if shape else None


def _is_add(n) -> bool:
    return isinstance(n, fx.Node) and op_name(n) in ("add", "sub") and all(isinstance(a, fx.Node) for a in n.args[:2])


def _value_users(n: fx.Node) -> list:
    return [u for u in n.users if not reads_shape_only(u)]


# ------------------------------------------------------------------ axes through ops that carry the stream
def _dims(node: fx.Node) -> list | None:
    """The permutation of a permute node (aten, torch or method form)."""
    rest = node.args[1:]
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else node.kwargs.get("dims", rest)
    return [int(d) for d in dims] if dims and all(isinstance(d, int) for d in dims) else None


def _reshape_axis(src: fx.Node, node: fx.Node, axis: int) -> int | None:
    """The input axis of output `axis` through a reshape: same size, same number of elements before it."""
    a, b = _shape(src), _shape(node)
    if a is None or b is None:
        return None
    before = 1
    for s in b[:axis]:
        before *= s
    acc = 1
    for j, s in enumerate(a):
        if acc == before and s == b[axis]:
            return j
        acc *= s
    return None


def carried_axis(node: fx.Node, axis: int) -> int | None:
    """If `node` moves its first input along without mixing the channels of output axis `axis`, the axis those
    channels are on in the input; else None. (reshape, permute, transpose, casts, clones, token selection,
    slicing and pooling over other axes.)"""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    rin, rout = _rank(src), _rank(node)
    if rin is None or rout is None:
        return None
    name, base = op_name(node), aten_base(node.target) if node.op == "call_function" else None
    if name in ("cast", "contiguous", "to", "clone", "dropout", "alias"):
        return axis if rin == rout else None
    if base == "select" or (node.op == "call_function" and node.target is ops.getitem):
        if base == "select":
            dim = int(node.args[1]) % rin
            a_in = axis + (axis >= dim)
            return a_in if a_in != dim else None
        index = node.kwargs.get("index")
        return rin - 1 if axis == rout - 1 and index_keeps_last_dim(index, rin) else None
    if base == "slice":
        dim = int(node.args[1]) % rin if len(node.args) > 1 else 0
        return axis if dim != axis and rin == rout else None
    if name == "permute":
        dims = _dims(node)
        return dims[axis] % rin if dims and len(dims) == rout else None
    if name == "transpose":
        if base == "t" or (node.op == "call_method" and node.target == "t"):
            d0, d1 = 0, 1
        elif len(node.args) >= 3:
            d0, d1 = int(node.args[1]) % rin, int(node.args[2]) % rin
        else:
            return None
        return {d0: d1, d1: d0}.get(axis, axis)
    if name == "expand":
        return axis - (rout - rin) if axis >= rout - rin else None
    if name == "reshape":
        return _reshape_axis(src, node, axis)
    if name == "reduce_mean":
        reduced = sorted({int(d) % rin for d in node.kwargs.get("dim", [-1])})
        kept = [d for d in range(rin) if d not in reduced]
        a_in = axis if node.kwargs.get("keepdim", False) else (kept[axis] if axis < len(kept) else None)
        return a_in if a_in is not None and a_in not in reduced else None
    return None


def _carries(node, axis) -> bool:
    return op_name(node) not in ("add", "sub") and carried_axis(node, axis) is not None


# ------------------------------------------------------------------ finding the streams
def find_streams(gm: fx.GraphModule, readers: list[fx.Node]) -> list[_Stream]:
    """Group LayerNorm readers by the residual stream they read.

    Walking back from each reader's input, `add`s and the ops that carry the stream are stream
    values (with the axis of their hidden channels); anything else feeding it is a writer.
    """
    streams: list[_Stream] = []
    owner: dict[fx.Node, _Stream] = {}

    def merge(into: _Stream, other: _Stream):
        into.readers += other.readers
        into.adds |= other.adds
        into.axis.update(other.axis)
        into.writers += other.writers
        for k, s in list(owner.items()):
            if s is other:
                owner[k] = into
        streams.remove(other)

    for ln in readers:
        stream = _Stream(readers=[ln])
        streams.append(stream)
        src = ln.args[0]
        todo = [(src, (_rank(src) or 1) - 1, ln, ln)]
        while todo:
            v, axis, into, reader = todo.pop()
            if v in owner:
                if owner[v] is not stream:
                    merge(stream, owner[v])
                known = stream.axis.get(v)
                if known is not None and known != axis:
                    stream.writers.append((v, axis, into, reader))  # read along two axes: refused as a writer
                continue
            owner[v] = stream
            if _is_add(v) and _rank(v) is not None:
                stream.adds.add(v)
                stream.axis[v] = axis
                for operand in v.args[:2]:
                    r = _rank(operand)
                    a = axis - (_rank(v) - r) if r is not None else axis
                    if r is not None and 0 <= a and _shape(operand)[a] == _shape(v)[axis]:
                        todo.append((operand, a, v, v))
                    else:  # broadcast along the hidden dim: a writer of its own
                        stream.writers.append((operand, a if r is not None and a >= 0 else None, v, v))
            elif _carries(v, axis):
                stream.adds.add(v)
                stream.axis[v] = axis
                todo.append((v.args[0], carried_axis(v, axis), into, v))
            else:
                stream.writers.append((v, axis, into, reader))
    return streams


# ------------------------------------------------------------------ who reads the stream
def output_names(gm: fx.GraphModule) -> dict:
    """Graph value -> the name of the model output it is (`last_hidden_state`, `logits`, `output 0`)."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return {}
    paths, _ = pytree.tree_flatten_with_path(out.args[0])  # dicts and named tuples of a symbolic trace
    leaves = [leaf for _, leaf in paths]
    names = [pytree.keystr(p).strip("[]'\".") or f"output {i}" for i, (p, _) in enumerate(paths)]
    spec = getattr(gm, "_out_spec", None)  # torch.export: a flat tuple, the structure (ModelOutput) kept aside
    if spec is not None and spec.num_leaves == len(leaves):
        try:
            nested, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(leaves))), spec))
            names = [pytree.keystr(p).strip("[]'\".") or names[i] for i, (p, _) in enumerate(nested)]
        except Exception:  # noqa: BLE001 - a name is a courtesy: fall back to the position
            pass
    names = [n if not n.isdigit() else f"output {n}" for n in names]
    return {leaf: name for leaf, name in zip(leaves, names) if isinstance(leaf, fx.Node)}


def _check_users(gm, stream: _Stream, reader_set: set) -> None:
    values = set(stream.adds) | {w for w, *_ in stream.writers if isinstance(w, fx.Node) and w.op != "get_attr"}
    outputs = None

    def raw_output(v):
        nonlocal outputs
        outputs = outputs if outputs is not None else output_names(gm)
        return Refuse(f"the model output `{outputs.get(v, 'output')}` is the residual stream itself "
                      f"(`{site_name(v)}`, not normed): centring the stream would change it; "
                      "convert only models whose outputs are read through a LayerNorm")

    for v in values:
        for u in _value_users(v):
            if u in stream.adds or u in reader_set:
                continue
            if u.op == "output":
                raise raw_output(v)
            if op_name(u) == "layer_norm":
                raise Refuse(f"LayerNorm `{site_name(u)}` reads the stream but is out of scope: "
                             "convert the whole stream (drop `on`) or widen the scope")
            if _is_add(u) or _carries(u, stream.axis.get(v, (_rank(v) or 1) - 1)):
                # the stream goes on past its last reader: to LayerNorms out of scope, or to something else
                norms, end = _downstream(u)
                if norms:
                    named = ", ".join(f"`{site_name(n)}`" for n in norms[:3])
                    raise Refuse(f"the residual stream goes on past the LayerNorms in scope to {named}, out of "
                                 "scope: convert the whole stream (drop `on`) or widen the scope")
                if end is not None and end[1].op == "output":
                    raise raw_output(end[0])
                if end is not None:
                    raise Refuse(f"the residual stream value `{site_name(end[0])}` is also read by "
                                 f"{op_name(end[1])} `{site_name(end[1])}`, which is not a LayerNorm")
                continue
            raise Refuse(f"the residual stream value `{site_name(v)}` is also read by {op_name(u)} "
                         f"`{site_name(u)}`, which is not a LayerNorm")


def _downstream(start: fx.Node) -> tuple[list, tuple | None]:
    """Where the stream goes from `start` (following adds and stream-carrying ops): the LayerNorms it reaches,
    and the first (value, reader) that is neither (a model output, a linear...)."""
    found, end, todo, seen = [], None, [start], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in _value_users(n):
            if op_name(u) == "layer_norm":
                found.append(u)
            elif _is_add(u) or op_name(u) in ("reshape", "permute", "transpose", "contiguous", "cast", "getitem"):
                todo.append(u)
            elif end is None:
                end = (n, u)
    return found, end


# ------------------------------------------------------------------ norms written into the stream
def _depends_on(node: fx.Node, target: fx.Node, limit: int = 100_000) -> bool:
    """Whether `target` is an ancestor of `node` (bounded walk)."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n is target:
            return True
        if n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _residual_input(norm: fx.Node) -> fx.Node | None:
    """The add `x + f(x)` a norm normalizes (post-LN), if it is one."""
    x = norm.args[0] if norm.args else None
    while isinstance(x, fx.Node) and not _is_add(x) and carried_axis(x, (_rank(x) or 1) - 1) is not None:
        x = x.args[0]
    if not _is_add(x):
        return None
    a, b = x.args[:2]
    return x if _depends_on(a, b) or _depends_on(b, a) else None


def _starts_stream(node: fx.Node, stream: _Stream) -> bool:
    """Whether a reader of the stream reads `node` directly (or through ops that carry the stream): it is the
    stream's first value, not a branch written into it."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in _value_users(n):
            if u in stream.readers:
                return True
            if u in stream.adds and not _is_add(u):
                todo.append(u)
    return False


# ------------------------------------------------------------------ planning the writers
@dataclass
class _Walk:
    gm: fx.GraphModule
    stream: _Stream
    seen: set = field(default_factory=set)


def _scale_vector(walk: _Walk, mul: fx.Node, param: fx.Node, axis: int) -> torch.Tensor | None:
    """A per-channel multiply along the hidden axis (LayerScale): the factor as a float64 vector, else None."""
    t = get_param(walk.gm, param)
    rank = _rank(mul)
    if not t.is_floating_point() or rank is None or t.dim() > rank:
        return None
    pos = axis - (rank - t.dim())  # the parameter's axis that lines up with the hidden axis
    others = [s for i, s in enumerate(t.shape) if i != pos]
    if any(s != 1 for s in others) or (0 <= pos and t.shape[pos] not in (1, walk.stream.hidden)):
        return None
    vec = t.detach().to(torch.float64).reshape(-1)
    return vec.expand(walk.stream.hidden).clone() if vec.numel() == 1 else vec


def _plan_writer(walk: _Walk, node, axis: int | None, into: fx.Node, via: fx.Node | None = None,
                 scale: torch.Tensor | None = None) -> None:
    """Plan the recentring of one writer whose hidden channels are on `axis` of its output.
    `into`: the stream node it feeds; `via`: the node reading `node`; `scale`: a per-channel factor
    (LayerScale) multiplied in after it, to fold into its parameters."""
    gm, stream, hidden = walk.gm, walk.stream, walk.stream.hidden
    via = via if via is not None else into
    if not isinstance(node, fx.Node):
        raise Refuse(f"`{site_name(via)}` adds the constant {node!r} to every channel of the stream")
    if (node, via) in walk.seen:
        return
    walk.seen.add((node, via))
    op = op_name(node)
    where = site_name(node)
    if scale is not None and node.op != "get_attr" and len(_value_users(node)) != 1:
        raise Refuse(f"the per-channel scale after `{where}` cannot be folded into it: its output has "
                     f"{len(_value_users(node))} readers")
    if op in _NORMS:
        residual = _residual_input(node)
        if residual is not None:
            raise Refuse(f"post-LN: {op} `{where}` normalizes the residual add `{site_name(residual)}` and its output "
                         "is written into the residual stream (post-LN models are not Pre-LN)")
        if not _starts_stream(node, stream):
            raise Refuse(f"post-LN/sandwich norm: the residual add `{site_name(into)}` reads the {op} output `{where}` "
                         "(a norm on a branch before the add: post-LN and sandwich-norm models are not Pre-LN)")
    if node.op == "get_attr":
        t = get_param(gm, node)
        if axis is not None and axis >= 0 and t.shape[axis] not in (1, hidden):
            raise Refuse(f"parameter `{node.target}` written into the stream has {t.shape[axis]} channels, not {hidden}")
        if scale is not None and (axis is None or axis < 0 or t.shape[axis] != hidden):
            raise Refuse(f"parameter `{node.target}` is the same on every channel but scaled per channel after it")
        stream.actions.append(_Action("param", via, [node], axis, scale))
        return
    if axis is None:
        raise Refuse(f"residual writer `{where}` ({op}) is broadcast along the hidden dim")
    rank = _rank(node)
    if op == "linear":
        w, b = node.args[1], (node.args[2] if len(node.args) > 2 else None)
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and b.op != "get_attr"):
            raise Refuse(f"residual writer `{where}` is a linear whose weight is not a parameter")
        if axis != rank - 1 or get_param(gm, w).shape[0] != hidden:
            raise Refuse(f"residual writer `{where}`: the linear's output features are not the stream's hidden dim")
        stream.actions.append(_Action("linear", node, [w, b], 0, scale))
        return
    if op == "embedding":
        table = node.args[1]
        if not (isinstance(table, fx.Node) and table.op == "get_attr") or axis != rank - 1:
            raise Refuse(f"residual writer `{where}` is an embedding whose table is not a parameter")
        stream.actions.append(_Action("table", node, [table], 1, scale))
        return
    if op in ("conv", "conv_transpose"):
        w, b = node.args[1], (node.args[2] if len(node.args) > 2 else None)
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and b.op != "get_attr"):
            raise Refuse(f"residual writer `{where}` is a {op} whose weight is not a parameter")
        groups = node.kwargs.get("groups", 1)
        out_axis = 0 if op == "conv" else 1
        out_ch = get_param(gm, w).shape[out_axis] * (groups if op == "conv_transpose" else 1)
        if axis != 1 or out_ch != hidden:
            raise Refuse(f"{op} writer `{where}` has {out_ch} output channels on dim 1, not the hidden size {hidden}")
        if groups != 1:
            raise Refuse(f"{op} writer `{where}` has {groups} groups: each output channel reads its own group of "
                         "inputs, so its weights cannot recentre the output over all channels")
        stream.actions.append(_Action(op, node, [w, b], out_axis, scale))
        return
    if op in ("add", "sub") and all(isinstance(a, fx.Node) for a in node.args[:2]):
        for a in node.args[:2]:  # a sum of affine writers (embedding + position) is one writer; centring is linear
            r = _rank(a)
            a_axis = axis - (rank - r) if r is not None and axis - (rank - r) >= 0 else None
            _plan_writer(walk, a, a_axis, into, node, scale)
        return
    if op in ("mul", "div"):
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):  # a number scales every channel alike
            return _plan_writer(walk, a, axis, into, node, scale)
        if op == "mul" and isinstance(a, (int, float)) and isinstance(b, fx.Node):
            return _plan_writer(walk, b, axis, into, node, scale)
        if op == "mul":
            for p, other in ((b, a), (a, b)):
                if isinstance(p, fx.Node) and p.op == "get_attr" and isinstance(other, fx.Node) and other.op != "get_attr":
                    vec = _scale_vector(walk, node, p, axis)
                    if vec is None:
                        raise Refuse(f"`{where}` multiplies the stream by parameter `{p.target}`, which is not one "
                                     "factor per channel of the hidden dim")
                    if node not in stream.bypass:
                        stream.bypass.append(node)
                    return _plan_writer(walk, other, axis, into, node, vec if scale is None else scale * vec)
    if op == "cat":
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim % rank == axis:
            raise Refuse(f"`{where}` concatenates along the hidden dim")
        for t in tensors:
            _plan_writer(walk, t, axis, into, node, scale)
        return
    a_in = carried_axis(node, axis)
    if a_in is not None:
        return _plan_writer(walk, node.args[0], a_in, into, node, scale)
    if _starts_stream(node, stream):
        # the stream's first value is not affine (a norm, an activation): one centring op after it
        if scale is not None:
            raise Refuse(f"the stream starts at `{where}` behind a per-channel scale")
        if axis != rank - 1:
            raise Refuse(f"the stream starts at `{where}` with its channels on dim {axis}, not the last")
        stream.actions.append(_Action("centre", node, [], axis))
        return
    raise Refuse(f"residual writer `{where}` is {op}, not affine (linear, embedding, conv, parameter)")


def _analyse(gm, readers):
    streams = find_streams(gm, readers)
    reader_set = set(readers)
    plans = []
    for stream in streams:
        try:
            hidden = {_hidden(r.args[0]) for r in stream.readers}
            shapes = {tuple(r.kwargs.get("normalized_shape") or ()) for r in stream.readers}
            if len(hidden) != 1 or None in hidden or any(len(s) > 1 for s in shapes):
                raise Refuse("the LayerNorms on this stream do not all normalise the last dim of one hidden size")
            stream.hidden = hidden.pop()
            walk = _Walk(gm, stream)
            for w, axis, into, via in stream.writers:  # a post-LN norm is the cause whatever else reads the stream
                if isinstance(w, fx.Node) and op_name(w) in _NORMS and _residual_input(w) is not None:
                    _plan_writer(walk, w, axis, into, via)
            _check_users(gm, stream, reader_set)
            for w, axis, into, via in stream.writers:
                _plan_writer(walk, w, axis, into, via)
            plans.append((stream, None))
        except Refuse as e:
            plans.append((stream, str(e)))
    return plans


def _plans(gm, readers):
    plans = _analyse(gm, readers)
    post_ln = next((r for _, r in plans if r and r.startswith("post-LN")), None)
    if post_ln:  # converting the odd embedding LayerNorm of a post-LN model would be exact but pointless
        plans = [(s, r or f"the model is post-LN elsewhere ({post_ln})") for s, r in plans]
    # likewise a stream whose LayerNorm only starts a stream that stays LayerNorm (CLIP's pre_layrnorm)
    changed = True
    while changed:
        changed = False
        writes_into = {w: r for s, r in plans if r for w, *_ in s.writers}
        for i, (s, r) in enumerate(plans):
            fed = next((ln for ln in s.readers if ln in writes_into), None) if r is None else None
            if fed is not None:
                plans[i] = (s, f"its LayerNorm `{site_name(fed)}` starts a stream that stays LayerNorm "
                               f"({writes_into[fed]})")
                changed = True
    return plans


# ------------------------------------------------------------------ rewriting
def _centred(t: torch.Tensor, axis: int | None, scale: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """`t` recentred over `axis` (after the per-channel `scale`), computed in float64, returned in `dtype`
    (default: t's own)."""
    dtype = dtype or t.dtype
    t64 = t.detach().to(torch.float64)
    if axis is None or axis < 0:  # the parameter is the same on every channel: centred, it is zero
        return torch.zeros_like(t, dtype=dtype)
    if scale is not None:
        shape = [1] * t64.dim()
        shape[axis] = -1
        t64 = t64 * scale.reshape(shape)
    return (t64 - t64.mean(dim=axis, keepdim=True)).to(dtype)


def _drop_last(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.narrow(axis, 0, t.shape[axis] - 1)


def _recentre(gm, action: _Action, untie: bool, notes: list, compress: bool = False, observer=None,
              mapping: dict | None = None) -> None:
    """`observer` (per-site checks) is given each new parameter's float64 value, computed when asked;
    `mapping` records the node that now carries a stream value (a centring op after a norm)."""
    if action.kind == "centre":
        last = _insert_centring(gm, action.node, compress)
        if mapping is not None:
            mapping[action.node] = last
        return
    graph = gm.graph
    for i, p in enumerate(action.param_nodes):
        if p is None:
            continue
        t = get_param(gm, p)
        # biases of linear / conv writers: their only dim
        axis = 0 if (action.kind in ("linear", "conv", "conv_transpose") and i == 1) else action.axis
        value = _centred(t, axis, action.scale)
        if compress and axis is not None:  # Pre-CRMSNorm: the zero-mean stream is stored without its last coordinate
            value = _drop_last(value, axis).contiguous()
        sharers = [u for u in param_users(gm, p) if u is not action.node]
        def exact(t=t, axis=axis, scale=action.scale):
            value = _centred(t, axis, scale, torch.float64)
            return _drop_last(value, axis) if compress and axis is not None else value
        if not untie:
            # every name holding the tensor gets the recentred one (a tied head follows: wrong when tied);
            # never written in place: the original model and the per-site checks still read the old one
            for target in _replace_tensor(gm, t, value):
                if observer is not None:
                    observer.param_value(target, exact)
            continue
        if sharers:
            notes.append(f"untied `{p.target}`: recentred for `{site_name(action.node)}`, "
                         f"left as it was for {', '.join('`' + site_name(u) + '`' for u in sharers[:3])}")
        target = new_param(gm, f"{module_path(action.node) or p.target}.{'bias' if i == 1 else 'weight'}", value)
        if observer is not None:
            observer.param_value(target, exact)
        with graph.inserting_before(action.node):
            q = graph.get_attr(target)
        q.meta["normc_path"] = module_path(action.node)
        action.node.replace_input_with(p, q)


def _replace_tensor(gm, t: torch.Tensor, value: torch.Tensor) -> list[str]:
    """Put `value` wherever the module tree holds `t` (or a tensor on its memory); returns those names."""
    key = t.untyped_storage().data_ptr()
    new = torch.nn.Parameter(value, requires_grad=False) if isinstance(t, torch.nn.Parameter) else value
    names = []
    for path, mod in gm.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if isinstance(v, torch.Tensor) and v.numel() and v.untyped_storage().data_ptr() == key:
                    store[k] = new
                    names.append(f"{path}.{k}" if path else k)
    return names


def _insert_centring(gm, node: fx.Node, compress: bool) -> fx.Node:
    """y -> y - mean(y, -1) after the stream's first value (CRMSNorm: its first d-1 coordinates)."""
    graph = gm.graph
    users = list(node.users)
    with graph.inserting_after(node):
        mean = graph.call_function(ops.reduce_mean, (node,), {"dim": [-1], "keepdim": True})
    with graph.inserting_after(mean):
        out = graph.call_function(ops.sub, (node, mean), {})
    last = out
    if compress:
        with graph.inserting_after(out):
            last = graph.call_function(ops.getitem, (out,), {"index": (Ellipsis, slice(None, -1))})
    for n in {mean, out, last}:
        n.meta["normc_path"], n.meta["normc_module_type"] = module_path(node), node.meta.get("normc_module_type", "")
        for k in ("normc_dtype", "nn_module_stack"):
            if k in node.meta:
                n.meta[k] = node.meta[k]
    for u in users:
        if not reads_shape_only(u):
            u.replace_input_with(node, last)
    return last


def _bypass(stream: _Stream) -> None:
    """Drop the per-channel multiplies whose factor went into their writers."""
    for mul in stream.bypass:
        inner = next(a for a in mul.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr")
        mul.replace_all_uses_with(inner)


def _to_rms(gm, ln: fx.Node) -> fx.Node:
    graph = gm.graph
    x, weight = ln.args[0], (ln.args[1] if len(ln.args) > 1 else None)
    bias = ln.args[2] if len(ln.args) > 2 else None
    with graph.inserting_before(ln):
        rms = graph.call_function(ops.rms_norm, (x, weight), {"normalized_shape": ln.kwargs.get("normalized_shape"),
                                                             "eps": ln.kwargs.get("eps", 1e-5)})
        out = graph.call_function(ops.add, (rms, bias), {}) if bias is not None else rms
    for n in {rms, out}:
        n.meta.update({k: ln.meta[k] for k in ("normc_shape", "normc_dtype", "nn_module_stack") if k in ln.meta})
        n.meta["normc_path"], n.meta["normc_module_type"] = module_path(ln), ln.meta.get("normc_module_type", "")
    ln.replace_all_uses_with(out)
    graph.erase_node(ln)
    return out


def _record(report: RuleReport, stream: _Stream, site: str, reason: str | None) -> bool:
    """One site per stream (all of it converts or none does); True when it will be converted."""
    first = stream.readers[0]
    rec = SiteRecord(site, f"stream:{first.name}", module_path(first), reason=reason)
    (report.skipped if reason is not None else report.sites).append(rec)
    report.applied += reason is None
    return reason is None


def _readers(gm, scope):
    import fnmatch
    return [n for n in gm.graph.nodes if op_name(n) == "layer_norm"
            and (scope is None or fnmatch.fnmatchcase(module_path(n), scope))]


def _already_rms(gm, report) -> RuleReport:
    n_rms = sum(1 for n in gm.graph.nodes if op_name(n) == "rms_norm")
    if n_rms:
        report.notes.append(f"already RMSNorm ({n_rms} rms_norm, no LayerNorm): nothing to convert; the embeddings "
                            "are left alone (centring them is not an identity for an RMSNorm model)")
    else:
        report.notes.append("no LayerNorm in the graph: nothing to convert")
    return report


@global_pass
def to_rmsnorm(gm: fx.GraphModule, *, ctx=None, scope=None, loaded=None, dry_run=False, untie=True,
               observer=None) -> RuleReport:
    """`observer` (normc.verify.sites.SiteChecker): each block is checked in float64 (see _blocks)."""
    report = RuleReport("std.prenorm_to_rmsnorm")
    readers = _readers(gm, scope)
    if not readers:
        return _already_rms(gm, report)
    accepted = []
    for stream, reason in _plans(gm, readers):
        if _record(report, stream, f"residual stream d={stream.hidden}: {_describe(stream)}", reason) and not dry_run:
            accepted.append(stream)
    if observer is not None and accepted:
        observer.regions_before(gm, report.name, _blocks(accepted))
    stream_now: dict = {}  # stream value -> the node carrying it now (a centring op after a norm)
    same: dict = {}        # LayerNorm -> the RMSNorm (+ bias) that replaced it
    # every writer first (a stream may start at a LayerNorm that another stream converts), then the readers
    for stream in accepted:
        for action in stream.actions:
            _recentre(gm, action, untie, report.notes, observer=observer, mapping=stream_now)
        _bypass(stream)
    for stream in accepted:
        for ln in stream.readers:
            same[ln] = _to_rms(gm, ln)
    if observer is not None and accepted:
        observer.regions_after(gm, same, stream_now)
    _note_centring(report, accepted)
    if not dry_run:
        finish(gm)
    return report


def _blocks(streams: list, compressed: bool = False) -> list:
    """The regions the per-site float64 check evaluates: one per value the LayerNorms read, from the
    values the other LayerNorms read (a block of the model) to it and its LayerNorms' outputs. The
    stream values are centred in the new graph; the LayerNorm outputs are the same."""
    from ..verify.sites import CENTRED, COMPRESSED, Region
    relation = COMPRESSED if compressed else CENTRED
    by_input: dict = {}
    for stream in streams:
        for ln in stream.readers:
            by_input.setdefault(ln.args[0], []).append(ln)
    regions = []
    for v, lns in by_input.items():
        cuts = [(u, relation) for u in by_input if u is not v]
        regions.append(Region(f"block:{lns[0].name}", site_name(lns[0]), module_path(lns[0]),
                              [(ln, None) for ln in lns] + [(v, relation)], cuts))
    return regions


def _describe(stream: _Stream) -> str:
    scaled = f", {len(stream.bypass)} per-channel scales folded" if stream.bypass else ""
    return (f"{len(stream.readers)} LayerNorms, {len(stream.actions)} writers{scaled} "
            f"(last: {site_name(stream.readers[-1])})")


def _note_centring(report: RuleReport, streams: list) -> None:
    for stream in streams:
        for a in stream.actions:
            if a.kind == "centre":
                report.notes.append(f"the stream starts at {op_name(a.node)} `{site_name(a.node)}`: one centring op "
                                    "`y - mean(y)` added after it (its per-channel affine cannot centre it)")


# ------------------------------------------------------------------ Pre-CRMSNorm
def _resize_plan(gm, stream: _Stream) -> list:
    """Reshapes on the stream (and in writer chains) that spell the hidden size: (node, arg index, position)."""
    d = stream.hidden
    nodes = [n for n in stream.adds if op_name(n) == "reshape"]
    nodes += [n for a in stream.actions for n in _chain(a, stream) if op_name(n) == "reshape"]
    plan = []
    for n in dict.fromkeys(nodes):
        shape = n.args[1] if len(n.args) > 1 else None
        if not isinstance(shape, (list, tuple)):
            raise Refuse(f"cannot compress the stream through `{site_name(n)}`: its shape is not a list of sizes")
        out = tuple(n.meta.get("normc_shape", ()))
        positions = [i for i, s in enumerate(shape) if s == d]
        if len(positions) != 1 or list(out).count(d) != 1 or (len(out) == len(shape) and out[positions[0]] != d):
            raise Refuse(f"cannot tell which size of `{site_name(n)}` {list(shape)} is the hidden size {d}")
        plan.append((n, positions[0]))
    return plan


def _chain(action: _Action, stream: _Stream) -> list:
    """The nodes between a writer's parameter reader and the stream add it feeds."""
    into = {i for _, _, i, _ in stream.writers} | stream.adds
    out, node = [], action.node
    seen = set()
    while node is not None and node not in into and node not in seen:
        seen.add(node)
        out.append(node)
        node = next(iter(node.users), None) if len(node.users) == 1 else None
    return out


@global_pass
def to_crmsnorm(gm: fx.GraphModule, *, ctx=None, scope=None, loaded=None, dry_run=False, untie=True,
                observer=None) -> RuleReport:
    """Pre-LN -> Pre-CRMSNorm: the zero-mean stream keeps d-1 coordinates (the last is minus their sum).

    Writers are recentred and lose their last output row; reshapes on the stream are resized;
    LayerNorm readers become `crms_norm` (which rebuilds the full normalised vector), and the
    linears reading them are compressed by std.compress_crms_readers (W[:, :-1] - W[:, -1:]).
    """
    report = RuleReport("std.prenorm_to_crmsnorm")
    readers = _readers(gm, scope)
    if not readers:
        return _already_rms(gm, report)
    if not untie:
        report.notes.append("untie=false cannot compress a shared tensor in place: nothing done")
        return report
    accepted = []
    for stream, reason in _plans(gm, readers):
        resize = []
        if reason is None:
            try:
                resize = _resize_plan(gm, stream)
            except Refuse as e:
                reason = str(e)
        if not _record(report, stream, f"residual stream d={stream.hidden} -> {stream.hidden - 1}: {_describe(stream)}",
                       reason) or dry_run:
            continue
        accepted.append((stream, resize))
    if observer is not None and accepted:
        observer.regions_before(gm, report.name, _blocks([st for st, _ in accepted], compressed=True))
    stream_now: dict = {}
    same: dict = {}
    for stream, resize in accepted:
        for action in stream.actions:
            _recentre(gm, action, True, report.notes, compress=True, observer=observer, mapping=stream_now)
        _bypass(stream)
        for node, pos in resize:
            shape = list(node.args[1])
            shape[pos] = stream.hidden - 1
            node.args = (node.args[0], type(node.args[1])(shape)) + tuple(node.args[2:])
    for stream, _ in accepted:
        for ln in stream.readers:
            same[ln] = _to_crms(gm, ln)
    if observer is not None and accepted:
        observer.regions_after(gm, same, stream_now)
    _note_centring(report, [s for s, _ in accepted])
    if report.applied and not dry_run:
        finish(gm)
        from ..grammar.loader import load_std
        from ..ir.rewrite import apply_rule
        rule = load_std().rules["std.compress_crms_readers"]
        n = apply_rule(gm, rule, observer=observer).applied  # its sites are checked like any rule's
        report.notes.append(f"{n} CRMSNorm reader(s) compressed into the linears after them "
                            "(the others rebuild the full vector)")
    return report


def _to_crms(gm, ln: fx.Node) -> fx.Node:
    graph = gm.graph
    args = list(ln.args) + [None] * (3 - len(ln.args))
    with graph.inserting_before(ln):
        new = graph.call_function(ops.crms_norm, (args[0], args[1], args[2]),
                                  {"eps": ln.kwargs.get("eps", 1e-5), "expand": True})
    new.meta.update({k: ln.meta[k] for k in ("normc_shape", "normc_dtype", "nn_module_stack") if k in ln.meta})
    new.meta["normc_path"], new.meta["normc_module_type"] = module_path(ln), ln.meta.get("normc_module_type", "")
    ln.replace_all_uses_with(new)
    graph.erase_node(ln)
    return new
