"""Apply a rule to a canonical graph: match every site, check guards, evaluate the math, rewrite.

Each site is planned completely (all tensors computed) before the graph is touched, so a
site refused half-way leaves no trace. Every site is recorded: applied, or skipped with
the reason. Rules run to a fixpoint.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.fx as fx

from ..errors import NormcError
from ..grammar import syntax_tree as T
from .builtins import EvalContext, NodeRef, RefuseSite
from .evaluate import Evaluator
from .graph import drop_unused_params, get_param, module_path, module_type, new_param, site_name
from .graph import op_name as op_name_of
from .match import Match, NearMiss, Pattern
from .ops import schema_for


@dataclass
class SiteRecord:
    site: str           # "module.path (node)"
    key: str            # stable id of the site (root node name), used to exclude sites on rollback
    path: str
    reason: str | None = None
    new_nodes: list[str] = field(default_factory=list)
    module_type: str = ""
    replaced: dict[str, str] = field(default_factory=dict)  # old node name -> the node that took its place


@dataclass
class RuleReport:
    name: str
    kind: str = "exact"
    applied: int = 0
    sites: list[SiteRecord] = field(default_factory=list)
    skipped: list[SiteRecord] = field(default_factory=list)
    near_misses: list[SiteRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, near_miss_limit: int = 50) -> dict:
        return {
            "name": self.name, "kind": self.kind, "applied": self.applied,
            "sites": [{"site": s.site, "key": s.key} for s in self.sites],
            "skipped": [{"site": s.site, "key": s.key, "reason": s.reason} for s in self.skipped],
            "near_misses": [{"site": s.site, "reason": s.reason} for s in self.near_misses[:near_miss_limit]],
            "near_miss_count": len(self.near_misses),
            "notes": list(self.notes),
        }


class SiteObserver(Protocol):
    """Watches the sites a rule rewrites (per-site verification records their boundaries)."""

    def site_matched(self, gm: fx.GraphModule, match: Match, rule: T.Rule) -> object:
        """Called once a site is planned, before the graph changes; returns a token for site_emitted."""

    def site_emitted(self, token: object, record: SiteRecord, created: list[fx.Node]) -> None:
        """Called after the site's replacement is in the graph."""


class MathError(RefuseSite):
    """The let/rewrite math raised (shapes that do not broadcast, ...): the site is refused."""


class FixpointError(NormcError):
    """A rule whose rewrite produces its own pattern again."""


def bind_params(rule: T.Rule, args: dict) -> dict:
    values = {p.name: p.default for p in rule.params}
    values.update(args)
    return values


# ------------------------------------------------------------------ planning (no graph mutation)
@dataclass
class _OpPlan:
    schema: object
    operands: list
    attrs: dict
    inherit: fx.Node | None
    slot_names: list


@dataclass
class _Ref:
    name: str


@dataclass
class _Value:
    value: object
    slot: str
    dtype: torch.dtype | None


class _Planner:
    def __init__(self, gm, match: Match, ev: Evaluator, default_dtype, local: dict | None = None):
        self.gm, self.match, self.ev, self.default_dtype = gm, match, ev, default_dtype
        self.local = local or {}

    def inherit_node(self, op_schema_name: str):
        if self.local:  # an `each u:` rewrite: the user it rewrites is the op to inherit from
            own = [v.node for v in self.local.values() if isinstance(v, NodeRef) and v.node.op == "call_function"
                   and schema_for(op_schema_name) and op_name_of(v.node) == op_schema_name]
            if len(set(own)) == 1:
                return own[0]
        nodes = [n for pc, n in self.match.op_nodes if (schema_for(pc.op) or (None,))[0] is not None
                 and schema_for(pc.op)[0].name == op_schema_name]
        uniq = list(dict.fromkeys(nodes))
        return uniq[0] if len(uniq) == 1 else None

    def plan(self, expr):
        if isinstance(expr, T.Call) and schema_for(expr.func) is not None:
            schema, _ = schema_for(expr.func)
            inherit = self.inherit_node(schema.name)
            operands = [None] * len(schema.operands)
            attrs = {}
            slots = schema.slots
            given = list(zip(slots, expr.args)) + list(expr.kwargs)
            operand_names = [o.name for o in schema.operands]
            for slot, arg in given:
                if slot in operand_names:
                    operands[operand_names.index(slot)] = self.plan_operand(arg, slot, inherit, operand_names.index(slot))
                else:
                    value = self.ev.eval(arg)
                    if isinstance(value, NodeRef):
                        raise RefuseSite(f"attribute `{slot}` of {expr.func} would be the graph value "
                                         f"`{value.node.name}`, not a constant")
                    attrs[slot] = value
            if inherit is not None:
                for k in schema.attrs:
                    if k not in attrs and k in inherit.kwargs:
                        attrs[k] = inherit.kwargs[k]
            return _OpPlan(schema, operands, attrs, inherit, operand_names)
        if isinstance(expr, T.Name) and (isinstance(self.ev.env.get(expr.id), NodeRef) or self.ev.env.get(expr.id) is _FRESH):
            return _Ref(expr.id)
        raise RefuseSite("a rewrite must produce an op call or a bound value")

    def plan_operand(self, arg, slot, inherit, index):
        if isinstance(arg, T.Call) and schema_for(arg.func) is not None:
            return self.plan(arg)
        if isinstance(arg, T.Name) and self.ev.env.get(arg.id) is _FRESH:
            return _Ref(arg.id)
        if isinstance(arg, T.Name) and isinstance(self.ev.env.get(arg.id), NodeRef) \
                and self.ev.env[arg.id].node.op != "get_attr":
            return _Ref(arg.id)
        if isinstance(arg, T.Name) and isinstance(self.ev.env.get(arg.id), NodeRef):
            return _Ref(arg.id)  # an existing parameter, reused as is
        value = self.ev.eval(arg)
        if value is None:
            return None
        if isinstance(value, NodeRef):
            return _Ref(arg.id) if isinstance(arg, T.Name) else value.node
        dtype = self.default_dtype
        if inherit is not None and index < len(inherit.args) and isinstance(inherit.args[index], fx.Node) \
                and inherit.args[index].op == "get_attr":
            dtype = get_param(self.gm, inherit.args[index]).dtype
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=torch.float64)
        if not torch.isfinite(value).all():
            raise RefuseSite(f"the new `{slot}` has non-finite values")
        if dtype is not None and dtype.is_floating_point and not torch.isfinite(value.to(dtype)).all():
            raise RefuseSite(f"the new `{slot}` overflows {dtype} (values up to {value.abs().max().item():.3g})")
        return _Value(value, slot, dtype)


