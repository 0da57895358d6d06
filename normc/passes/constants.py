"""Work on weights alone, done once: constant folding as a global pass (std.fold_constants).

A value computed only from parameters, buffers and constants is the same at every inference:
weight standardization (BiT's `batch_norm(w.reshape(1, out, -1), training=True)`), scaled weight
standardization (NF-Nets), `w * scale` reparametrizations, Gemma's `1 + w`, casts of weights. Each
such subgraph is evaluated once, with the same ops on the same tensors the model would run, and
its result becomes a new parameter: the op that consumed it now reads a plain weight (so a conv
whose weight was standardized every call becomes a plain conv that other rules can fold into), and
the exported ONNX / .pt2 no longer carry the work.

Cost: one pass over the graph in order, and each folded op evaluated once.
"""
from __future__ import annotations

import fnmatch
from collections import Counter

import torch
import torch.fx as fx

from ..ir import ops
from ..ir.graph import aten_base, get_param, module_path, new_param, op_name, site_name
from ..ir.rewrite import RuleReport, SiteRecord, finish
from .registry import global_pass

# values of these names are random or uninitialized: never constants, whatever their inputs
_NOT_PURE = ("rand", "bernoulli", "multinomial", "normal", "poisson", "dropout", "empty", "uniform", "exponential",
             "cauchy", "geometric", "log_normal", "random")


def _pure(node: fx.Node) -> bool:
    """Whether `node` computes a value from its inputs alone (no state, no randomness, no side effect)."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    target = node.target
    if node.op == "call_method":
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        name = aten_base(target)
    else:
        name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") or any(bad in name for bad in _NOT_PURE):
        return False
    if target is ops.batch_norm and node.kwargs.get("training") and len(node.args) > 1 and node.args[1] is not None:
        return False  # batch statistics with running statistics: updates them in place at every call
    return True


def _mutates(node: fx.Node) -> bool:
    """An in-place op (`x.normal_()`, `aten.add_`): its input must stay a fresh tensor, not a stored one."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_")


def _is_tensor_param(gm, node: fx.Node) -> bool:
    try:
        return isinstance(get_param(gm, node), torch.Tensor)
    except AttributeError:
        return False


def _constant_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose value depends on parameters and constants only, and on at least one parameter."""
    const: set = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if _is_tensor_param(gm, node):
                const.add(node)
            continue
        inputs = node.all_input_nodes
        if inputs and all(i in const for i in inputs) and _pure(node) and not any(_mutates(u) for u in node.users):
            const.add(node)
    return const


def _evaluate(gm: fx.GraphModule, nodes: list) -> dict:
    """Run `nodes` (in graph order, all constant) on the model's own tensors; node -> value."""
    values: dict = {}
    load = lambda a: values[a] if isinstance(a, fx.Node) else a  # noqa: E731
    with torch.no_grad():
        for node in nodes:
            if node.op == "get_attr":
                values[node] = get_param(gm, node)
                continue
            args = fx.node.map_aggregate(node.args, load)
            kwargs = fx.node.map_aggregate(node.kwargs, load)
            if node.op == "call_method":
                values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                values[node] = node.target(*args, **kwargs)
    return values


def _slot_name(node: fx.Node) -> str:
    """A name for the folded value after the operand it becomes (`weight` of a conv), else `constant`."""
    for user in node.users:
        if user.op == "call_function" and user.target in ops.IMPL_TO_NAME:
            schema = ops.OPS[ops.IMPL_TO_NAME[user.target]]
            for i, a in enumerate(user.args[:len(schema.operands)]):
                if a is node:
                    return {"w": "weight", "b": "bias"}.get(schema.operands[i].name, schema.operands[i].name)
    return "constant"


@global_pass
def fold_constants(gm: fx.GraphModule, *, ctx=None, scope=None, loaded=None, dry_run=False,
                   observer=None) -> RuleReport:
    """Fold every subgraph computed from parameters and constants alone into a new parameter.
    `observer` (per-site float64 checks): each folded value is a site whose float64 value is its subgraph's."""
    report = RuleReport("std.fold_constants")
    const = _constant_nodes(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # the frontier: computed constants read by something that is not (those are what the model needs)
    frontier = [n for n in const if n.op != "get_attr" and any(u not in const for u in n.users)]
    frontier = [n for n in frontier if scope is None or fnmatch.fnmatchcase(module_path(n), scope)]
    if not frontier:
        report.notes.append("no value is computed from parameters and constants alone: nothing to fold")
        return report
    needed = set().union(*(_subgraph(n) for n in frontier))  # everything the frontier is computed from
    values = _evaluate(gm, sorted(needed, key=order.__getitem__))
    folded_ops: Counter = Counter()
    folds = []
    for node in sorted(frontier, key=order.__getitem__):
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue  # a shape or a number: nothing to store
        sub = _subgraph(node)
        inside = [n for n in sub if n.op != "get_attr"]
        leaves = [n for n in sub if n.op == "get_attr"]
        source = sum(get_param(gm, p).numel() for p in leaves)
        if value.numel() > max(source, 1):
            report.skipped.append(SiteRecord(site_name(node), node.name, module_path(node), reason=(
                f"{op_name(node)} `{site_name(node)}` makes {value.numel()} values out of {source}: "
                "storing it would grow the model")))
            continue
        rec = SiteRecord(site_name(node), node.name, module_path(node))
        report.sites.append(rec)
        report.applied += 1
        folded_ops.update(op_name(n) for n in inside)
        if dry_run:
            continue
        path = module_path(node)
        target = new_param(gm, f"{path}.{_slot_name(node)}" if path else _slot_name(node), value.detach().clone())
        with gm.graph.inserting_before(node):
            p = gm.graph.get_attr(target)
        p.meta["normc_path"] = path
        for k in ("normc_shape", "normc_dtype"):
            if k in node.meta:
                p.meta[k] = node.meta[k]
        node.replace_all_uses_with(p)
        rec.new_nodes = [p.name]
        rec.replaced = {node.name: p.name}
        folds.append((node, p, rec))
    if observer is not None and folds:
        from ..verify.sites import Region, float64_value
        # the folded nodes are still in the graph (unread): each is cut out with the subgraph computing it
        observer.regions_before(gm, report.name, [Region(r.key, r.site, r.path, [(n, None)], []) for n, _, r in folds])
        for n, p, _ in folds:
            observer.param_value(p.target, float64_value(gm, n))
        observer.regions_after(gm, {n: p for n, p, _ in folds}, {})
    if folded_ops:
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(folded_ops.items()))
        report.notes.append(f"{sum(folded_ops.values())} op(s) on weights alone folded into {report.applied} "
                            f"parameter(s): {counts}")
    if not dry_run:
        finish(gm)
    return report


def _subgraph(root: fx.Node) -> set:
    """`root` and everything it is computed from (all constant, by construction)."""
    seen, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen
