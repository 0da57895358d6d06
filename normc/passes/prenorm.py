"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm (Jiang et al. 2023), as a global pass.

If every tensor written into the residual stream has zero mean over the hidden dim, each
LayerNorm reading the stream equals an RMSNorm with the same eps. So:

1. find the stream: the chain of `add`s feeding the LayerNorms (every branch of parallel blocks);
2. check every writer is affine and can be recentred (linear, embedding, conv patch
   embedding, parameters such as CLS / position tables, through reshapes and concatenation),
   every stream value is read only by LayerNorms or by the next add (no post-LN, no
   un-normed residual output);
3. recentre the writers (`W - mean over the output dim`, `b - mean(b)`, tables minus their
   row mean) — a recentred table gets its own tensor, so a tied LM head is untied;
4. replace the LayerNorm readers by RMSNorm (same eps; a LayerNorm bias stays as an add).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir import ops
from ..ir.graph import get_param, index_keeps_last_dim, module_path, new_param, op_name, param_users, site_name
from ..ir.rewrite import RuleReport, SiteRecord, finish

# ops a writer's value may pass through unchanged along the hidden dim
_TRANSPARENT = {"reshape", "transpose", "permute", "expand", "contiguous", "cast", "to"}


class Refuse(Exception):
    pass


@dataclass
class _Action:
    kind: str            # linear | conv | table | param
    node: fx.Node        # the node that reads the parameter(s)
    param_nodes: list    # get_attr nodes to recentre (weight, bias) or (table,) / (param,)
    axis: int            # the axis of the hidden dim in the parameter


@dataclass
class _Stream:
    readers: list
    adds: set = field(default_factory=set)
    writers: list = field(default_factory=list)  # (writer node, the add it feeds or the reader)
    actions: list = field(default_factory=list)
    hidden: int = 0


def _hidden(node) -> int | None:
    shape = node.meta.get("normc_shape")
    return shape[-1] if shape else None


def _is_add(n) -> bool:
    return isinstance(n, fx.Node) and op_name(n) == "add" and all(isinstance(a, fx.Node) for a in n.args[:2])


def _carries_stream(n) -> bool:
    """A single-input op that moves the stream along unchanged in its last (hidden) dim."""
    if not (isinstance(n, fx.Node) and op_name(n) in ("reshape", "contiguous", "cast")):
        return False
    src = n.args[0] if n.args else None
    return isinstance(src, fx.Node) and _hidden(src) is not None and _hidden(src) == _hidden(n)


def find_streams(gm: fx.GraphModule, readers: list[fx.Node]) -> list[_Stream]:
    """Group LayerNorm readers by the residual stream they read.

    Walking back from each reader's input, `add`s and stream-carrying ops (reshape,
    dropout's clone, casts) are the stream; anything else feeding it is a writer.
    """
    streams: list[_Stream] = []
    owner: dict[fx.Node, _Stream] = {}

    def merge(into: _Stream, other: _Stream):
        into.readers += other.readers
        into.adds |= other.adds
        into.writers += other.writers
        for k, s in list(owner.items()):
            if s is other:
                owner[k] = into
        streams.remove(other)

    for ln in readers:
        stream = _Stream(readers=[ln])
        streams.append(stream)
        todo = [(ln.args[0], ln)]
        while todo:
            v, into = todo.pop()
            if v in owner:
                if owner[v] is not stream:
                    merge(stream, owner[v])
                continue
            if _is_add(v) or _carries_stream(v):
                owner[v] = stream
                stream.adds.add(v)
                inputs = v.args[:2] if _is_add(v) else v.args[:1]
                todo.extend((o, v if _is_add(v) else into) for o in inputs)
            else:
                owner[v] = stream
                stream.writers.append((v, into))
    return streams


def _check_users(stream: _Stream, reader_set: set) -> None:
    values = set(stream.adds) | {w for w, _ in stream.writers if w.op != "get_attr"}
    for v in values:
        for u in v.users:
            if u in stream.adds or u in reader_set:
                continue
            if u.op == "output":
                raise Refuse(f"the residual stream value `{site_name(v)}` is a model output without a norm "
                             "(it would change): convert only models whose outputs are normed")
            if op_name(u) == "layer_norm":
                raise Refuse(f"LayerNorm `{site_name(u)}` reads the stream but is out of scope: "
                             "convert the whole stream (drop `on`) or widen the scope")
            if _is_add(u) or _carries_stream(u):
                beyond = _readers_downstream(u)
                named = ", ".join(f"`{site_name(n)}`" for n in beyond[:3]) or f"`{site_name(u)}`"
                raise Refuse(f"the residual stream goes on past the LayerNorms in scope to {named}, out of scope: "
                             "convert the whole stream (drop `on`) or widen the scope")
            raise Refuse(f"the residual stream value `{site_name(v)}` is also read by {op_name(u)} "
                         f"`{site_name(u)}`, which is not a LayerNorm")


