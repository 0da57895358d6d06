"""Match a rule's pattern at a graph node: every way it fits (bindings for its variables), or the
first reason it does not.

The pattern is compiled once (schemas, operand slots and commutativity resolved into a small tree);
matching walks that tree against the graph and yields each full match lazily, so a guard that fails
for one operand order of a commutative op can try the next (the guard picks the orientation).
"""
from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.fx as fx

from ..grammar import syntax_tree as T
from .builtins import NodeRef
from .graph import get_param, module_path, op_name
from .ops import COMMUTATIVE, OpSchema, schema_for


@dataclass
class Match:
    root: fx.Node
    env: dict[str, NodeRef | object]  # variable -> NodeRef (a graph value) | None (absent optional) | attribute value
    op_nodes: list[tuple[T.PCall, fx.Node]] = field(default_factory=list)  # every op matched, fan-out users' included
    each: dict[str, list[dict]] = field(default_factory=dict)  # fan-out var -> one env per user


class MatchStatus(enum.Enum):
    """Why a candidate is not rewritten (onnxscript's MatchStatus): the report groups sites by it."""
    STRUCTURE = "structure"  # an op, operand or attribute differs from the pattern
    FANOUT = "fan-out"       # the fixed pattern matched; a user of an `each` source did not
    GUARD = "guard"          # the `where` clause is false
    MATH = "math"            # the let/rewrite math refused (non-finite, overflow, shapes)
    EXCLUDED = "excluded"    # rolled back: the site failed verification


@dataclass
class NearMiss:
    root: fx.Node
    reason: str
    depth: int  # how far below the root the match failed (0: the root itself)
    status: MatchStatus = MatchStatus.STRUCTURE
    node: fx.Node | None = None  # the node at fault (diff views highlight it)

    @property
    def refusal(self) -> bool:
        """The pattern's core matched (a failure two ops deep, or a fan-out user, a guard, the math):
        a site worth a line of its own in the report, not a mere near miss."""
        return self.status is not MatchStatus.STRUCTURE or self.depth >= 2


# ------------------------------------------------------------------ the compiled pattern
@dataclass(eq=False)
class _Var:
    name: str
    optional: bool


@dataclass(eq=False)
class _Lit:
    value: object


_WILD = object()


@dataclass(eq=False)
class _Op:
    """A pattern op call, resolved: the node it matches calls `schema.impl`."""
    call: T.PCall
    schema: OpSchema
    rank: int | None          # conv1d/2d/3d: the weight rank required
    slots: list               # (operand index, or -1 for an attribute; slot name; compiled argument)
    swap: bool                # commutative with two operands given: may match them either way round
    binds: str | None         # an op used once in the pattern is bound under its own name (`conv2d`)
    depth: int = 0            # how many ops deep the pattern goes below this one


