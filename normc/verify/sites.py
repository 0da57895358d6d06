"""Exactness per site, in float64, without running the whole model in float64.

While a step rewrites the graph, every site of an exact rule is recorded (SiteChecker is the
rewriter's SiteObserver): a small detached copy of the matched nodes, whose boundary inputs
become placeholders and whose parameters are referenced (never copied), and, once the site is
emitted, the nodes that replaced it with the float64 values the rule computed for its new
parameters (kept as the float32 residual of what the graph stores, released after the step).
After the step, one run of the fp32 graph on the verification inputs captures the values of the
sites' boundary nodes only; each site's original and its replacement are then evaluated in
float64 on those values, one site at a time (its parameters cast for that site alone), and
their outputs compared. Casts elsewhere in the model do not matter, and casts inside a site
are evaluated in float64 too (`x.float()` inside a norm is float64 here).

Global passes report regions instead (`regions_before` / `regions_after`): a block cut out of
the graph at values the pass maps by a known relation (Pre-RMSNorm: the residual stream, which
the new graph carries centred). The original block is evaluated on the values the graph had
before the pass, the new one on those values mapped by the relation, both in float64.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..frontend.trace import GUARDS_MODULE as GUARDS
from ..ir.canonicalize import reads_shape_only
from ..ir.graph import get_param, live, param_at, run_recording
from ..ir.rewrite import RowBlockValue
from .compare import OutputDiff, Tolerance, diff_tensors, merge_worst

_LOW = (torch.float32, torch.float16, torch.bfloat16)
CENTRED = "centred"  # relation: new = old - mean(old, dim=-1)
COMPRESSED = "compressed"  # relation: new = (old - mean(old, dim=-1))[..., :-1] (Pre-CRMSNorm's stream)
SHAPE = "shape"      # relation: the rest of the graph reads only the value's shape


def _up(value, to: torch.dtype = torch.float64):
    """Float tensors and float dtypes (in arguments) of lower precision than `to` to `to`. Runs on every
    argument of every node a check evaluates: plain tuples, lists and dicts are walked directly (pytree's
    generic walk costs more than the op on a block's small activations); other containers go to pytree."""
    low = _LOW if to == torch.float64 else tuple(d for d in _LOW if d != to)

    def one(v):
        if isinstance(v, torch.Tensor):
            return v.to(to) if v.dtype in low else v
        if isinstance(v, torch.dtype):
            return to if v in low else v
        kind = type(v)
        if kind is tuple or kind is list:
            return kind(one(x) for x in v)
        if kind is dict:
            return {k: one(x) for k, x in v.items()}
        if isinstance(v, (tuple, list, dict)):  # namedtuples, return types: pytree knows how to rebuild them
            return pytree.tree_map(one, v)
        return v
    return one(value)


class _Upcast(fx.Interpreter):
    """Runs a small graph in float64 (or `to`): every float value, parameter and dtype argument is
    upcast. Parameters are upcast where an op reads them, so only one is held upcast at a time."""

    def __init__(self, graph: fx.Graph, attrs, to: torch.dtype = torch.float64):
        super().__init__(torch.nn.Module(), graph=graph)
        self.attrs, self.to = attrs, to
        self._casts = {"float": "double", "half": "double", "bfloat16": "double"} if to == torch.float64 \
            else {"half": "float", "bfloat16": "float"}

    def fetch_attr(self, target: str):
        return self.attrs[target]

    def call_function(self, target, args, kwargs):
        return super().call_function(target, _up(args, self.to), _up(kwargs, self.to))

    def call_method(self, target, args, kwargs):
        return super().call_method(self._casts.get(target, target), _up(args, self.to), _up(kwargs, self.to))

    def call_module(self, target, args, kwargs):
        if target == GUARDS:
            return None  # torch.export's check of the traced input shapes and dtypes: the inputs are upcast on purpose
        return super().call_module(target, args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        return out if n.op == "get_attr" else _up(out, self.to)


class _GraphAttrs:
    """A graph module's parameters by target, as they are stored (read lazily)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __getitem__(self, target: str):
        return param_at(self.gm, target)


def run_upcast(gm: fx.GraphModule, args: tuple, to: torch.dtype = torch.float32) -> tuple:
    """Evaluate a reduced-precision graph with every bf16/fp16 value in `to` instead, its parameters upcast
    one op at a time (never a whole upcast copy of the weights): the function the graph's dtype
    approximates. Graphs that call submodules are not supported (None)."""
    if any(n.op == "call_module" and n.target != GUARDS for n in gm.graph.nodes):
        return None
    with torch.no_grad():
        out = _Upcast(gm.graph, _GraphAttrs(gm), to).run(*args)
    return tuple(pytree.tree_leaves(out))


@dataclass
class _Piece:
    """A detached copy of some nodes of the big graph."""
    graph: fx.Graph
    inputs: list                      # big-graph nodes feeding its placeholders, in order
    params: dict                      # small get_attr target -> tensor of the big graph (a reference)
    exact: dict = field(default_factory=dict)   # small target -> callable giving its float64 value
    modules: dict = field(default_factory=dict)  # small call_module target -> module of the big graph
    env: dict = field(default_factory=dict)      # big-graph node -> its copy

    def run(self, values: list, casts: dict | None = None) -> tuple:
        """`casts`: float64 copies kept for the runs of one case (the original and the replacement read
        mostly the same tensors, on every input): each is cast once per case instead of once per run."""
        attrs = {}
        for name, t in self.params.items():
            f = self.exact.get(name)
            key = (id(self), name) if f is not None else id(t)
            if casts is not None and key in casts:
                attrs[name] = casts[key]
                continue
            attrs[name] = f() if f is not None else (_up(t) if isinstance(t, torch.Tensor) else t)
            if casts is not None:
                casts[key] = attrs[name]
        for name, m in self.modules.items():
            attrs[name] = copy.deepcopy(m).double()  # a module inside one block: small
        with torch.no_grad():
            return tuple(_Upcast(self.graph, attrs).run(*values))


def _extract(gm: fx.GraphModule, nodes: list, outputs: list | None, exact: dict | None = None) -> _Piece:
    """Copy `nodes` (in graph order) into a standalone graph returning `outputs` (None: added later);
    what they read from outside becomes placeholders (values) or attributes (parameters, referenced)."""
    graph = fx.Graph()
    piece = _Piece(graph, [], {})
    env = piece.env
    inside = set(nodes)

    def arg(n: fx.Node):
        if n in env:
            return env[n]
        if n.op == "get_attr":
            name = f"p{len(piece.params)}"
            piece.params[name] = get_param(gm, n)
            if exact is not None and n.target in exact:
                piece.exact[name] = exact[n.target]
            env[n] = graph.create_node("get_attr", name)
        elif n in inside:  # pragma: no cover - nodes come in graph order
            raise AssertionError(f"{n.name} used before it is copied")
        else:
            env[n] = graph.placeholder(f"in{len(piece.inputs)}")
            piece.inputs.append(n)
        return env[n]

    for n in (outputs or []) + nodes:  # placeholders first, in a stable order
        for a in n.all_input_nodes:
            if a not in inside:
                arg(a)
    for n in nodes:
        if n.op == "call_module":
            name = f"m{len(piece.modules)}"
            piece.modules[name] = gm.get_submodule(n.target)
            env[n] = graph.create_node("call_module", name, *fx.node.map_arg((n.args, n.kwargs), arg))
            env[n].meta = dict(n.meta)
        else:
            env[n] = graph.node_copy(n, arg)
    if outputs is not None:
        graph.output(tuple(arg(o) for o in outputs))
    return piece


def walk_back(outputs: list, stop: set) -> list:
    """The nodes computing `outputs` from `stop`, parameters and graph inputs, in graph order."""
    seen: set = set()
    stop = set(stop) - set(outputs)  # a value that is cut elsewhere is computed where it is an output
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in seen or n in stop or n.op in ("get_attr", "placeholder"):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(seen)


@dataclass
class Region:
    """A block a global pass rewrites as a whole: `outputs` (node, relation) are compared, `cuts`
    (node, relation) are where the block is cut out of the graph (the values it is evaluated on).
    Relation None: the new graph has the same value; CENTRED: the new value is centred over dim -1."""
    key: str
    site: str
    path: str
    outputs: list
    cuts: list


@dataclass
class _Case:
    rule: str
    site: str
    key: str
    path: str
    original: _Piece
    new: _Piece | None = None
    n_out: int = 0                    # outputs compared (the original's further outputs feed the new piece)
    links: list = field(default_factory=list)  # per new input: ("graph", node) | ("orig", index)
    relations: list = field(default_factory=list)  # per compared output
    diffs: list = field(default_factory=list)      # per input: list[OutputDiff]
    reason: str | None = None          # why it could not be checked


@dataclass
class SiteResult:
    rule: str
    site: str
    key: str
    path: str
    max_abs_err: float
    max_rel_err: float
    finite: bool                      # no non-finite values where the original is finite, shapes kept
    n_inputs: int
    reason: str | None = None          # not checked: why

    def passed(self, tol: Tolerance) -> bool:
        if self.reason is not None or not self.finite:
            return False
        if tol.max_abs is not None and not self.max_abs_err <= tol.max_abs:
            return False
        return tol.max_rel is None or self.max_rel_err <= tol.max_rel

    def to_dict(self, tol: Tolerance | None = None) -> dict:
        d = {"rule": self.rule, "site": self.site, "key": self.key, "path": self.path,
             "max_abs_err": _num(self.max_abs_err), "max_rel_err": _num(self.max_rel_err),
             "n_inputs": self.n_inputs}
        if self.reason:
            d["reason"] = self.reason
        if tol is not None:
            d["passed"] = self.passed(tol)
        return d


def _num(x: float):
    import math
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf")


class SiteChecker:
    """Records the sites of one step and checks each in float64 (see the module docstring)."""

    def __init__(self, inputs: list):
        self.inputs = inputs
        self.cases: list[_Case] = []
        self.forward: dict[fx.Node, fx.Node] = {}  # replaced node -> its replacement (later sites erase boundaries)
        self.exact: dict[str, Callable] = {}       # new parameter target -> its float64 value
        self.unchecked: list[str] = []              # rules whose sites cannot be checked (approximate kinds are not)
        self.results: list[SiteResult] = []
        self._regions: list = []

    # ------------------------------------------------------------ the rewriter's SiteObserver
    def site_matched(self, gm, match, rule):
        if getattr(rule, "kind", "exact") != "exact":
            return None
        nodes = sorted(dict.fromkeys(n for _, n in match.op_nodes))
        return gm, rule, nodes, _extract(gm, nodes, None)  # its outputs are known once the site is emitted

    def site_emitted(self, token, record, created, values=None):
        if token is None:
            return
        gm, rule, nodes, piece = token
        env = piece.env
        by_name = {n.name: n for n in nodes}
        now = {n.name: n for n in list(env) + list(created) if live(n)}  # what a replaced value can now be
        olds = [by_name[o] for o, n in record.replaced.items() if o in by_name and n in now]
        news = [now[record.replaced[o.name]] for o in olds]
        for o, n in zip(olds, news):
            self.forward[o] = n
        for node, value in (values or {}).items():
            self.exact[node.target] = _exact_value(get_param(gm, node), value)
        calls = [n for n in created if n.op != "get_attr"]
        new = _extract(gm, calls, news, self.exact)
        reads_orig = [n for n in new.inputs if n in env]
        piece.graph.output(tuple(env[n] for n in olds + reads_orig))
        case = _Case(rule.qualname or rule.name, record.site, record.key, record.path, piece, new, len(olds))
        case.links = [("orig", len(olds) + reads_orig.index(n)) if n in env else ("graph", n) for n in new.inputs]
        inside = set(created)
        case.relations = [SHAPE if all(reads_shape_only(u) for u in n.users if u not in inside) else None
                          for n in news]
        if not olds:
            case.reason = "the site replaced no value the rest of the graph reads"
        self.cases.append(case)

    # ------------------------------------------------------------ global passes
    def param_value(self, target: str, value: Callable) -> None:
        """A global pass gives the float64 value of a parameter it created (a callable: computed when needed)."""
        self.exact[target] = value

    def regions_before(self, gm: fx.GraphModule, rule: str, regions: list[Region]) -> None:
        """Cut each region out of the graph as it is before the pass, with the values at its cuts."""
        pieces = []
        for r in regions:
            outs = [n for n, _ in r.outputs]
            stop = {n for n, _ in r.cuts}
            pieces.append((r, _extract(gm, walk_back(outs, stop), outs)))
        needed = {n for _, p in pieces for n in p.inputs}
        values = [_capture(gm, needed, args, kwargs) if needed else {} for args, kwargs in self.inputs]
        self._regions.append((rule, pieces, values))

    def regions_after(self, gm: fx.GraphModule, same: dict, related: dict) -> None:
        """The same regions in the graph after the pass, each checked now, then dropped. `same`: old node ->
        the node that now computes the same value; `related`: old node -> the node that now carries its
        value under the region's relation (a node in neither is its own counterpart)."""
        rule, pieces, values = self._regions.pop()

        def now(n, rel):
            return (same if rel is None else related).get(n, n)
        for r, orig in pieces:
            outs = [now(n, rel) for n, rel in r.outputs]
            cut_rel = {n: rel for n, rel in r.cuts}
            new_cuts = {now(n, rel): n for n, rel in r.cuts}
            case = _Case(rule, r.site, r.key, r.path, orig, n_out=len(outs), relations=[rel for _, rel in r.outputs])
            try:
                case.new = _extract(gm, walk_back(outs, set(new_cuts)), outs, self.exact)
            except Exception as e:  # noqa: BLE001 - reported as a site that could not be checked
                case.reason = f"the rewritten block could not be cut out: {type(e).__name__}: {e}"
            if case.new is not None:
                for n in case.new.inputs:
                    old = new_cuts.get(n, n)
                    if old not in orig.inputs:
                        case.reason = f"the rewritten block reads `{n.name}`, which the original block does not"
                        break
                    case.links.append(("region", orig.inputs.index(old), cut_rel.get(old)))
            casts: dict = {}  # one region's parameters in float64, for its runs only
            for vals in values:
                self._run_case(case, [vals.get(n) for n in orig.inputs], None, casts)
            del casts
            self.results.append(self._result(case, len(values)))

    # ------------------------------------------------------------ checking
    def check(self, gm: fx.GraphModule) -> list[SiteResult]:
        """Run the fp32 graph once per input, capturing the sites' boundary values, and check every site."""
        resolved = {}
        for case in self.cases:
            for n in case.original.inputs + [x for kind, x in case.links if kind == "graph"]:
                m = n
                while not live(m) and m in self.forward:
                    m = self.forward[m]
                if not live(m):
                    case.reason = case.reason or f"its input `{n.name}` is no longer in the graph"
                resolved[n] = m
        needed = {m for m in resolved.values() if live(m)}
        active = [c for c in self.cases if c.reason is None]
        n_in = 0
        if active:
            captured = [_capture(gm, needed, args, kwargs) for args, kwargs in self.inputs]  # boundary values only
            n_in = len(captured)
            for case in active:
                casts: dict = {}  # the site's parameters in float64, for its runs only
                for got in captured:
                    orig_in = [got.get(resolved[n]) for n in case.original.inputs]
                    self._run_case(case, orig_in, lambda node, got=got: got.get(resolved[node]), casts)
                del casts
        self.results.extend(self._result(c, n_in) for c in self.cases)
        self.cases, self.forward, self.exact = [], {}, {}
        return self.results

    def _run_case(self, case: _Case, orig_in: list, graph_value, casts: dict | None = None) -> None:
        if case.reason is not None:
            return
        try:
            if any(v is None for v in orig_in):
                raise RuntimeError("a boundary value was not captured")
            ref = case.original.run(orig_in, casts)
            new_in = []
            for link in case.links:
                if link[0] == "orig":
                    new_in.append(ref[link[1]])
                elif link[0] == "graph":
                    new_in.append(_up(graph_value(link[1])))
                else:
                    v = _up(orig_in[link[1]])
                    new_in.append(_relate(v, link[2]))
            new = case.new.run(new_in, casts)
            diffs = []
            for i in range(case.n_out):
                a, b = ref[i], new[i]
                if case.relations[i] in (CENTRED, COMPRESSED):
                    a = _relate(a, case.relations[i])
                elif case.relations[i] == SHAPE and a.shape == b.shape:
                    b = a  # only its shape is read: the shape is what must not change
                diffs.append(diff_tensors(f"[{i}]", a, b, Tolerance()))
            case.diffs.append(diffs)
        except Exception as e:  # noqa: BLE001 - a site that cannot be evaluated is reported, never passed
            case.reason = f"could not be evaluated in float64: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

    @staticmethod
    def _result(case: _Case, n_inputs: int) -> SiteResult:
        worst: list[OutputDiff] = merge_worst(case.diffs) if case.reason is None else []
        max_abs = max((d.max_abs for d in worst), default=float("nan"))
        max_rel = max((d.max_rel for d in worst), default=float("nan"))
        finite = bool(worst) and all(d.passed for d in worst)
        reason = case.reason if case.reason is not None else (None if worst else "no input was evaluated")
        return SiteResult(case.rule, case.site, case.key, case.path, max_abs, max_rel, finite, n_inputs, reason)


def float64_value(gm: fx.GraphModule, node: fx.Node) -> Callable:
    """The value of a node computed from parameters and constants alone, evaluated in float64 when asked
    (a pass that folds such a value gives this as the folded parameter's float64 value)."""
    piece = _extract(gm, walk_back([node], set()), [node])
    return lambda: piece.run([])[0]


def _relate(t, relation):
    """The value the new graph carries where the original has `t`."""
    if relation in (CENTRED, COMPRESSED):
        t = t - t.mean(dim=-1, keepdim=True)
    return t[..., :-1] if relation == COMPRESSED else t


def _exact_value(stored: torch.Tensor, value: torch.Tensor) -> Callable:
    """The float64 value of a new parameter, from what the graph stores plus a float32 residual
    (exact to ~2^-48 of the value; the residual costs what the stored tensor does, for one step)."""
    if isinstance(value, RowBlockValue):  # computed a block of rows at a time: its residual came with it
        residual = value.residual
        if residual is None:
            raise RuntimeError("a row-block value without its residual reached the float64 check")
    elif not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return lambda: _up(stored)
    elif stored.dtype == torch.float64:
        return lambda: stored
    else:
        residual = (value.detach().to(torch.float64) - stored.double()).float()
    if not residual.any():
        return lambda: stored.double()
    return lambda: stored.double() + residual.double()


def _capture(gm: fx.GraphModule, nodes: set, args, kwargs) -> dict:
    """The values of `nodes` in one run of the graph (only those are kept)."""
    got: dict = {}

    def keep(node, value):
        if node in nodes:
            got[node] = value
    run_recording(gm, args, kwargs, keep)
    return got