_PARAM_NAMES = {"w": "weight", "b": "bias"}
_FRESH = object()  # marks a name a rewrite creates, before its node exists


class _Emitter:
    def __init__(self, gm, env, before: fx.Node, root: fx.Node):
        self.gm, self.env, self.before, self.root = gm, env, before, root
        self.created: list[fx.Node] = []
        self.owner: fx.Node | None = None  # the matched node whose module a new parameter belongs to
        self.owner_op: str = ""

    def emit(self, plan):
        if isinstance(plan, _Ref):
            return self.env[plan.name].node
        if plan is None:
            return None
        if isinstance(plan, fx.Node):
            return plan
        if isinstance(plan, _Value):
            owner = module_path(self.owner if self.owner is not None else self.before)
            slot = _PARAM_NAMES.get(plan.slot, plan.slot) if self.owner_op in ("linear", "conv") else plan.slot
            target = new_param(self.gm, f"{owner}.{slot}" if owner else slot, plan.value.to(plan.dtype or torch.float32))
            with self.gm.graph.inserting_before(self.before):
                node = self.gm.graph.get_attr(target)
            node.meta["normc_path"] = owner
            self.created.append(node)
            return node
        self.owner, self.owner_op = plan.inherit, plan.schema.name
        operands = [self.emit(p) for p in plan.operands]
        while operands and operands[-1] is None and len(operands) > plan.schema.min_operands:
            operands.pop()
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.call_function(plan.schema.impl, tuple(operands), dict(plan.attrs))
        src = plan.inherit if plan.inherit is not None else self.root
        node.meta["normc_path"] = module_path(src)
        node.meta["normc_module_type"] = module_type(src)
        if "nn_module_stack" in src.meta:
            node.meta["nn_module_stack"] = src.meta["nn_module_stack"]
        self.created.append(node)
        return node


def _default_dtype(gm, match: Match):
    dt = match.root.meta.get("normc_dtype")
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def plan_site(gm, rule: T.Rule, match: Match, ctx: EvalContext, params: dict):
    """Evaluate the `let` and the `rewrite` math of a site. Raises RefuseSite; never touches the graph."""
    env = dict(params)
    env.update(match.env)
    ev = Evaluator(ctx, env, match.each)
    for let in rule.lets:
        env[let.name] = ev.eval(let.expr)
    planner = _Planner(gm, match, ev, _default_dtype(gm, match))
    plans = []
    for rw in rule.rewrites:
        if rw.each is None:
            plans.append((rw.target, None, planner.plan(rw.expr)))
            if rw.target not in match.env:
                env[rw.target] = _FRESH  # a new value: later rewrites may read it
            continue
        for local in match.each.get(rw.each, []):
            sub_env = dict(env)
            sub_env.update(local)
            sub_ev = Evaluator(ctx, sub_env, match.each)
            sub = _Planner(gm, match, sub_ev, planner.default_dtype, local)
            plans.append((rw.target, local, sub.plan(rw.expr)))
    return env, plans