def _readers_downstream(start: fx.Node) -> list:
    """LayerNorms the stream reaches from `start`, following adds and stream-carrying ops."""
    found, todo, seen = [], [start], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if op_name(u) == "layer_norm":
                found.append(u)
            elif _is_add(u) or _carries_stream(u):
                todo.append(u)
    return found


def _plan_writer(gm, node: fx.Node, into: fx.Node, hidden: int, actions: list, seen: set, via: fx.Node = None) -> None:
    """Plan the recentring of one writer. `into`: the stream add it feeds; `via`: the node reading `node`."""
    via = via if via is not None else into
    if (node, via) in seen:
        return
    seen.add((node, via))
    op = op_name(node)
    where = site_name(node)
    if op in ("layer_norm", "rms_norm", "group_norm", "batch_norm"):
        raise Refuse(f"post-LN: the residual add `{site_name(into)}` reads the {op} output `{where}` "
                     "(post-LN and sandwich-norm models are not Pre-LN)")
    if node.op == "get_attr":
        t = get_param(gm, node)
        if t.shape[-1] != hidden:
            raise Refuse(f"parameter `{node.target}` written into the stream has last dim {t.shape[-1]}, not {hidden}")
        actions.append(_Action("param", via, [node], -1))
        return
    if op == "linear":
        w, b = node.args[1], (node.args[2] if len(node.args) > 2 else None)
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and b.op != "get_attr"):
            raise Refuse(f"residual writer `{where}` is a linear whose weight is not a parameter")
        actions.append(_Action("linear", node, [w, b], 0))
        return
    if op == "embedding":
        table = node.args[1]
        if not (isinstance(table, fx.Node) and table.op == "get_attr"):
            raise Refuse(f"residual writer `{where}` is an embedding whose table is not a parameter")
        actions.append(_Action("table", node, [table], 1))
        return
    if op == "conv":
        w, b = node.args[1], (node.args[2] if len(node.args) > 2 else None)
        out_ch = get_param(gm, w).shape[0]
        if out_ch != hidden:
            raise Refuse(f"conv writer `{where}` has {out_ch} output channels, not the hidden size {hidden}")
        actions.append(_Action("conv", node, [w, b], 0))
        return
    if op in _TRANSPARENT or (node.op == "call_function" and op in ("flatten",)):
        _plan_writer(gm, node.args[0], into, hidden, actions, seen, node)
        return
    if op == "cat":
        tensors, dim = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        rank = len(node.meta.get("normc_shape", ())) or 3
        if dim in (-1, rank - 1):
            raise Refuse(f"`{where}` concatenates along the hidden dim")
        for t in tensors:
            _plan_writer(gm, t, into, hidden, actions, seen, node)
        return
    if op in ("getitem", "slice"):
        # token/row selection commutes with centring over the hidden dim, if it leaves that dim whole
        index = node.kwargs.get("index") if op == "getitem" else None
        dim = node.args[1] if op == "slice" and len(node.args) > 1 else None
        rank = len(node.args[0].meta.get("normc_shape", ())) if isinstance(node.args[0], fx.Node) else 0
        keeps = (op == "slice" and dim not in (-1, rank - 1)) or (op == "getitem" and index_keeps_last_dim(index, rank))
        if keeps:
            _plan_writer(gm, node.args[0], into, hidden, actions, seen, node)
            return
    if op == "add" and all(isinstance(a, fx.Node) for a in node.args[:2]):
        for a in node.args[:2]:  # a sum of affine writers (embedding + position) is one writer
            _plan_writer(gm, a, into, hidden, actions, seen, node)
        return
    if op == "mul":
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            _plan_writer(gm, a, into, hidden, actions, seen, node)
            return
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            _plan_writer(gm, b, into, hidden, actions, seen, node)
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
            seen: set = set()
            for w, into in stream.writers:
                _plan_writer(gm, w, into, stream.hidden, stream.actions, seen)
            _check_users(stream, reader_set)
            plans.append((stream, None))
        except Refuse as e:
            plans.append((stream, str(e)))
    return plans


def _plans(gm, readers):
    plans = _analyse(gm, readers)
    post_ln = next((r for _, r in plans if r and r.startswith("post-LN")), None)
    if post_ln:  # converting the odd embedding LayerNorm of a post-LN model would be exact but pointless
        plans = [(s, r or f"the model is post-LN elsewhere ({post_ln})") for s, r in plans]
    return plans