@dataclass(eq=False)
class _Stmt:
    """A named statement (`c = conv(...)`), matched once and bound to its target."""
    target: str
    op: _Op | None = None


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
        counts: dict[str, int] = {}
        for pc in _calls(self.root.call, self.stmts):
            counts[pc.op] = counts.get(pc.op, 0) + 1
        self._unique = {op for op, c in counts.items() if c == 1}
        self._compiled: dict[str, _Stmt] = {}
        self._root = self._stmt(self.root.target)
        self._each = [(e, self._op(e.body.call)) for e in self.eaches]
        schema = self._root.op.schema
        self.root_op = schema.name
        self.root_impl = schema.impl
        # where a changed node can sit and still change what matches at a root: up to `reach_down` ops
        # below it, or (fan-out) up to `reach_up` ops above a user of an `each` source
        self.reach_down = self._root.op.depth
        self.reach_up = max((op.depth + 1 for _, op in self._each), default=0)
        self._early = self._early_reject()

    # -------------------------------------------------------------- compiling
    def _stmt(self, name: str) -> _Stmt:
        if name not in self._compiled:
            st = self._compiled[name] = _Stmt(name)  # registered first: a (rejected) cycle stays finite
            st.op = self._op(self.stmts[name].call)
        return self._compiled[name]

    def _op(self, pc: T.PCall) -> _Op:
        schema, rank = schema_for(pc.op)
        operands = [o.name for o in schema.operands]
        slots = []
        for i, parg in enumerate(pc.args):
            name = schema.slots[i]
            slots.append((i if i < len(operands) else -1, name, self._arg(parg)))
        for key, parg in pc.kwargs:
            slots.append((operands.index(key) if key in operands else -1, key, self._arg(parg)))
        children = [a for _, _, a in slots if isinstance(a, (_Op, _Stmt))]
        depth = 1 + max((a.depth if isinstance(a, _Op) else (a.op.depth if a.op else 0) for a in children),
                        default=-1)
        binds = pc.op if pc.op in self._unique or schema.name in self._unique else None
        return _Op(pc, schema, rank, slots, schema.name in COMMUTATIVE and len(pc.args) >= 2, binds, depth)

    def _arg(self, parg):
        if isinstance(parg, T.PWild):
            return _WILD
        if isinstance(parg, T.PLit):
            return _Lit(parg.value)
        if isinstance(parg, T.PCall):
            return self._op(parg)
        if parg.name in self.stmts:
            return self._stmt(parg.name)
        return _Var(parg.name, parg.optional)

    def _early_reject(self):
        """The ops the root's direct operands must call (tinygrad's early reject), by operand index."""
        root = self._root.op
        need = []
        for index, _, arg in root.slots:
            child = arg.op if isinstance(arg, _Stmt) else arg
            if index >= 0 and isinstance(child, _Op):
                need.append((index, child.schema.impl))
        return need

    # -------------------------------------------------------------- matching
    def is_candidate(self, node: fx.Node) -> bool:
        """Whether `node` calls the pattern's root op (only those are matched)."""
        return node.op == "call_function" and node.target is self.root_impl

    def may_match(self, node: fx.Node) -> bool:
        """A cheap necessary condition: the root op, and the ops of its direct operands. False means
        no match (the reason is then not computed)."""
        if not self.is_candidate(node):
            return False
        args = node.args
        if self._root.op.swap:
            impls = {a.target for a in args[:2] if isinstance(a, fx.Node)}
            return all(impl in impls for index, impl in self._early if index < 2) and all(
                index < len(args) and isinstance(args[index], fx.Node) and args[index].target is impl
                for index, impl in self._early if index >= 2)
        return all(index < len(args) and isinstance(args[index], fx.Node) and args[index].target is impl
                   for index, impl in self._early)

    def matches(self, gm: fx.GraphModule, node: fx.Node) -> Matches:
        """Every full match at `node`, found lazily; `.miss` says why there was none."""
        return Matches(self, gm, node)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | NearMiss | None:
        """The first match at `node`, else why it does not fit; None when `node` is not the root op."""
        if not self.is_candidate(node):
            return None
        found = self.matches(gm, node)
        first = next(iter(found), None)
        return first if first is not None else found.miss


class Matches:
    """The matches of a pattern at one node, found lazily (iterate once); after the last one,
    `miss` is the first reason the pattern did not fit, or None when something matched."""

    def __init__(self, pattern: Pattern, gm: fx.GraphModule, node: fx.Node):
        self.pattern, self.node = pattern, node
        self._s = _State(gm)
        self.count = 0

    def __iter__(self) -> Iterator[Match]:
        p, s, node = self.pattern, self._s, self.node
        for _ in _stmt(p, s, p._root, node, 0):
            each, ok = {}, True
            mark = len(s.op_nodes)
            for stmt, op in p._each:
                envs = _fan_out(p, s, stmt, op)
                if envs is None:
                    ok = False
                    break
                each[stmt.var] = envs
            if ok:
                self.count += 1
                yield Match(node, dict(s.env), list(s.op_nodes), each)
            del s.op_nodes[mark:]

    @property
    def miss(self) -> NearMiss | None:
        if self.count or self._s.fail is None:
            return None
        reason, depth, at, status, _ = self._s.fail
        return NearMiss(self.node, reason, depth, status, at)


