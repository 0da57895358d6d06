"""Apply a rule to a canonical graph: match every site, check guards, evaluate the math, rewrite.

Each site is planned completely (all tensors computed) before the graph is touched, so a
site refused half-way leaves no trace. Every site is recorded: applied, or skipped with
the reason. Rules run to a fixpoint.

The cost is linear in the graph: only nodes of the pattern's root op are visited (fx indexes
nodes by target), each once per sweep that can change it (a worklist, not re-sweeps of the
graph); a site erases only what it left dead and infers shapes for its new nodes only; the
parameter -> readers index is kept up to date instead of rescanned; one cleanup per rule.
"""
from __future__ import annotations

import fnmatch
import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.fx as fx

from ..errors import NormcError
from ..grammar import syntax_tree as T
from .builtins import EvalContext, NodeRef, RefuseSite
from .evaluate import Evaluator
from .graph import (
    ParamIndex,
    drop_unused_params,
    erase_dead,
    get_param,
    infer_shapes,
    live,
    module_path,
    module_type,
    new_param,
    site_name,
)
from .graph import op_name as op_name_of
from .match import Match, MatchStatus, NearMiss, Pattern
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
    status: MatchStatus | None = None  # why it was skipped (None: applied)


@dataclass
class RuleReport:
    name: str
    kind: str = "exact"
    applied: int = 0
    sites: list[SiteRecord] = field(default_factory=list)
    skipped: list[SiteRecord] = field(default_factory=list)
    near_misses: list[SiteRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loc: str = ""  # the rule's `.nc` file:line
    stats: RuleStats = field(default_factory=lambda: RuleStats())

    def to_dict(self, near_miss_limit: int = 50) -> dict:
        d = {
            "name": self.name, "kind": self.kind, "applied": self.applied,
            "sites": [{"site": s.site, "key": s.key} for s in self.sites],
            "skipped": [{"site": s.site, "key": s.key, "reason": s.reason}
                        | ({"status": s.status.value} if s.status is not None else {}) for s in self.skipped],
            "near_misses": [{"site": s.site, "reason": s.reason} for s in self.near_misses[:near_miss_limit]],
            "near_miss_count": len(self.near_misses),
            "notes": list(self.notes),
        }
        if self.loc:
            d["loc"] = self.loc
        d.update(self.stats.to_dict())
        return d


class SiteObserver(Protocol):
    """Watches the sites a rule rewrites (per-site verification records their boundaries)."""

    def site_matched(self, gm: fx.GraphModule, match: Match, rule: T.Rule) -> object:
        """Called once a site is planned, before the graph changes; returns a token for site_emitted."""

    def site_emitted(self, token: object, record: SiteRecord, created: list[fx.Node],
                     values: dict[fx.Node, torch.Tensor]) -> None:
        """Called after the site's replacement is in the graph; `values`: each new parameter node's value
        as the rule computed it (float64), before it was stored in the parameter's dtype."""


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
    value: torch.Tensor | RowBlockValue  # as computed (float64), or held as stored + residual
    slot: str
    dtype: torch.dtype | None
    stored: torch.Tensor         # as the parameter will hold it (in `dtype`)


@dataclass
class RowBlockValue:
    """A new parameter's float64 value computed a block of rows at a time (too large to hold whole):
    what the parameter stores plus the float32 residual of the float64 value (None: not kept, no
    observer asked for it)."""
    stored: torch.Tensor
    residual: torch.Tensor | None


# An elementwise new value (`w * s`, `w * g`) larger than this is computed in float64 a block of rows
# at a time: a whole 32000 x 4096 head would hold about three float64 copies of itself (3 GB) at once.
ROW_BLOCK_BYTES = 64 << 20
_ELEMENTWISE_OPS = frozenset(("+", "-", "*", "/", "**", "??"))


def _elementwise_names(expr) -> set[str] | None:
    """The names an expression of only arithmetic reads, or None when it has anything else (a call
    may reduce, an index may move rows: those are evaluated whole)."""
    if isinstance(expr, T.Name):
        return {expr.id}
    if isinstance(expr, (T.Num, T.Const)):
        return set()
    if isinstance(expr, T.Unary) and expr.op == "-":
        return _elementwise_names(expr.operand)
    if isinstance(expr, T.Binary) and expr.op in _ELEMENTWISE_OPS:
        left, right = _elementwise_names(expr.left), _elementwise_names(expr.right)
        return None if left is None or right is None else left | right
    return None


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
        if isinstance(arg, T.Name) and isinstance(self.ev.env.get(arg.id), NodeRef):
            return _Ref(arg.id)  # a bound graph value (an existing parameter is reused as is)
        dtype = self.default_dtype
        if inherit is not None and index < len(inherit.args) and isinstance(inherit.args[index], fx.Node) \
                and inherit.args[index].op == "get_attr":
            dtype = get_param(self.gm, inherit.args[index]).dtype
        blocked = self.eval_in_row_blocks(arg, slot, dtype or torch.float32)
        if blocked is not None:
            return blocked
        value = self.ev.eval(arg)
        if value is None:
            return None
        if isinstance(value, NodeRef):
            return _Ref(arg.id) if isinstance(arg, T.Name) else value.node
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=torch.float64)
        stored = value.to(dtype or torch.float32)
        if stored.is_floating_point():
            # one reduction: a non-finite value (or a sum past the dtype's range) makes the sum non-finite;
            # the reason is looked for only then
            if not math.isfinite(stored.sum(dtype=torch.float64)) and not torch.isfinite(stored).all():
                if not torch.isfinite(value).all():
                    raise RefuseSite(f"the new `{slot}` has non-finite values")
                raise RefuseSite(f"the new `{slot}` overflows {dtype} (values up to {value.abs().max().item():.3g})")
        elif not torch.isfinite(value).all():
            raise RefuseSite(f"the new `{slot}` has non-finite values")
        return _Value(value, slot, dtype, stored)

    def eval_in_row_blocks(self, arg, slot: str, dtype: torch.dtype) -> _Value | None:
        """An elementwise expression whose float64 result is larger than ROW_BLOCK_BYTES, evaluated a
        block of rows at a time into the stored tensor (the same numbers as evaluating it whole: each
        element's arithmetic is the same); None when the expression or its size does not call for it."""
        names = _elementwise_names(arg)
        if not names:
            return None
        leaves: dict[str, torch.Tensor] = {}
        for name in names:
            v = self.ev.env.get(name)
            if isinstance(v, NodeRef):
                if v.node.op != "get_attr":
                    return None  # an activation: the ordinary path says why it has no value
                v = get_param(self.gm, v.node).detach()
            if isinstance(v, torch.Tensor):
                if not v.is_floating_point():
                    return None
                leaves[name] = v
            elif not isinstance(v, (int, float)):
                return None  # absent operands, lists, ...: the ordinary path
        if not leaves:
            return None
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in leaves.values()))
        except RuntimeError:
            return None
        per_row = 8 * math.prod(shape[1:]) if len(shape) else 0
        if len(shape) == 0 or shape[0] < 2 or shape[0] * per_row <= ROW_BLOCK_BYTES:
            return None
        rows = shape[0]
        split = {n for n, t in leaves.items() if t.dim() == len(shape) and t.shape[0] == rows}
        env = dict(self.ev.env)
        for n, t in leaves.items():  # the rest broadcast along the rows: converted once
            if n not in split:
                env[n] = t.to(torch.float64)
        stored = torch.empty(shape, dtype=dtype)
        residual = torch.empty(shape, dtype=torch.float32) if self.ev.ctx.keep_exact_values else None
        step = max(1, ROW_BLOCK_BYTES // per_row)
        for r0 in range(0, rows, step):
            for n in split:
                env[n] = leaves[n][r0:r0 + step].to(torch.float64)
            block = torch.as_tensor(Evaluator(self.ev.ctx, env, self.ev.each).eval(arg), dtype=torch.float64)
            out = stored[r0:r0 + step]
            out.copy_(block)
            if not torch.isfinite(out).all():
                if not torch.isfinite(block).all():
                    raise RefuseSite(f"the new `{slot}` has non-finite values")
                raise RefuseSite(f"the new `{slot}` overflows {dtype} (values up to {block.abs().max().item():.3g})")
            if residual is not None:
                residual[r0:r0 + step].copy_(block - out.double())
        return _Value(RowBlockValue(stored, residual), slot, dtype, stored)


_PARAM_NAMES = {"w": "weight", "b": "bias"}
_FRESH = object()  # marks a name a rewrite creates, before its node exists


class _Emitter:
    def __init__(self, gm, env, before: fx.Node, root: fx.Node, names: dict | None = None, values: dict | None = None):
        self.gm, self.env, self.before, self.root, self.names = gm, env, before, root, names
        self.values = values  # new parameter node -> its value as computed (kept only for an observer)
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
            target = new_param(self.gm, f"{owner}.{slot}" if owner else slot, plan.stored, self.names)
            with self.gm.graph.inserting_before(self.before):
                # create_node, not get_attr: the target was registered just above, and fx's check
                # that it exists walks the module tree through its slowest lookups
                node = self.gm.graph.create_node("get_attr", target)
            node.meta["normc_path"] = owner
            if self.values is not None:
                self.values[node] = plan.value
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


def emit_site(gm, match: Match, env: dict, plans, replaced: dict | None = None, *,
              names: dict | None = None, stats: RuleStats | None = None, values: dict | None = None) -> list[fx.Node]:
    """Put a planned site into the graph: emit the new nodes, point the readers of each replaced value
    at its replacement, erase what the site left dead (walking back from the replaced nodes only) and
    record the new nodes' shapes. Returns the new nodes. `names`: new_param's memo of used suffixes;
    `values`: filled with each new parameter node's value as computed (float64)."""
    created = []
    olds = []
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
        emitter = _Emitter(gm, scope_env, anchor if fresh else old, match.root, names, values)
        new = emitter.emit(plan)
        created.extend(emitter.created)
        if fresh:
            env[target] = NodeRef(new)
            continue
        for k in ("normc_shape", "normc_dtype"):  # kept where the new node's own cannot be inferred
            if k in old.meta and k not in new.meta:
                new.meta[k] = old.meta[k]
        if replaced is not None:
            replaced[old.name] = new.name
        old.replace_all_uses_with(new)
        olds.append(old)
        # later rewrites that name this value see the new node
        for e in [env] + [loc for _, loc, _ in plans if loc]:
            for k, v in list(e.items()):
                if isinstance(v, NodeRef) and v.node is old:
                    e[k] = NodeRef(new)
    examined = erase_dead(gm.graph, olds + created[::-1])
    if stats is not None:
        stats.cleanup += examined
    created = [n for n in created if live(n)]
    infer_shapes(gm, created)
    if replaced is not None:  # keep the values the rest of the graph reads: the site's boundary
        inside = set(created)
        by_name = {n.name: n for n in created}
        for old, new in list(replaced.items()):
            node = by_name.get(new)
            if node is None or not live(node) or all(u in inside for u in node.users):
                del replaced[old]
    return created


@dataclass
class RuleStats:
    """What the engine did for one rule, counted (the scaling test compares these across graph sizes)."""
    visited: int = 0        # root-op nodes taken off the worklist
    rejected: int = 0       # of those, turned away by the early reject (recognizers: no reason needed)
    attempts: int = 0       # pattern match attempts
    matches: int = 0        # attempts where the whole pattern (fan-out included) matched
    sweeps: int = 0         # passes over the worklist: 1, plus one per round of a fixpoint
    cleanup: int = 0        # nodes examined erasing what sites left dead, plus the final cleanup's
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"attempts": self.attempts, "matches": self.matches, "seconds": round(self.seconds, 4),
                "work": {"visited": self.visited, "rejected": self.rejected, "sweeps": self.sweeps,
                         "cleanup": self.cleanup}}