def _centred(t: torch.Tensor, axis: int) -> torch.Tensor:
    t64 = t.detach().to(torch.float64)
    return (t64 - t64.mean(dim=axis, keepdim=True)).to(t.dtype)


def _drop_last(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.narrow(axis, 0, t.shape[axis] - 1)


def _recentre(gm, action: _Action, untie: bool, notes: list, compress: bool = False) -> None:
    graph = gm.graph
    for i, p in enumerate(action.param_nodes):
        if p is None:
            continue
        t = get_param(gm, p)
        axis = action.axis if not (action.kind in ("linear", "conv") and i == 1) else 0  # biases: their only dim
        value = _centred(t, axis)
        if compress:  # Pre-CRMSNorm: the zero-mean stream is stored without its last coordinate
            value = _drop_last(value, axis).contiguous()
        sharers = [u for u in param_users(gm, p) if u is not action.node]
        if not untie:
            t.data.copy_(value)  # in place: every user of a shared tensor sees it (wrong when tied)
            continue
        if sharers:
            notes.append(f"untied `{p.target}`: recentred for `{site_name(action.node)}`, "
                         f"left as it was for {', '.join('`' + site_name(u) + '`' for u in sharers[:3])}")
        target = new_param(gm, f"{module_path(action.node) or p.target}.{'bias' if i == 1 else 'weight'}", value)
        with graph.inserting_before(action.node):
            q = graph.get_attr(target)
        q.meta["normc_path"] = module_path(action.node)
        action.node.replace_input_with(p, q)


def _to_rms(gm, ln: fx.Node) -> None:
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


def to_rmsnorm(gm: fx.GraphModule, *, ctx=None, scope=None, loaded=None, dry_run=False, untie=True) -> RuleReport:
    report = RuleReport("std.prenorm_to_rmsnorm")
    readers = _readers(gm, scope)
    if not readers:
        return _already_rms(gm, report)
    for stream, reason in _plans(gm, readers):
        what = f"{len(stream.readers)} LayerNorms, {len(stream.actions)} writers (last: {site_name(stream.readers[-1])})"
        if not _record(report, stream, f"residual stream d={stream.hidden}: {what}", reason) or dry_run:
            continue
        for action in stream.actions:
            _recentre(gm, action, untie, report.notes)
        for ln in stream.readers:
            _to_rms(gm, ln)
    if not dry_run:
        finish(gm)
    return report


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
    into = {a for _, a in stream.writers} | stream.adds
    out, node = [], action.node
    seen = set()
    while node is not None and node not in into and node not in seen:
        seen.add(node)
        out.append(node)
        node = next(iter(node.users), None) if len(node.users) == 1 else None
    return out


def to_crmsnorm(gm: fx.GraphModule, *, ctx=None, scope=None, loaded=None, dry_run=False, untie=True) -> RuleReport:
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
    for stream, reason in _plans(gm, readers):
        resize = []
        if reason is None:
            try:
                resize = _resize_plan(gm, stream)
            except Refuse as e:
                reason = str(e)
        what = f"{len(stream.readers)} LayerNorms, {len(stream.actions)} writers"
        if not _record(report, stream, f"residual stream d={stream.hidden} -> {stream.hidden - 1}: {what}", reason) \
                or dry_run:
            continue
        for action in stream.actions:
            _recentre(gm, action, True, report.notes, compress=True)
        for node, pos in resize:
            shape = list(node.args[1])
            shape[pos] = stream.hidden - 1
            node.args = (node.args[0], type(node.args[1])(shape)) + tuple(node.args[2:])
        for ln in stream.readers:
            _to_crms(gm, ln)
    if report.applied and not dry_run:
        finish(gm)
        from ..grammar.loader import load_std
        from ..ir.rewrite import apply_rule
        rule = load_std().rules["std.compress_crms_readers"]
        n = apply_rule(gm, rule).applied
        report.notes.append(f"{n} CRMSNorm reader(s) compressed into the linears after them "
                            "(the others rebuild the full vector)")
    return report


def _to_crms(gm, ln: fx.Node) -> None:
    graph = gm.graph
    args = list(ln.args) + [None] * (3 - len(ln.args))
    with graph.inserting_before(ln):
        new = graph.call_function(ops.crms_norm, (args[0], args[1], args[2]),
                                  {"eps": ln.kwargs.get("eps", 1e-5), "expand": True})
    new.meta.update({k: ln.meta[k] for k in ("normc_shape", "normc_dtype", "nn_module_stack") if k in ln.meta})
    new.meta["normc_path"], new.meta["normc_module_type"] = module_path(ln), ln.meta.get("normc_module_type", "")
    ln.replace_all_uses_with(new)
    graph.erase_node(ln)