class _State:
    """One search: the bindings so far (undone on backtracking) and the first failure seen."""
    __slots__ = ("env", "fail", "gm", "op_nodes", "trail")

    def __init__(self, gm, env=None):
        self.gm = gm
        self.env = env if env is not None else {}
        self.trail: list[str] = []
        self.op_nodes: list = []
        self.fail = None

    def bind(self, name, value):
        self.env[name] = value
        self.trail.append(name)

    def mark(self):
        return len(self.trail), len(self.op_nodes)

    def undo(self, mark):
        t, o = mark
        while len(self.trail) > t:
            del self.env[self.trail.pop()]
        del self.op_nodes[o:]

    def miss(self, reason, depth, node, status=MatchStatus.STRUCTURE, late=False):
        # the first failure, in the written operand order; one after the fixed pattern matched (`late`:
        # a fan-out user) outranks those of other orientations that did not get that far
        if self.fail is None or (late and not self.fail[4]):
            self.fail = (reason, depth, node, status, late)


def _stmt(p: Pattern, s: _State, st: _Stmt, node, depth):
    if st.target in s.env:
        bound = s.env[st.target]
        if isinstance(bound, NodeRef) and bound.node is node:
            yield
        else:
            s.miss(f"`{st.target}` would be two different values", depth, node)
        return
    for _ in _op(p, s, st.op, node, depth):
        mark = s.mark()
        s.bind(st.target, NodeRef(node))
        yield
        s.undo(mark)


# Ops that only move data around: a refusal at one of them names the op the value reaches.
_LAYOUT_OPS = frozenset({"permute", "transpose", "t", "reshape", "view", "_unsafe_view", "flatten", "unflatten",
                         "squeeze", "unsqueeze", "contiguous", "clone", "expand"})


def _beyond_layout(node: fx.Node, gm) -> str:
    """', a layout change read by conv `a.b`' when node starts a chain of layout ops with one reader at its end."""
    if op_name(node, gm) not in _LAYOUT_OPS:
        return ""
    chain, cur = [], node
    while op_name(cur, gm) in _LAYOUT_OPS and len(cur.users) == 1 and len(chain) < 16:
        chain.append(op_name(cur, gm))
        cur = next(iter(cur.users))
    if cur is node and len(cur.users) != 1 and op_name(cur, gm) in _LAYOUT_OPS:
        readers = list(cur.users)
    elif cur is node or cur.op == "output":
        return ""
    else:
        readers = [cur]
    named = [f"{op_name(r, gm) or 'the model output'} `{module_path(r) or r.name}`" for r in readers[:3]]
    more = f" and {len(readers) - 3} more" if len(readers) > 3 else ""
    return f" (a layout change; the value then reaches {', '.join(named)}{more})"


def _normalized_through_permute(node: fx.Node, gm) -> str:
    """'`p` normalizes dim 1 (channels-first, through a permute): ' for a last-dim norm of a permuted input."""
    if op_name(node, gm) not in ("layer_norm", "rms_norm") or not node.args:
        return ""
    x = node.args[0]
    if not isinstance(x, fx.Node) or op_name(x, gm) != "permute" or len(x.args) < 2:
        return ""
    dims = x.args[1] if isinstance(x.args[1], (list, tuple)) else x.args[1:]
    if not dims or not isinstance(dims[-1], int) or dims[-1] in (-1, len(dims) - 1):
        return ""
    return f"`{module_path(node) or node.name}` normalizes dim {dims[-1]} of its input (through a permute): "


def _op(p: Pattern, s: _State, op: _Op, node, depth):
    name = op.call.op
    if not isinstance(node, fx.Node):
        s.miss(f"`{node!r}` is {type(node).__name__}, not {name}", depth, None)
        return
    if node.op != "call_function" or node.target is not op.schema.impl:
        if node.op == "output":
            s.miss(f"a model output is read where {name} is expected", depth, node)
        elif node.op in ("placeholder", "get_attr"):
            what = "input" if node.op == "placeholder" else "parameter"
            s.miss(f"`{node.target}` is a model {what}, not {name}", depth, node)
        else:
            s.miss(f"`{module_path(node) or node.name}` is {op_name(node, s.gm)}, not {name}"
                   f"{_beyond_layout(node, s.gm)}", depth, node)
        return
    if op.rank is not None:
        w = node.args[1]
        w_rank = len(get_param(s.gm, w).shape) if w is not None and w.op == "get_attr" else \
            len(w.meta.get("normc_shape", ())) if w is not None else -1
        if w_rank != op.rank:
            s.miss(f"`{module_path(node) or node.name}` is a conv{w_rank - 2}d, not {name}", depth, node)
            return
    n = len(op.schema.operands)
    values = list(node.args[:n]) + [None] * (n - len(node.args))
    yield from _slots(p, s, op, 0, values, node, depth)
    if op.swap:  # the other order of a commutative op's operands
        yield from _slots(p, s, op, 0, [values[1], values[0]] + values[2:], node, depth)