def apply_rule(gm: fx.GraphModule, rule: T.Rule, args: dict | None = None, scope: str | None = None,
               ctx: EvalContext | None = None, exclude: set[str] = frozenset(), dry_run: bool = False,
               max_sweeps: int = 64, observer: "SiteObserver | None" = None, *, explain: bool = True,
               cleanup: bool = True) -> RuleReport:
    """Apply `rule` everywhere it matches (to a fixpoint) and report every site.

    `observer` (optional) sees each site just before the graph is changed and just after.
    `explain=False` skips the reason for candidates whose direct operands already rule them out
    (they are not listed as near misses). `cleanup=False` leaves the final cleanup (dead code,
    unused parameters, recompile) to the caller, who applies several rules in a row."""
    return _Rewriter(gm, rule, bind_params(rule, args or {}), scope, ctx or EvalContext(gm), exclude,
                     dry_run, max_sweeps, observer, explain).run(cleanup)


class _Rewriter:
    """One application of a rule. Visits only nodes of the pattern's root op (fx's index by target),
    in graph order, each once; after a rewritten site, only the nodes that site can have changed
    (a worklist that emulates the sweeps of a fixpoint without re-visiting the rest)."""

    def __init__(self, gm, rule, params, scope, ctx, exclude, dry_run, max_sweeps, observer, explain):
        self.gm, self.rule, self.params, self.scope, self.ctx = gm, rule, params, scope, ctx
        self.exclude, self.dry_run, self.max_sweeps, self.observer, self.explain = \
            exclude, dry_run, max_sweeps, observer, explain
        self.pattern = Pattern(rule)
        self.report = RuleReport(rule.qualname or rule.name, rule.kind, loc=_loc(rule))
        self.stats = self.report.stats
        self.source = rule.module.source if rule.module is not None else None
        self.refused: dict[fx.Node, SiteRecord] = {}
        self.near: dict[fx.Node, SiteRecord] = {}
        self.created: set[fx.Node] = set()  # results of this rule: not sites to report when they do not match again
        self.names: dict[str, int] = {}     # new parameter names used (no rule deletes one before finish)
        self.now: list[fx.Node] = []        # this sweep's worklist (a heap in graph order)
        self.later: list[fx.Node] = []      # the next sweep's
        self.queued: set[fx.Node] = set()
        self.queued_later: set[fx.Node] = set()
        self.current: fx.Node | None = None

    def run(self, cleanup: bool) -> RuleReport:
        t0 = time.perf_counter()
        saved, self.ctx.param_index = self.ctx.param_index, ParamIndex(self.gm)
        saved_exact, self.ctx.keep_exact_values = self.ctx.keep_exact_values, self.observer is not None
        try:
            self._sweeps()
        finally:
            self.ctx.param_index, self.ctx.keep_exact_values = saved, saved_exact
        report = self.report
        def alive(n):
            return live(n) and n not in self.created
        report.skipped = [r for n, r in self.refused.items() if r.reason is not None and alive(n)]
        report.near_misses = [r for n, r in self.near.items() if alive(n)]
        if not self.dry_run and report.applied and cleanup:
            self.stats.cleanup += len(self.gm.graph.nodes)
            finish(self.gm)
        self.stats.seconds = time.perf_counter() - t0
        return report

    # -------------------------------------------------------------- the worklist
    def _sweeps(self):
        self.now = self._candidates()
        self.queued = set(self.now)
        start_nodes = len(self.gm.graph.nodes)
        while True:
            self.stats.sweeps += 1
            while self.now:
                node = heapq.heappop(self.now)
                self.queued.discard(node)
                if not live(node) or node in self.refused:
                    continue
                self.current = node
                self._visit(node)
                if len(self.gm.graph.nodes) > 4 * start_nodes + 1000:
                    raise FixpointError(f"rule `{self.report.name}` keeps growing the graph ({start_nodes} -> "
                                        f"{len(self.gm.graph.nodes)} nodes): its rewrite produces its own pattern",
                                        "add a guard that is false on the rewritten form")
            if not self.later:
                return
            if self.stats.sweeps >= self.max_sweeps:
                raise FixpointError(f"rule `{self.report.name}` still matches after {self.max_sweeps} sweeps: "
                                    "its rewrite produces its own pattern",
                                    "add a guard that is false on the rewritten form")
            self.now, self.later = self.later, []
            self.queued, self.queued_later = self.queued_later, set()
            heapq.heapify(self.now)

    def _candidates(self) -> list[fx.Node]:
        """The nodes calling the pattern's root op, in graph order (a heap)."""
        nodes = self.gm.graph.find_nodes(op="call_function", target=self.pattern.root_impl)
        heapq.heapify(nodes)  # fx nodes order by their position in the graph
        return nodes

    def _push(self, node: fx.Node, new: bool) -> None:
        """Queue a node a site may have changed: in this sweep when it lies ahead of the current one
        (as a sweep would reach it), else in the next (new nodes, like a sweep's, wait for the next)."""
        if not self.pattern.is_candidate(node) or node in self.refused or not live(node):
            return
        if not new and self.current < node:
            if node not in self.queued:
                self.queued.add(node)
                heapq.heappush(self.now, node)
        elif node not in self.queued_later:
            self.queued_later.add(node)
            heapq.heappush(self.later, node)

    def _push_affected(self, created: list[fx.Node]) -> None:
        """The nodes whose match a site can have changed: the new nodes and what reads them, as far
        below as the pattern reaches (and, for a fan-out, the sources the new users read)."""
        seen = set(created)
        ring = list(created)
        affected = list(created)
        for _ in range(self.pattern.reach_up):
            ring = [a for n in ring for a in n.all_input_nodes if a not in seen and not seen.add(a)]
            affected.extend(ring)
        ring = list(affected)
        for _ in range(self.pattern.reach_down):
            ring = [u for n in ring for u in n.users if u not in seen and not seen.add(u)]
            affected.extend(ring)
        created_set = set(created)
        for n in affected:
            self._push(n, n in created_set)

    # -------------------------------------------------------------- one candidate
    def _visit(self, node: fx.Node) -> None:
        stats = self.stats
        stats.visited += 1
        if not self.explain and not self.pattern.may_match(node):
            stats.rejected += 1
            return
        stats.attempts += 1
        found = self.pattern.matches(self.gm, node)
        rest = iter(found)
        m = next(rest, None)
        rec = SiteRecord(site_name(node), node.name, module_path(node), module_type=module_type(node))
        if m is None:
            miss = found.miss
            rec.reason, rec.status = miss.reason, miss.status
            (self.refused if miss.refusal else self.near)[node] = rec
            return
        stats.matches += 1
        self.near.pop(node, None)
        if self.scope and not fnmatch.fnmatchcase(rec.path, self.scope):
            return
        decision = self._decide(node, m, rest)
        if isinstance(decision, NearMiss):
            rec.reason, rec.status = decision.reason, decision.status
            self.refused[node] = rec
            return
        if self.dry_run:
            self.refused[node] = rec  # do not visit again
            self.report.sites.append(rec)
            self.report.applied += 1
            return
        self._commit(rec, *decision)

    def _decide(self, node: fx.Node, m: Match, rest) -> tuple | NearMiss:
        """The match to rewrite and its plan, or why the site is refused. The guard picks among the
        matches (a commutative op's operand orders): the first it accepts; else the first match's reason."""
        if node.name in self.exclude:
            return NearMiss(node, "rolled back: this site failed verification", 0, MatchStatus.EXCLUDED)
        if self.rule.where is not None:
            reason = self._guard(m)
            if reason is not None:
                for other in rest:
                    if self._guard(other) is None:
                        m, reason = other, None
                        break
            if reason is not None:
                return NearMiss(node, reason, 0, MatchStatus.GUARD)
        try:
            env, plans = plan_site(self.gm, self.rule, m, self.ctx, self.params)
        except RefuseSite as e:
            return NearMiss(node, str(e), 0, MatchStatus.MATH)
        except (RuntimeError, ValueError, IndexError, TypeError, ArithmeticError) as e:
            err = MathError(f"the rule's math failed here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return NearMiss(node, str(err), 0, MatchStatus.MATH)
        return m, env, plans

    def _guard(self, m: Match) -> str | None:
        return _guard(self.ctx, self.params, m, self.rule, self.source)

    def _commit(self, rec: SiteRecord, m: Match, env: dict, plans) -> None:
        observer = self.observer
        token = observer.site_matched(self.gm, m, self.rule) if observer is not None else None
        values = {} if observer is not None else None
        new_nodes = emit_site(self.gm, m, env, plans, rec.replaced, names=self.names, stats=self.stats, values=values)
        for n in new_nodes:
            n.meta["normc_rule"] = self.report.name
            if self.report.loc:
                n.meta["normc_rule_loc"] = self.report.loc
            if n.op == "get_attr":
                self.ctx.param_index.add(n)
        if observer is not None:
            observer.site_emitted(token, rec, new_nodes, {n: v for n, v in values.items() if live(n)})
        self.created.update(new_nodes)
        rec.new_nodes = [n.name for n in new_nodes]
        self.report.sites.append(rec)
        self.report.applied += 1
        self._push_affected(new_nodes)


def _loc(rule: T.Rule) -> str:
    loc = getattr(rule, "loc", None)
    return f"{loc.file}:{loc.line}" if loc is not None and loc.line else ""


def _guard(ctx, params, m: Match, rule: T.Rule, source) -> str | None:
    env = dict(params)
    env.update(m.env)
    try:
        return Evaluator(ctx, env).check(rule.where, source)
    except RefuseSite as e:
        return str(e)
    except (RuntimeError, ValueError, IndexError, TypeError, ArithmeticError) as e:  # `where "" < 2`, shapes...
        return f"the guard could not be evaluated here: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def finish(gm: fx.GraphModule) -> None:
    """The one cleanup after a rule: dead code (fx's pass lints the graph first), parameters no node
    reads any more, the generated code."""
    gm.graph.eliminate_dead_code()
    drop_unused_params(gm)
    gm.recompile()
