"""Match a rule's pattern at a graph node: bindings for its variables, or the first reason it does not fit."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..grammar import syntax_tree as T
from .builtins import NodeRef
from .graph import get_param, module_path, op_name
from .ops import COMMUTATIVE, schema_for


@dataclass
class Match:
    root: fx.Node
    env: dict                      # variable -> NodeRef | None | attribute value
    op_nodes: list = field(default_factory=list)  # (PCall, node) for every op matched
    each: dict = field(default_factory=dict)      # fan-out var -> list of per-user envs


@dataclass
class NearMiss:
    root: fx.Node
    reason: str
    depth: int  # how far the match got before failing (0: root op itself)


ROOT_MATCHED = 99  # depth of a failure after the whole fixed pattern matched (a fan-out user)


class _Fail(Exception):
    def __init__(self, reason, depth):
        self.reason, self.depth = reason, depth


class Pattern:
    """A rule's match clause compiled for matching."""

    def __init__(self, rule: T.Rule):
        self.rule = rule
        self.stmts = {s.target: s for s in rule.match if isinstance(s, T.MatchStmt)}
        self.eaches = [s for s in rule.match if isinstance(s, T.EachStmt)]
        referenced = set()
        for s in self.stmts.values():
            referenced |= _vars_in(s.call)
        roots = [t for t in self.stmts if t not in referenced]
        # the root is the last statement nobody else reads (statement order is the user's)
        self.root = self.stmts[roots[-1]] if roots else list(self.stmts.values())[-1]
        schema = schema_for(self.root.call.op)
        self.root_op = schema[0].name if schema else self.root.call.op
        counts = {}
        calls = list(_calls(self.root.call, self.stmts))
        for pc in calls:
            counts[pc.op] = counts.get(pc.op, 0) + 1
        self.unique_ops = {op for op, c in counts.items() if c == 1}
        # how many commutative ops the pattern has: each may match its operands either way round
        self.n_commutative = sum(1 for pc in calls if (schema_for(pc.op) or (None,))[0] is not None
                                 and schema_for(pc.op)[0].name in COMMUTATIVE and len(pc.args) >= 2)

    def orientations(self):
        """Every fixed choice of operand order for the commutative ops (for a guard that fails on one)."""
        import itertools
        k = min(self.n_commutative, 4)
        return list(itertools.product((0, 1), repeat=k)) if k else []

    def match(self, gm: fx.GraphModule, node: fx.Node, orient: tuple | None = None) -> Match | NearMiss | None:
        """Match at `node`. `orient`: a fixed operand order per commutative op (1 = swapped);
        None tries the written order first and the other when the structure does not fit."""
        if op_name(node) != self.root_op:
            return None
        self._orient = list(orient) if orient is not None else None
        m = Match(node, {})
        try:
            self._match_stmt(gm, self.root, node, m, 0)
            for each in self.eaches:
                self._match_each(gm, each, m)
        except _Fail as f:
            return NearMiss(node, f.reason, f.depth)
        return m

    # ----------------------------------------------------------------
    def _match_stmt(self, gm, stmt, node, m, depth):
        if stmt.target in m.env:
            bound = m.env[stmt.target]
            if not (isinstance(bound, NodeRef) and bound.node is node):
                raise _Fail(f"`{stmt.target}` would be two different values", depth)
            return
        self._match_call(gm, stmt.call, node, m, depth)
        m.env[stmt.target] = NodeRef(node)

    _orient: list | None = None

    def _match_call(self, gm, pc: T.PCall, node, m, depth):
        schema_rank = schema_for(pc.op)
        schema, rank = schema_rank
        where = module_path(node) or node.name
        if isinstance(node, fx.Node) and node.op == "output":
            raise _Fail(f"a model output is read where {pc.op} is expected", depth)
        if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr"):
            raise _Fail(f"`{node.target}` is a model {'input' if node.op == 'placeholder' else 'parameter'}, not {pc.op}", depth)
        actual = op_name(node, gm) if isinstance(node, fx.Node) else type(node).__name__
        if not isinstance(node, fx.Node) or op_name(node) != schema.name:
            raise _Fail(f"`{where}` is {actual}, not {pc.op}", depth)
        if rank is not None:
            w = node.args[1]
            w_rank = len(get_param(gm, w).shape) if w is not None and w.op == "get_attr" else \
                len(w.meta.get("normc_shape", ())) if w is not None else -1
            if w_rank != rank:
                raise _Fail(f"`{where}` is a conv{w_rank - 2}d, not {pc.op}", depth)
        values = list(node.args) + [None] * (len(schema.operands) - len(node.args))
        attrs = {k: node.kwargs.get(k, d) for k, d in schema.attrs.items()}
        if schema.name in COMMUTATIVE and len(pc.args) >= 2 and self._orient is not None:
            swap = self._orient.pop(0) if self._orient else 0
            if swap:
                values = [values[1], values[0]] + values[2:]
            return self._match_operands(gm, pc, schema, values, attrs, node, m, depth)
        if schema.name in COMMUTATIVE and len(pc.args) >= 2:
            saved_env, saved_ops = dict(m.env), list(m.op_nodes)
            try:
                return self._match_operands(gm, pc, schema, values, attrs, node, m, depth)
            except _Fail as first:
                m.env.clear(); m.env.update(saved_env)
                m.op_nodes[:] = saved_ops
                swapped = [values[1], values[0]] + values[2:]
                try:
                    return self._match_operands(gm, pc, schema, swapped, attrs, node, m, depth)
                except _Fail:
                    m.env.clear(); m.env.update(saved_env)
                    m.op_nodes[:] = saved_ops
                    raise first from None
        self._match_operands(gm, pc, schema, values, attrs, node, m, depth)

    def _match_operands(self, gm, pc, schema, values, attrs, node, m, depth):
        slots = schema.slots
        for i, parg in enumerate(pc.args):
            slot = slots[i]
            value = values[i] if i < len(schema.operands) else attrs[slot]
            self._match_arg(gm, parg, value, slot, pc, m, depth + 1)
        for key, parg in pc.kwargs:
            value = values[slots.index(key)] if key in [o.name for o in schema.operands] else attrs[key]
            self._match_arg(gm, parg, value, key, pc, m, depth + 1)
        m.op_nodes.append((pc, node))
        if pc.op in self.unique_ops or schema.name in self.unique_ops:
            m.env.setdefault(pc.op, NodeRef(node))

    def _match_arg(self, gm, parg, value, slot, pc, m, depth):
        if isinstance(parg, T.PWild):
            return
        if isinstance(parg, T.PLit):
            if value != parg.value:
                raise _Fail(f"{pc.op} {slot} is {value!r}, not {parg.value!r}", depth)
            return
        if isinstance(parg, T.PCall):
            if not isinstance(value, fx.Node):
                raise _Fail(f"{pc.op} {slot} is absent, not {parg.op}", depth)
            self._match_call(gm, parg, value, m, depth)
            return
        name = parg.name
        if name in self.stmts:
            if not isinstance(value, fx.Node):
                raise _Fail(f"{pc.op} {slot} is absent", depth)
            self._match_stmt(gm, self.stmts[name], value, m, depth)
            return
        if value is None and not parg.optional:
            raise _Fail(f"{pc.op} {slot} is absent (write `{name}?` to allow that)", depth)
        bound = NodeRef(value) if isinstance(value, fx.Node) else value
        if name in m.env:
            old = m.env[name]
            same = (old.node is value) if isinstance(old, NodeRef) else (old == value)
            if not same:
                raise _Fail(f"`{name}` is bound to two different values", depth)
            return
        m.env[name] = bound

    def _match_each(self, gm, each: T.EachStmt, m: Match):
        src = m.env.get(each.source)
        if not isinstance(src, NodeRef):
            raise _Fail(f"`{each.source}` is not a graph value", 1)
        envs = []
        first_miss = None
        for user in list(src.node.users):
            if _reads_shape_only(user):  # `B, T, C = x.size()`: unaffected by a value-preserving rewrite of x
                continue
            sub = Match(m.root, dict(m.env))
            try:
                self._match_call(gm, each.body.call, user, sub, 1)
            except _Fail as f:
                if each.partial:
                    first_miss = first_miss or f.reason
                    continue
                # the root matched: this is a refusal of the site, not a mere near miss
                raise _Fail(f"every user of `{each.source}` must match: {f.reason}", ROOT_MATCHED) from None
            sub.env[each.body.target] = NodeRef(user)
            local = {k: v for k, v in sub.env.items() if k not in m.env or k == each.source}
            local[each.var] = NodeRef(user)
            envs.append(local)
            m.op_nodes.extend(sub.op_nodes)
        if not envs:
            raise _Fail(f"no user of `{each.source}` matches" + (f": {first_miss}" if first_miss else ""),
                        ROOT_MATCHED if first_miss else 1)
        m.each[each.var] = envs


def _reads_shape_only(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr" and len(node.args) > 1:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    if node.op == "call_function" and str(node.target).startswith("aten.sym_size"):
        return True
    return False


def _vars_in(pc: T.PCall) -> set[str]:
    out = set()
    for a in list(pc.args) + [v for _, v in pc.kwargs]:
        if isinstance(a, T.PVar):
            out.add(a.name)
        elif isinstance(a, T.PCall):
            out |= _vars_in(a)
    return out


def _calls(pc: T.PCall, stmts, seen=None):
    seen = seen if seen is not None else set()
    yield pc
    for a in list(pc.args) + [v for _, v in pc.kwargs]:
        if isinstance(a, T.PCall):
            yield from _calls(a, stmts, seen)
        elif isinstance(a, T.PVar) and a.name in stmts and a.name not in seen:
            seen.add(a.name)
            yield from _calls(stmts[a.name].call, stmts, seen)
