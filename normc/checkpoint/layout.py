"""Mapping a rewritten graph back onto the original module layout (its state-dict keys).

The canonical graph before the pipeline and the rewritten one are compared op by op, grouped by
the module each op came from (`normc_path`): the k-th `linear` of `model.layers.0.mlp.up_proj`
before is the k-th after. A parameter operand that changed gets the original operand's key; an
operand a rewrite dropped gets the value that makes the module compute what the graph computes
without it (norm gain -> ones, shift -> zeros); a batch_norm a fold removed becomes an exact
identity (mean 0, var with fl(var + eps) == 1, weight 1) and carries the folded bias when the op
before it has no bias of its own. Anything else - an op a module does not compute (an RMSNorm
where the module is a LayerNorm, a multiply on a skip path), a new operand with no slot - has no
place in the original layout: the plan lists it and nothing is written.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx

from ..ir.graph import get_param, module_path, module_type, op_name
from ..ir.ops import schema_for

# ops that only move or view values: a rewrite that adds or drops them elsewhere does not change a module
_CALLS = ("call_function", "call_method", "call_module")
_IDENTITY_VALUE = {("layer_norm", "weight"): 1.0, ("layer_norm", "bias"): 0.0, ("rms_norm", "weight"): 1.0,
                   ("group_norm", "weight"): 1.0, ("group_norm", "bias"): 0.0,
                   ("linear", "b"): 0.0, ("conv", "b"): 0.0, ("conv_transpose", "b"): 0.0,
                   ("batch_norm", "weight"): 1.0, ("batch_norm", "bias"): 0.0, ("batch_norm", "mean"): 0.0}


@dataclass
class LayoutPlan:
    updates: dict[str, torch.Tensor] = field(default_factory=dict)   # state-dict key -> new value
    problems: list[str] = field(default_factory=list)                # changes with no place
    untied: list[str] = field(default_factory=list)                  # tied keys that now differ
    identities: list[str] = field(default_factory=list)              # modules set to compute identity

    @property
    def ok(self) -> bool:
        return not self.problems


def _profile(gm: fx.GraphModule) -> dict[tuple[str, str], list[fx.Node]]:
    prof = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op in _CALLS and n.target != "_guards_fn":
            name = op_name(n, gm)
            if name == "getitem":
                continue
            prof[(module_path(n), name)].append(n)
    return prof


def _where(node: fx.Node) -> str:
    path, typ = module_path(node), module_type(node).rsplit(".", 1)[-1]
    return f"`{path}`" + (f" ({typ})" if typ else "") if path else f"the top level (node {node.name})"


def identity_var(eps: float, dtype: torch.dtype) -> torch.Tensor | None:
    """A running_var v (in `dtype`) with which batch_norm divides by exactly 1: checked on numbers."""
    x = torch.linspace(-3, 3, 257, dtype=dtype).reshape(1, 257)
    z, one = torch.zeros(257, dtype=dtype), torch.ones(257, dtype=dtype)
    v = torch.tensor(1.0 - eps, dtype=torch.float64).to(dtype)
    cands = [v]
    up, down = v.clone(), v.clone()
    for _ in range(8):
        up = torch.nextafter(up, torch.tensor(2.0, dtype=dtype))
        down = torch.nextafter(down, torch.tensor(0.0, dtype=dtype))
        cands += [up.clone(), down.clone()]
    for c in cands:
        y = torch.nn.functional.batch_norm(x, z, c.expand(257).clone(), one, z, False, 0.0, eps)
        if torch.equal(y, x):
            return c
    return None


def plan_layout(before: fx.GraphModule, after: fx.GraphModule, module: torch.nn.Module) -> LayoutPlan:
    plan = LayoutPlan()
    state = module.state_dict(keep_vars=True)
    all_named = dict(module.named_parameters(remove_duplicate=False))
    all_named.update(dict(module.named_buffers(remove_duplicate=False)))
    pb, pa = _profile(before), _profile(after)
    removed: set[fx.Node] = set()
    bn_bias: dict[fx.Node, torch.Tensor] = {}  # removed batch_norm -> the bias it carries

    def assign(key: str, value: torch.Tensor, why: fx.Node) -> None:
        if key not in state:
            orig = all_named.get(key)
            if orig is not None and torch.equal(orig.detach().to(value.dtype), value):
                return  # a buffer the checkpoint does not hold, unchanged
            plan.problems.append(f"{_where(why)}: `{key}` changed but is not saved in the checkpoint")
            return
        orig = state[key]
        if tuple(value.shape) != tuple(orig.shape):
            plan.problems.append(f"{_where(why)}: `{key}` would change shape {tuple(orig.shape)} -> {tuple(value.shape)}")
            return
        value = value.detach().to(orig.dtype)
        prev = plan.updates.get(key)
        if prev is not None and not torch.equal(prev, value):
            plan.problems.append(f"{_where(why)}: `{key}` is shared and would need two different values")
            return
        plan.updates[key] = value

    pairs = []
    added = defaultdict(list)
    for k in sorted(set(pb) | set(pa)):
        ob, na = pb.get(k, []), pa.get(k, [])
        pairs += list(zip(ob, na))
        removed.update(ob[len(na):])
        added[k[0]] += na[len(ob):]
    for path, nodes in added.items():
        if not nodes:
            continue
        gone = sorted({op_name(o, before) for o in removed if module_path(o) == path})
        new_ops = ", ".join(f"`{op_name(n, after)}` ({n.name})" for n in nodes)
        if gone:
            plan.problems.append(f"{_where(nodes[0])} computes {', '.join(f'`{g}`' for g in gone)}; "
                                 f"the rewrite has {new_ops} there")
        else:
            plan.problems.append(f"{_where(nodes[0])}: {new_ops} added, which the module does not compute")

    for o, n in pairs:
        name = op_name(o, before)
        sch = schema_for(name)
        slots = [x.name for x in sch[0].operands] if sch else []
        if o.op == "call_function" and n.op == "call_function":
            ok = {kk: v for kk, v in o.kwargs.items() if not isinstance(v, (fx.Node, torch.Tensor))}
            nk = {kk: v for kk, v in n.kwargs.items() if not isinstance(v, (fx.Node, torch.Tensor))}
            if ok != nk:
                diff = sorted(kk for kk in set(ok) | set(nk) if ok.get(kk) != nk.get(kk))
                plan.problems.append(f"{_where(n)}: `{name}` attributes changed ({', '.join(diff)})")
        for i in range(max(len(o.args), len(n.args))):
            oa = o.args[i] if i < len(o.args) else None
            na = n.args[i] if i < len(n.args) else None
            slot = slots[i] if i < len(slots) else str(i)
            o_par = isinstance(oa, fx.Node) and oa.op == "get_attr"
            n_par = isinstance(na, fx.Node) and na.op == "get_attr"
            if o_par and n_par:
                if na.target == oa.target:
                    continue
                assign(oa.target, get_param(after, na), n)
            elif o_par and na is None:
                ident = _IDENTITY_VALUE.get((name, slot))
                if ident is None:
                    plan.problems.append(f"{_where(n)}: `{name}` lost its `{slot}` and the module has no neutral value for it")
                    continue
                orig = get_param(before, oa)
                assign(oa.target, torch.full_like(orig, ident), n)
            elif n_par and oa is None:
                value = get_param(after, na)
                if not bool(value.ne(0).any()):
                    continue  # a zero bias: the module without one computes the same
                bn = _removed_bn_after(o, before, removed) if slot == "b" else None
                if bn is not None:
                    bn_bias[bn] = value
                    continue
                plan.problems.append(f"{_where(n)}: a new `{slot}` for `{name}` the module has no slot for")
            elif o_par != n_par or (isinstance(oa, fx.Node) != isinstance(na, fx.Node)):
                plan.problems.append(f"{_where(n)}: operand `{slot}` of `{name}` changed from "
                                     f"{_kind(oa)} to {_kind(na)}")

    replaced_paths = {module_path(n) for nodes in added.values() for n in nodes}
    for o in sorted(removed, key=lambda n: n.name):
        name = op_name(o, before)
        if name == "batch_norm":
            _bn_identity(o, before, bn_bias.get(o), plan, assign)
        elif module_path(o) not in replaced_paths:  # else said above
            plan.problems.append(f"{_where(o)}: its `{name}` ({o.name}) was removed and the module still computes it")
    _tied(module, plan)
    return plan


def _kind(a) -> str:
    if isinstance(a, fx.Node):
        return "a parameter" if a.op == "get_attr" else "a computed value"
    return "nothing" if a is None else "a constant"


def _removed_bn_after(node: fx.Node, before: fx.GraphModule, removed: set) -> fx.Node | None:
    users = [u for u in node.users]
    if len(users) == 1 and users[0] in removed and op_name(users[0], before) == "batch_norm":
        return users[0]
    return None


def _bn_identity(bn: fx.Node, before: fx.GraphModule, bias, plan: LayoutPlan, assign) -> None:
    slots = ["x", "mean", "var", "weight", "bias"]
    params = {s: a for s, a in zip(slots, bn.args) if isinstance(a, fx.Node) and a.op == "get_attr"}
    if not {"mean", "var"} <= set(params):
        plan.problems.append(f"{_where(bn)}: a removed batch_norm without running statistics")
        return
    eps = float(bn.kwargs.get("eps", 1e-5))
    var = get_param(before, params["var"])
    v = identity_var(eps, var.dtype)
    if v is None:
        plan.problems.append(f"{_where(bn)}: no running_var makes this BatchNorm (eps={eps}) an exact identity")
        return
    if bias is not None and "bias" not in params:
        plan.problems.append(f"{_where(bn)}: the folded bias needs the BatchNorm's bias, which it has not")
        return
    assign(params["mean"].target, torch.zeros_like(get_param(before, params["mean"])), bn)
    assign(params["var"].target, torch.full_like(var, float(v)), bn)
    if "weight" in params:
        assign(params["weight"].target, torch.ones_like(get_param(before, params["weight"])), bn)
    if "bias" in params:
        b0 = get_param(before, params["bias"])
        assign(params["bias"].target, bias.reshape(b0.shape) if bias is not None else torch.zeros_like(b0), bn)
    plan.identities.append(module_path(bn))


def _tied(module: torch.nn.Module, plan: LayoutPlan) -> None:
    """Keys that share one tensor in the module (tied embeddings): if only some changed, they untie."""
    groups = defaultdict(list)
    for k, t in module.state_dict(keep_vars=True).items():
        groups[(t.data_ptr(), tuple(t.shape), t.dtype)].append(k)
    for keys in groups.values():
        if len(keys) < 2:
            continue
        changed = [k for k in keys if k in plan.updates]
        if not changed:
            continue
        vals = [plan.updates.get(k) for k in keys]
        if all(v is not None and torch.equal(v, vals[0]) for v in vals):
            continue
        plan.untied.extend(keys)