def _slots(p: Pattern, s: _State, op: _Op, i: int, values, node, depth):
    if i == len(op.slots):
        mark = s.mark()
        s.op_nodes.append((op.call, node))
        if op.binds is not None and op.binds not in s.env:
            s.bind(op.binds, NodeRef(node))
        yield
        s.undo(mark)
        return
    index, slot, arg = op.slots[i]
    value = values[index] if index >= 0 else node.kwargs.get(slot, op.schema.attrs[slot])
    for _ in _arg(p, s, op, arg, value, slot, depth + 1):
        yield from _slots(p, s, op, i + 1, values, node, depth)


def _arg(p: Pattern, s: _State, op: _Op, arg, value, slot: str, depth: int):
    name = op.call.op
    if arg is _WILD:
        yield
    elif isinstance(arg, _Lit):
        if value != arg.value:
            s.miss(f"{name} {slot} is {value!r}, not {arg.value!r}", depth, None)
            return
        yield
    elif isinstance(arg, _Op):
        if not isinstance(value, fx.Node):
            s.miss(f"{name} {slot} is absent, not {arg.call.op}", depth, None)
            return
        yield from _op(p, s, arg, value, depth)
    elif isinstance(arg, _Stmt):
        if not isinstance(value, fx.Node):
            s.miss(f"{name} {slot} is absent", depth, None)
            return
        yield from _stmt(p, s, arg, value, depth)
    else:
        if value is None and not arg.optional:
            s.miss(f"{name} {slot} is absent (write `{arg.name}?` to allow that)", depth, None)
            return
        if arg.name in s.env:
            old = s.env[arg.name]
            same = (old.node is value) if isinstance(old, NodeRef) else (old == value)
            if not same:
                s.miss(f"`{arg.name}` is bound to two different values", depth, value if isinstance(value, fx.Node) else None)
                return
            yield
            return
        mark = s.mark()
        s.bind(arg.name, NodeRef(value) if isinstance(value, fx.Node) else value)
        yield
        s.undo(mark)


def _fan_out(p: Pattern, s: _State, each: T.EachStmt, body: _Op) -> list[dict] | None:
    """One env per user of the `each` source (its first match); None, with the miss recorded, when it fails."""
    src = s.env.get(each.source)
    if not isinstance(src, NodeRef):
        s.miss(f"`{each.source}` is not a graph value", 1, None, late=True)
        return None
    envs, first_miss, ops = [], None, []
    for user in list(src.node.users):
        if _reads_shape_only(user):  # `B, T, C = x.size()`: unaffected by a value-preserving rewrite of x
            continue
        sub = _State(s.gm, dict(s.env))
        if next(_op(p, sub, body, user, 1), _NO) is _NO:
            reason = sub.fail[0]
            if each.partial:
                first_miss = first_miss or reason
                continue
            # the root matched: this is a refusal of the site, not a mere near miss
            s.miss(f"{_normalized_through_permute(src.node, s.gm)}every user of `{each.source}` must match: {reason}",
                   1, user, MatchStatus.FANOUT, late=True)
            return None
        sub.env[each.body.target] = NodeRef(user)
        local = {k: v for k, v in sub.env.items() if k not in s.env or k == each.source}
        local[each.var] = NodeRef(user)
        envs.append(local)
        ops.extend(sub.op_nodes)
    if not envs:
        s.miss(f"no user of `{each.source}` matches" + (f": {first_miss}" if first_miss else ""), 1, src.node,
               MatchStatus.FANOUT if first_miss else MatchStatus.STRUCTURE, late=True)
        return None
    s.op_nodes.extend(ops)
    return envs


_NO = object()


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