def emit_site(gm, match: Match, env: dict, plans, replaced: dict | None = None) -> list[fx.Node]:
    created = []
    # new names (`rewrite n = ...` for an n the pattern did not bind) are placed before the
    # first matched value the rewrite replaces
    anchor = next((env[t].node for t, loc, _ in plans if not loc and isinstance(env.get(t), NodeRef)
                   and t in match.env), match.root)
    for target, local, plan in plans:
        scope_env = dict(env)
        if local:
            scope_env.update(local)
        fresh = target not in match.env and not (local and target in local)
        old = None if fresh else scope_env[target].node
        emitter = _Emitter(gm, scope_env, anchor if fresh else old, match.root)
        new = emitter.emit(plan)
        created.extend(emitter.created)
        if fresh:
            env[target] = NodeRef(new)
            continue
        for k in ("normc_shape", "normc_dtype"):
            if k in old.meta and k not in new.meta:
                new.meta[k] = old.meta[k]
        if replaced is not None:
            replaced[old.name] = new.name
        old.replace_all_uses_with(new)
        # later rewrites that name this value see the new node
        for e in [env] + [loc for _, loc, _ in plans if loc]:
            for k, v in list(e.items()):
                if isinstance(v, NodeRef) and v.node is old:
                    e[k] = NodeRef(new)
    gm.graph.eliminate_dead_code()
    if replaced is not None:  # keep the values the rest of the graph reads: the site's boundary
        inside = set(created)
        by_name = {n.name: n for n in created}
        for old, new in list(replaced.items()):
            node = by_name.get(new)
            if node is None or getattr(node, "_erased", False) or all(u in inside for u in node.users):
                del replaced[old]
    return created


def apply_rule(gm: fx.GraphModule, rule: T.Rule, args: dict | None = None, scope: str | None = None,
               ctx: EvalContext | None = None, exclude: set[str] = frozenset(), dry_run: bool = False,
               max_sweeps: int = 64, observer: "SiteObserver | None" = None) -> RuleReport:
    """Apply `rule` everywhere it matches (to a fixpoint) and report every site.

    `observer` (optional) sees each site just before the graph is changed and just after."""
    ctx = ctx or EvalContext(gm)
    params = bind_params(rule, args or {})
    pattern = Pattern(rule)
    report = RuleReport(rule.qualname or rule.name, rule.kind)
    source = rule.module.source if rule.module is not None else None
    refused: dict[fx.Node, SiteRecord] = {}
    near: dict[fx.Node, SiteRecord] = {}
    created: set[fx.Node] = set()  # results of this rule: not sites to report when they do not match again
    start_nodes = len(gm.graph.nodes)
    for _ in range(max_sweeps):
        if len(gm.graph.nodes) > 4 * start_nodes + 1000:
            raise FixpointError(f"rule `{report.name}` keeps growing the graph ({start_nodes} -> "
                                f"{len(gm.graph.nodes)} nodes): its rewrite produces its own pattern",
                                "add a guard that is false on the rewritten form")
        changed = False
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or node in refused:
                continue
            m = pattern.match(gm, node)
            if m is None:
                continue
            rec = SiteRecord(site_name(node), node.name, module_path(node), module_type=module_type(node))
            if isinstance(m, NearMiss):
                rec.reason = m.reason
                # deep misses (the pattern's core matched) are refusals worth a line in the report
                (refused if m.depth >= 2 else near)[node] = rec
                continue
            near.pop(node, None)
            if scope and not fnmatch.fnmatchcase(rec.path, scope):
                continue
            reason = None
            if node.name in exclude:
                reason = "rolled back: this site failed verification"
            elif rule.where is not None:
                reason = _guard(ctx, params, m, rule, source)
                # a commutative op matched the written way round may satisfy the guard the other way
                for orient in (pattern.orientations() if reason is not None else []):
                    other = pattern.match(gm, node, orient)
                    if isinstance(other, Match) and _guard(ctx, params, other, rule, source) is None:
                        m, reason = other, None
                        break
            plans = None
            if reason is None:
                try:
                    env, plans = plan_site(gm, rule, m, ctx, params)
                except RefuseSite as e:
                    reason = str(e)
                except (RuntimeError, ValueError, IndexError, TypeError) as e:
                    err = MathError(f"the rule's math failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    reason = str(err)
            if reason is not None:
                rec.reason = reason
                refused[node] = rec
                continue
            if dry_run:
                refused[node] = rec  # do not visit again
                report.sites.append(rec)
                report.applied += 1
                continue
            token = observer.site_matched(gm, m, rule) if observer is not None else None
            new_nodes = emit_site(gm, m, env, plans, rec.replaced)
            if observer is not None:
                observer.site_emitted(token, rec, new_nodes)
            created.update(new_nodes)
            rec.new_nodes = [n.name for n in new_nodes]
            report.sites.append(rec)
            report.applied += 1
            changed = True
        if not changed:
            break
    else:
        raise FixpointError(f"rule `{report.name}` still matches after {max_sweeps} sweeps: "
                            "its rewrite produces its own pattern", "add a guard that is false on the rewritten form")
    live = lambda n: not getattr(n, "_erased", False) and n not in created  # noqa: E731
    report.skipped = [r for n, r in refused.items() if r.reason is not None and live(n)]
    report.near_misses = [r for n, r in near.items() if live(n)]
    if not dry_run:
        finish(gm)
    return report


def _guard(ctx, params, m: Match, rule: T.Rule, source) -> str | None:
    env = dict(params)
    env.update(m.env)
    try:
        return Evaluator(ctx, env).check(rule.where, source)
    except RefuseSite as e:
        return str(e)


def finish(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    drop_unused_params(gm)
    gm.recompile()
