"""`normc prove`: check a rule on its own, without any model.

For every rule, the prover instantiates the rule's `match` pattern as a small standalone
`torch.fx.GraphModule` over random tensors of random valid shapes, applies the rule to it
with the real rewriter (`normc.ir.rewrite.apply_rule`), runs both graphs and compares.

    results = prove_program(load_std())          # or prove_rule(program.rules["std.fold_bn_conv"])
    print(format_table(results))

How an instance is built
    * activation variables become placeholders, operands the op schema marks `param`
      (and pattern variables in those slots) become `get_attr` parameters registered on
      the module; op calls are `graph.call_function(schema.impl, operands, attrs)` with every
      attribute as a keyword, the canonical form `normc.ir.canonicalize` produces;
    * one generator per op picks consistent shapes (conv rank from the alias or 1-3,
      channels, groups incl. depthwise, kernel, stride, padding incl. "same"/"valid",
      dilation; batch_norm statistics from its input's channel statistics, var > 0, and
      sometimes training mode; layer/rms norm over the last dim, or the last two; linear
      `[.., in] -> [.., out]`; embedding ids; getitem indices (ints, slices, Ellipsis, None);
      the second operand of add/sub/mul/div as an activation, a parameter (per channel or
      full) or a python scalar); attributes bound by the pattern (eps, groups, padding, dim,
      ...) get random valid values (eps from {1e-12, 1e-6, 1e-5, 0.1}). Operands are built
      inner-first; the rank a consumer needs (conv2d: 4) is passed down as a hint;
    * optional operands (`b?`, `_`) are present or absent at random; `each u in users(h)`
      creates 1-3 users; `each u in any users(h)` adds 0-2 readers that do not match (a
      residual add, a relu, the graph output); the `where` clause is read for hints
      (`is_param(v)`, `present(v)`, `rank(v) == k`, `v == literal`, `all_zero(v)`,
      `is_number(v)`) that make a guard-satisfying instance more likely, never certain, so
      guards are exercised both ways;
    * every instance draws an input profile: normal, offset (non-zero channel means),
      large (1e3..1e4), positive, negative, degenerate (zero / constant channels, constant
      rows, a near-zero variance), so edge cases are covered across a rule's instances.
    The graph's outputs are the pattern root and every `each` target (a value that feeds
    a fan-out is not an output itself: an extra user would defeat the `each`).

How an instance is judged (per dtype)
    A dry run of the rule on the fp64 instance decides whether the rule accepts it (guards,
    refusals); refused instances are replaced, up to 10x `instances` tries. An accepted
    instance is cast to each dtype D (weights and inputs rounded to D, as a D model would
    hold them). The reference is the ORIGINAL pattern evaluated in fp64 on those D-rounded
    weights and inputs. The rule is applied to the D instance (its math then runs on the D
    weights, as it would on a D model), and

        err_new  = max |rewritten_D - reference| / max |reference|
        err_orig = max |original_D  - reference| / max |reference|
        floor    = the same measure for the original pattern evaluated in fp64 with every
                   value it computes (inputs, weights, each intermediate) perturbed by one
                   relative rounding error of D: the error any implementation that rounds
                   to D may make (large only where the pattern cancels, `c - mean`, |c| >> |y|)

    (per output, the worst output counts; when the reference is all zero the absolute error
    is used). An instance passes in D when

        err_new <= tol_D + SLACK * max(err_orig, floor)          (SLACK = 4)

    with tol = 1e-10 (fp64), 1e-5 (fp32), 1e-2 (fp16). In fp64 this is the plain 1e-10
    bound (err_orig = 0, floor ~1e-16); in fp16 the rewrite may be up to 4x worse than the
    rounding error of the original pattern itself, plus 1e-2: a rule is not blamed for an
    ill-conditioned instance, it is blamed for making one worse (e.g. new weights that
    overflow fp16). Instances whose original output (or weights) are not finite in D are
    not judged in D; an fp64 instance whose output is not finite is replaced. The error a
    table reports per dtype is the worst err_new over instances where the original pattern
    is itself accurate in D (err_orig and floor within tol), or over failing ones.

    Calibration statistics (absmax/min/max/mean/rms of an activation) come from the
    instance's own run (`normc.verify.calibrate.Statistics`: per channel of the last dim,
    float64); values a rewrite creates have none, so a rule meeting its own output refuses.
    The rewriter runs with at most MAX_SWEEPS sweeps: a rule that rebuilds its own pattern
    doubles the graph every sweep and is reported (FixpointError), not waited for.

Verdicts: sound, unsound (a counterexample is kept: dtype, instance, pattern and rewritten
code, and the seed that reproduces it), untestable (no generated instance was accepted by
the rule: the most common reason is given), approximate (kind `approximate`: error reported,
not judged), structural (kind `structural`: only shapes are checked), global (an extern
Python pass: checked on models). A rule whose rewrite crashes (an exception that is not a
refusal), produces a graph that does not run, changes an output's shape or makes it
non-finite on a valid instance is unsound, whatever its kind.
"""
from __future__ import annotations

import dataclasses

import contextlib
import copy
import math
import random
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..grammar import syntax_tree as T
from ..ir.builtins import EvalContext
from ..ir.graph import annotate_shapes, get_param
from ..ir.match import Pattern
from ..ir.ops import OPS, schema_for
from ..ir.evaluate import conjuncts
from ..ir.rewrite import apply_rule, bind_params
from .calibrate import Statistics, collect

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
SLACK = 4.0
MAX_SWEEPS = 6  # a pattern instance reaches its fixpoint in a sweep or two; a rule that feeds itself
# doubles the graph every sweep, so the rewriter's own limit (64) would never be reached in time
EPS_CHOICES = (1e-12, 1e-6, 1e-5, 0.1)
PROFILES = ("normal", "offset", "large", "degenerate", "positive", "negative")
DEFAULT_DTYPES = (torch.float64, torch.float32, torch.float16)


# ============================================================================ results
@dataclass
class ProveResult:
    name: str
    instances: int                        # instances generated (tried)
    applied: int                          # instances the rule rewrote (in float64)
    max_err_by_dtype: dict[str, float]    # worst err_new per dtype over applied instances
    tolerance_by_dtype: dict[str, float]
    verdict: str                          # sound | unsound | untestable | approximate | structural | global
    reason: str = ""
    counterexample: str | None = None
    kind: str = "exact"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict in ("sound", "approximate", "structural", "global")

    def to_dict(self) -> dict:
        def num(x):
            return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf")
        return {"name": self.name, "kind": self.kind, "instances": self.instances, "applied": self.applied,
                "max_err_by_dtype": {k: num(v) for k, v in self.max_err_by_dtype.items()},
                "tolerance_by_dtype": dict(self.tolerance_by_dtype), "verdict": self.verdict,
                "reason": self.reason, "counterexample": self.counterexample, "seconds": round(self.seconds, 3)}


class _Invalid(Exception):
    """The generated instance is not a valid program (shape mismatch, ...): draw another."""


# ============================================================================ statistics
def collect_stats(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> Statistics:
    """Calibration statistics of one run of `gm` (what `absmax(h)`, `min(h)`, ... read in a rule)."""
    return collect(gm, [(tuple(args), dict(kwargs or {}))])


# ============================================================================ where-clause hints
@dataclass
class _Hints:
    param: dict = field(default_factory=dict)     # var -> must (not) be a parameter
    present: dict = field(default_factory=dict)   # var -> must (not) be present
    rank: dict = field(default_factory=dict)      # var -> rank
    equal: dict = field(default_factory=dict)     # var -> literal value


def _literal(e):
    if isinstance(e, T.Num):
        return True, e.value
    if isinstance(e, T.Unary) and e.op == "-" and isinstance(e.operand, T.Num):
        return True, -e.operand.value
    if isinstance(e, (T.Str, T.Const)):
        return True, e.value
    if isinstance(e, T.ListLit):
        items = [_literal(i) for i in e.items]
        if all(ok for ok, _ in items):
            return True, [v for _, v in items]
    return False, None


def _hints(rule: T.Rule) -> _Hints:
    h = _Hints()

    def walk(e, positive=True):
        if isinstance(e, T.Binary) and e.op == "and" and positive:
            walk(e.left, True)
            walk(e.right, True)
        elif isinstance(e, T.Unary) and e.op == "not":
            walk(e.operand, not positive)
        elif isinstance(e, T.Call) and len(e.args) == 1 and isinstance(e.args[0], T.Name):
            v = e.args[0].id
            if e.func == "is_param":
                h.param[v] = positive
            elif e.func == "all_zero" and positive:
                h.equal[v] = 0
            elif e.func == "is_number" and positive:
                h.rank[v] = 0  # a python scalar operand
            elif e.func == "present":
                h.present[v] = positive
        elif isinstance(e, T.Binary) and e.op == "==" and positive:
            for a, b in ((e.left, e.right), (e.right, e.left)):
                ok, lit = _literal(b)
                if not ok:
                    continue
                if isinstance(a, T.Name):
                    h.equal[a.id] = lit
                elif isinstance(a, T.Call) and a.func == "rank" and len(a.args) == 1 and isinstance(a.args[0], T.Name):
                    h.rank[a.args[0].id] = int(lit)
    if rule.where is not None:
        walk(rule.where)
    return h


# ============================================================================ value specs
@dataclass
class _V:
    """A materialised pattern value."""
    node: object            # fx.Node, a python value (scalar operand / attribute) or None
    value: object           # the float64 tensor / python value / None
    kind: str               # act | param | const | absent | attr


@dataclass
class _Slot:
    name: str
    parg: object            # PVar | PWild | None
    optional: bool          # may be absent
    var: str | None


_MODULE_ATTRS = set(dir(torch.nn.Module()))


class _Builder:
    def __init__(self, rule: T.Rule, rng: random.Random, gen: torch.Generator, profile: str, hints: _Hints):
        self.rule, self.rng, self.gen, self.profile, self.hints = rule, rng, gen, profile, hints
        self.stmts = {s.target: s for s in rule.match if isinstance(s, T.MatchStmt)}
        self.eaches = [s for s in rule.match if isinstance(s, T.EachStmt)]
        self.graph = fx.Graph()
        self.module = torch.nn.Module()
        self.inputs: list[torch.Tensor] = []
        self.C = rng.choice((1, 2, 3, 3, 4, 4, 4, 5, 6, 8, 8)) if rng.random() < 0.97 else 16
        self.act_scale = 1.0
        self.act_offset = 0.0
        if profile == "large":
            self.act_scale = 10 ** rng.uniform(3, 4)
        elif profile == "offset":
            self.act_offset = rng.choice((-1, 1)) * rng.uniform(3, 30)
        self._ids = Counter()
        self.want: int | None = None  # rank the consumer of the op being generated expects

    # ------------------------------------------------------------- sizes
    def dim(self) -> int:
        return self.C if self.rng.random() < 0.6 else self.rng.choice((1, 2, 3, 4, 5, 6, 8))

    def out_dim(self, din: int) -> int:
        return din if self.rng.random() < 0.5 else self.rng.choice((1, 2, 3, 4, 5, 6, 8))

    def batch(self) -> list[int]:
        if self.want is not None and 2 <= self.want <= 4:  # the consumer wants an input of this rank
            return [self.rng.choice((1, 2, 3))] + [self.rng.choice((1, 2, 3, 4, 5)) for _ in range(self.want - 2)]
        return [self.rng.choice((1, 2, 3))] if self.rng.random() < 0.5 else \
            [self.rng.choice((1, 2)), self.rng.choice((1, 2, 3, 4, 5))]

    def act_shape(self, lo=2, hi=3) -> list[int]:
        if self.want is not None and lo <= self.want <= max(hi, 5):
            rank = self.want
        else:  # the higher ranks are where broadcasting and reduction-dim mistakes show
            rank = self.rng.choice(list(range(lo, hi + 1)) + [hi])
        return [self.rng.choice((1, 2, 3))] + [self.rng.choice((1, 2, 3, 4, 5)) for _ in range(rank - 2)] + [self.dim()]

    # ------------------------------------------------------------- tensors
    def _randn(self, shape):
        return torch.randn(list(shape), generator=self.gen, dtype=torch.float64)

    def _rand(self, shape):
        return torch.rand(list(shape), generator=self.gen, dtype=torch.float64)

    def act_tensor(self, shape, positive=False) -> torch.Tensor:
        p = self.profile
        if positive or p == "positive":
            t = self._rand(shape) * 2 + 0.05
        elif p == "negative":
            t = -(self._rand(shape) * 2 + 0.05)
        else:
            t = self._randn(shape)
        t = t * self.act_scale + (0 if positive else self.act_offset)
        if positive and self.act_offset:
            t = t + abs(self.act_offset)
        if p == "degenerate" and t.dim() >= 1 and t.numel() > 1:
            last = t.shape[-1]
            if last > 1:
                t[..., self.rng.randrange(last)] = 0.0 if not positive else 0.05
                t[..., self.rng.randrange(last)] = self.rng.uniform(0.1, 3)
            if t.dim() >= 2 and t.shape[1] > 1:
                idx = [slice(None)] * t.dim()
                idx[1] = self.rng.randrange(t.shape[1])
                t[tuple(idx)] = 0.0 if not positive else 0.05
            if t.dim() >= 2:
                rows = t.reshape(-1, last)
                rows[self.rng.randrange(rows.shape[0])] = self.rng.uniform(0.1, 3)  # a constant row
        return t

    def param_tensor(self, shape, role) -> torch.Tensor:
        if role == "var":
            t = self._rand(shape) * 1.9 + 0.1
            if self.profile == "degenerate" and t.numel():
                t.view(-1)[self.rng.randrange(t.numel())] = 1e-6
        elif role == "nonzero":
            t = (self._rand(shape) * 1.5 + 0.5) * torch.where(self._rand(shape) < 0.5, -1.0, 1.0)
        elif role == "positive":
            t = self._rand(shape) * 1.9 + 0.1
        else:  # weight, bias, gain, mean, any
            t = self._randn(shape)
            if role == "weight" and len(shape) >= 2:
                fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
                t = t / math.sqrt(fan_in) * 1.5
            if role == "gain":
                t = t * 0.5 + 1.0
            if self.profile == "degenerate" and t.numel() > 1 and role in ("gain", "weight"):
                t.view(-1)[self.rng.randrange(t.numel())] = 0.0
        return t

    # ------------------------------------------------------------- graph nodes
    def _unique(self, base: str) -> str:
        base = re.sub(r"\W", "_", base) or "v"
        if base in _MODULE_ATTRS:
            base = base + "_"
        self._ids[base] += 1
        return base if self._ids[base] == 1 else f"{base}_{self._ids[base]}"

    def placeholder(self, name: str, value: torch.Tensor) -> _V:
        node = self.graph.placeholder(self._unique(name))
        self.inputs.append(value)
        return _V(node, value, "act")

    def get_attr(self, name: str, value: torch.Tensor) -> _V:
        target = self._unique(name)
        self.module.register_parameter(target, torch.nn.Parameter(value, requires_grad=False))
        return _V(self.graph.get_attr(target), value, "param")

    # ------------------------------------------------------------- pattern
    def build(self):
        env: dict[str, _V] = {}
        pattern = Pattern(self.rule)
        root = pattern.root.target
        sources = {e.source for e in self.eaches}
        outputs = []
        rv = self.stmt(root, env)
        if root not in sources:
            outputs.append(rv)
        for each in self.eaches:
            if each.source not in env:
                self.stmt(each.source, env)
            users = ["match"] * self.rng.choice((1, 2, 2, 3))
            if each.partial:  # `each u in any users(h)`: users that do not match are left alone
                users += [self.rng.choice(("residual", "relu", "output")) for _ in range(self.rng.choice((0, 1, 1, 2)))]
                self.rng.shuffle(users)
            for k, kind in enumerate(users):
                if kind == "match":
                    v = self.call(each.body.call, dict(env), name=f"{each.body.target}_{k}")
                else:
                    v = self.other_user(env[each.source], kind)
                outputs.append(v)
        for o in outputs:
            if not isinstance(o.value, torch.Tensor) or not o.value.is_floating_point():
                raise _Invalid("the pattern root is not a floating tensor")
            if o.value.numel() == 0:
                raise _Invalid("the pattern's output is empty")
        self.graph.output(tuple(o.node for o in outputs))
        gm = fx.GraphModule(self.module, self.graph)
        return gm, tuple(self.inputs), [o.value for o in outputs]

    def other_user(self, src: _V, kind: str) -> _V:
        """A reader of a fan-out source that is not the fan-out's op: a residual add, a relu, or the output."""
        if kind == "output":
            return src
        if kind == "residual":
            z = self.placeholder("skip", self.act_tensor(list(src.value.shape)))
            node = self.graph.create_node("call_function", OPS["add"].impl, (src.node, z.node), {}, name=self._unique("residual"))
            return _V(node, src.value + z.value, "act")
        node = self.graph.create_node("call_function", OPS["relu"].impl, (src.node,), {}, name=self._unique("relu"))
        return _V(node, torch.relu(src.value), "act")

    def stmt(self, name: str, env: dict, want: int | None = None) -> _V:
        if name in env:
            return env[name]
        v = self.call(self.stmts[name].call, env, name=name, want=want)
        env[name] = v
        return v

    def call(self, pc: T.PCall, env: dict, name: str | None = None, want: int | None = None) -> _V:
        """Build one op call; `want`: the rank its consumer expects (a hint for free input shapes)."""
        schema, rank = schema_for(pc.op)
        child_want = rank if rank is not None else want  # conv2d wants a rank-4 input
        slots = schema.slots
        given: dict[str, object] = {}
        for i, parg in enumerate(pc.args):
            given[slots[i]] = parg
        for k, parg in pc.kwargs:
            given[k] = parg
        operand_names = [o.name for o in schema.operands]
        vals: dict[str, _V] = {}
        free: dict[str, _Slot] = {}
        # structural operands first (sub-calls, statements, bound variables, literals), so
        # the free ones can be shaped after them
        for o in schema.operands:  # sub-calls and statements first: they may bind variables
            parg = given.get(o.name)
            if isinstance(parg, T.PCall) or (isinstance(parg, T.PVar) and parg.name in self.stmts):
                vals[o.name] = self.resolve(parg, env, None if o.param else child_want)
        for o in schema.operands:
            if o.name in vals:
                continue
            parg = given.get(o.name)
            v = self.resolve(parg, env)
            if v is not None:
                vals[o.name] = v
            else:
                var = parg.name if isinstance(parg, T.PVar) else None
                optional = o.optional and (parg is None or isinstance(parg, T.PWild) or parg.optional)
                if isinstance(parg, T.PVar) and parg.optional and not o.optional:
                    optional = False  # the op needs it
                free[o.name] = _Slot(o.name, parg, optional, var)
        fixed_attrs, free_attrs = {}, {}
        for a in schema.attrs:
            parg = given.get(a)
            if isinstance(parg, T.PLit):
                fixed_attrs[a] = parg.value
            elif isinstance(parg, T.PVar) and parg.name in env:
                fixed_attrs[a] = env[parg.name].value
            else:
                free_attrs[a] = parg.name if isinstance(parg, T.PVar) else None
        g = _OpGen(self, pc, schema, rank, vals, free, fixed_attrs, free_attrs, env)
        self.want = child_want
        _GENERATORS.get(schema.name, _gen_unary if schema.name in UNARY_OPS else _gen_generic)(g)
        for slot in free:
            if slot not in g.vals:
                if free[slot].optional:
                    g.absent(slot)
                else:
                    raise _Invalid(f"no value for {pc.op}.{slot}")
        attrs = {}
        for a, default in schema.attrs.items():
            if a in g.attrs:
                attrs[a] = g.attrs[a]
            elif a in fixed_attrs:
                attrs[a] = fixed_attrs[a]
            else:
                attrs[a] = default
            var = free_attrs.get(a)
            if var is not None and var not in env:
                env[var] = _V(attrs[a], attrs[a], "attr")
        # bind free operand variables
        for slot, info in free.items():
            if info.var is not None and info.var not in env:
                env[info.var] = g.vals[slot]
        operands = [g.vals[o].node if g.vals[o].kind in ("act", "param") else g.vals[o].value for o in operand_names]
        values = [g.vals[o].value for o in operand_names]
        try:
            with torch.no_grad():
                out = schema.impl(*values, **attrs)
        except Exception as e:  # the generated shapes do not fit: another instance
            raise _Invalid(f"{pc.op}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
        node = self.graph.create_node("call_function", schema.impl, tuple(operands), attrs,
                                      name=self._unique(name or schema.name))
        return _V(node, out, "act")

    def resolve(self, parg, env, want: int | None = None) -> _V | None:
        """A value that does not depend on the op's own generator, or None when it is free."""
        if isinstance(parg, T.PCall):
            return self.call(parg, env, want=want)
        if isinstance(parg, T.PLit):
            return _V(parg.value, parg.value, "const")
        if isinstance(parg, T.PVar):
            if parg.name in self.stmts:
                return self.stmt(parg.name, env, want)
            if parg.name in env:
                return env[parg.name]
        return None


class _OpGen:
    """What an op generator sees: the known operands, the free ones it must fill, the attributes."""

    def __init__(self, b: _Builder, pc, schema, rank, vals, free, fixed_attrs, free_attrs, env):
        self.b, self.pc, self.schema, self.rank = b, pc, schema, rank
        self.rng = b.rng
        self.vals: dict[str, _V] = vals
        self.free: dict[str, _Slot] = free
        self.fixed_attrs, self.free_attrs, self.env = fixed_attrs, free_attrs, env
        self.attrs: dict[str, object] = {}
        self._presence: dict[str, bool] = {}

    # operands
    def t(self, slot):
        v = self.vals.get(slot)
        return v.value if v is not None and isinstance(v.value, torch.Tensor) else None

    def known(self, slot) -> bool:
        return slot in self.vals

    def is_free(self, slot) -> bool:
        return slot in self.free and slot not in self.vals

    def _var(self, slot):
        info = self.free.get(slot)
        return info.var if info is not None else None

    def present(self, slot) -> bool:
        info = self.free[slot]
        if not info.optional:
            return True
        if slot not in self._presence:
            want = self.b.hints.present.get(info.var) if info.var else None
            p = 0.5 if want is None else (0.8 if want else 0.2)
            self._presence[slot] = self.rng.random() < p
        return self._presence[slot]

    def _label(self, slot):
        return self._var(slot) or f"{self.pc.op}_{slot}"

    def act(self, slot, shape, positive=False, ints=None, value=None):
        if not self.is_free(slot):
            return self.t(slot)
        if not self.present(slot):
            return self.absent(slot)
        if value is None:
            if ints is not None:
                value = torch.randint(0, ints, list(shape), generator=self.b.gen, dtype=torch.int64)
            else:
                value = self.b.act_tensor(shape, positive)
        self.vals[slot] = self.b.placeholder(self._label(slot), value)
        return value

    def param(self, slot, shape, role="any", value=None, force=None):
        if not self.is_free(slot):
            return self.t(slot)
        present = self.present(slot) if force is None else (force or not self.free[slot].optional)
        if not present:
            return self.absent(slot)
        value = self.b.param_tensor(shape, role) if value is None else value
        self.vals[slot] = self.b.get_attr(self._label(slot), value)
        return value

    def scalar(self, slot, value):
        if self.is_free(slot):
            self.vals[slot] = _V(value, value, "const")
        return value

    def absent(self, slot):
        if self.is_free(slot):
            self.vals[slot] = _V(None, None, "absent")
        return None

    def other(self, slot, like, nonzero=False):
        """The second operand of an elementwise op, shaped after `like`: activation, parameter or scalar."""
        if not self.is_free(slot):
            return self.t(slot)
        var = self._var(slot)
        hint_param = self.b.hints.param.get(var) if var else None
        hint_rank = self.b.hints.rank.get(var) if var else None
        like = list(like)
        kinds = ["act", "param_vec", "param_full", "scalar"]
        if hint_param is True:
            kinds = ["param_vec", "param_full"] * 4 + kinds
        elif hint_param is False:
            kinds = ["act", "scalar"] * 4 + kinds
        if hint_rank == 1:
            kinds = ["param_vec"] * 6 + kinds
        elif hint_rank == 0:
            kinds = ["scalar"] * 6 + kinds
        if var and ("eps" in var.lower()):
            kinds = ["scalar"] * 4 + kinds
        kind = self.rng.choice(kinds)
        if not like:
            kind = "scalar" if kind != "act" else "act"
        role = "nonzero" if nonzero else "any"
        if kind == "scalar":
            if var and "eps" in var.lower():
                value = self.rng.choice(EPS_CHOICES)
            else:
                value = self.rng.choice((0.5, 2.0, 3.0, -1.5, 1e-5)) if not nonzero else self.rng.choice((0.5, 2.0, -1.5))
            return self.scalar(slot, value)
        if kind == "act":
            if nonzero:
                return self.act(slot, like, value=self.b.param_tensor(like, "nonzero") * self.b.act_scale)
            return self.act(slot, like)
        if kind == "param_vec":
            return self.param(slot, like[-1:], role)
        return self.param(slot, like, role)

    # attributes
    def attr(self, name, choose):
        if name in self.fixed_attrs:
            value = self.fixed_attrs[name]
        else:
            var = self.free_attrs.get(name)
            hinted = var is not None and var in self.b.hints.equal and self.rng.random() < 0.6
            value = self.b.hints.equal[var] if hinted else choose()
        self.attrs[name] = value
        return value


# ============================================================================ per-op generators
def _eps(g: _OpGen):
    return g.rng.choice(EPS_CHOICES)


def _gen_linear(g: _OpGen):
    x, w = g.t("x"), g.t("w")
    if x is not None and x.dim() < 1:
        raise _Invalid("linear input is a scalar")
    din = x.shape[-1] if x is not None else (w.shape[1] if w is not None else g.b.dim())
    dout = w.shape[0] if w is not None else g.b.out_dim(din)
    g.act("x", g.b.batch() + [din])
    g.param("w", [dout, din], "weight")
    g.param("b", [dout], "bias")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _gen_conv(g: _OpGen):
    rng, b = g.rng, g.b
    x, w = g.t("x"), g.t("w")
    if g.rank is not None:
        sd = g.rank - 2
    elif x is not None:
        sd = x.dim() - 2
    elif w is not None:
        sd = w.dim() - 2
    elif b.want is not None and 3 <= b.want <= 5:
        sd = b.want - 2
    else:
        sd = rng.choice((1, 2, 2, 2, 3))
    if x is not None and x.dim() != sd + 2:
        raise _Invalid(f"conv input of rank {x.dim()} for a conv{sd}d")
    if x is not None:
        cin = x.shape[1]
    elif w is not None:
        cin = w.shape[1] * int(g.fixed_attrs.get("groups", 1))
    else:
        cin = b.dim()
        if "groups" in g.fixed_attrs and isinstance(g.fixed_attrs["groups"], int):
            cin = g.fixed_attrs["groups"] * rng.choice((1, 2))

    def groups_choice():
        r = rng.random()
        if r < 0.5 or cin == 1:
            return 1
        if r < 0.8:
            return cin  # depthwise
        return rng.choice(_divisors(cin))
    groups = g.attr("groups", groups_choice)
    if not isinstance(groups, int) or groups < 1 or cin % groups:
        raise _Invalid(f"groups {groups} does not divide {cin} channels")
    if w is not None:
        cout, k = w.shape[0], list(w.shape[2:])
    else:
        if groups == cin and cin > 1:
            cout = cin * rng.choice((1, 1, 2))
        else:
            cout = groups * rng.choice((1, 2, 3)) if groups > 1 else b.out_dim(cin)
        kk = rng.choice((1, 2, 3, 3))
        k = [kk] * sd if rng.random() < 0.8 else [rng.choice((1, 2, 3)) for _ in range(sd)]

    def tup(vals):
        return vals[0] if rng.random() < 0.4 and len(set(vals)) == 1 else tuple(vals)
    stride = g.attr("stride", lambda: tup([1] * sd) if rng.random() < 0.7 else tup([rng.choice((1, 2)) for _ in range(sd)]))

    def padding_choice():
        r = rng.random()
        if r < 0.35:
            return tup([0] * sd)
        if r < 0.6:
            return tup([1] * sd)
        if r < 0.8:
            return tup([kk // 2 for kk in k])
        if r < 0.9:
            return tup([rng.choice((0, 1, 2)) for _ in range(sd)])
        strides = stride if isinstance(stride, (tuple, list)) else [stride]
        return "same" if all(s == 1 for s in strides) and rng.random() < 0.6 else "valid"
    g.attr("padding", padding_choice)
    g.attr("dilation", lambda: tup([1] * sd) if rng.random() < 0.8 else tup([rng.choice((1, 2)) for _ in range(sd)]))
    spatial = [rng.randint(5, 8) for _ in range(sd)]
    g.act("x", [rng.choice((1, 2))] + [cin] + spatial)
    g.param("w", [cout, cin // groups] + k, "weight")
    g.param("b", [cout], "bias")


def _gen_conv_transpose(g: _OpGen):
    """Transposed conv: weight [in, out/groups, k...]; output_padding < stride; padding within the kernel."""
    rng, b = g.rng, g.b
    x, w = g.t("x"), g.t("w")
    if g.rank is not None:
        sd = g.rank - 2
    elif x is not None:
        sd = x.dim() - 2
    elif w is not None:
        sd = w.dim() - 2
    elif b.want is not None and 3 <= b.want <= 5:
        sd = b.want - 2
    else:
        sd = rng.choice((1, 2, 2, 3))
    if x is not None and x.dim() != sd + 2:
        raise _Invalid(f"conv_transpose input of rank {x.dim()} for a conv_transpose{sd}d")
    cin = x.shape[1] if x is not None else (w.shape[0] if w is not None else rng.choice((2, 4, 6)))
    groups = g.attr("groups", lambda: 1 if rng.random() < 0.5 or cin == 1 else rng.choice(
        [d for d in _divisors(cin) if d > 1]))
    if not isinstance(groups, int) or groups < 1 or cin % groups:
        raise _Invalid(f"groups {groups} does not divide {cin} channels")
    if w is not None:
        out_g, k = w.shape[1], list(w.shape[2:])
    else:
        out_g, k = rng.choice((1, 2, 3)), [rng.choice((1, 2, 3))] * sd
    stride = g.attr("stride", lambda: tuple(rng.choice((1, 2)) for _ in range(sd)))
    strides = list(stride) if isinstance(stride, (tuple, list)) else [stride] * sd
    dilation = g.attr("dilation", lambda: tuple(1 if rng.random() < 0.8 else 2 for _ in range(sd)))
    dils = list(dilation) if isinstance(dilation, (tuple, list)) else [dilation] * sd
    g.attr("padding", lambda: tuple(rng.randint(0, (kk - 1) * d // 2) for kk, d in zip(k, dils)))
    g.attr("output_padding", lambda: tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(strides, dils)))
    spatial = [rng.randint(3, 6) for _ in range(sd)]
    g.act("x", [rng.choice((1, 2)), cin] + spatial)
    g.param("w", [cin, out_g] + k, "weight")
    g.param("b", [out_g * groups], "bias")


def _channel_stats(x: torch.Tensor, dim: int = 1):
    dims = [d for d in range(x.dim()) if d != dim]
    mean = x.mean(dim=dims) if dims else x.clone()
    var = x.var(dim=dims, unbiased=False) if dims and x.numel() > x.shape[dim] else torch.ones_like(mean)
    return mean, var


def _gen_batch_norm(g: _OpGen):
    rng, b = g.rng, g.b
    x = g.t("x")
    if x is None:
        extra = b.want - 2 if b.want is not None and 2 <= b.want <= 5 else rng.choice((0, 1, 1, 2))
        shape = [rng.choice((2, 3)), b.dim()] + [rng.randint(1, 5) for _ in range(extra)]
        x = g.act("x", shape)
    if x.dim() < 2:
        raise _Invalid("batch_norm input has no channel dim")
    c = x.shape[1]
    training = g.attr("training", lambda: rng.random() < 0.3)  # batch statistics: a guard to exercise
    g.attr("momentum", lambda: 0.0)
    g.attr("eps", lambda: _eps(g))
    mean, var = _channel_stats(x)
    mean = mean + b._randn([c]) * var.sqrt().clamp_min(1e-3) * 0.5
    var = var * (b._rand([c]) * 1.5 + 0.5) + 1e-3 * b.act_scale ** 2
    if b.profile == "degenerate" and c > 1:
        var[rng.randrange(c)] = 1e-6
    stats = True
    if training and (g.is_free("mean") and g.is_free("var")):
        stats = rng.random() < 0.8  # running statistics kept, but unused in training mode
    g.param("mean", [c], "mean", value=mean, force=stats)
    g.param("var", [c], "var", value=var, force=stats)
    if not training and (g.t("mean") is None) != (g.t("var") is None):
        raise _Invalid("batch_norm with one of mean/var")
    g.param("weight", [c], "gain")
    g.param("bias", [c], "bias")


def _norm_shape(g: _OpGen, x: torch.Tensor):
    rng = g.rng

    def choose():
        r = rng.random()
        if r < 0.2:
            return None
        if r < 0.5 and x.dim() >= 3:
            return tuple(x.shape[-2:])
        return tuple(x.shape[-1:])
    ns = g.attr("normalized_shape", choose)
    return list(ns) if ns is not None else list(x.shape[-1:])


def _gen_layer_norm(g: _OpGen):
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(2, 3))
    shape = _norm_shape(g, x)
    g.attr("eps", lambda: _eps(g))
    g.param("weight", shape, "gain")
    g.param("bias", shape, "bias")


def _gen_rms_norm(g: _OpGen):
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(2, 3))
    shape = _norm_shape(g, x)
    g.attr("eps", lambda: g.rng.choice((None,) + EPS_CHOICES))
    g.param("weight", shape, "gain")


def _gen_group_norm(g: _OpGen):
    rng, b = g.rng, g.b
    x = g.t("x")
    if x is None:
        shape = [rng.choice((1, 2)), b.dim()] + [rng.randint(1, 5) for _ in range(rng.choice((0, 1, 2)))]
        x = g.act("x", shape)
    c = x.shape[1]
    groups = g.attr("groups", lambda: rng.choice(_divisors(c)))
    if not isinstance(groups, int) or groups < 1 or c % groups:
        raise _Invalid(f"group_norm groups {groups} does not divide {c}")
    g.attr("eps", lambda: _eps(g))
    g.param("weight", [c], "gain")
    g.param("bias", [c], "bias")


def _gen_fixed_norm(g: _OpGen):
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(2, 4))
    dim = g.attr("dim", lambda: -1 if g.rng.random() < 0.7 else 1)
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise _Invalid(f"fixed_norm dim {dim} for rank {x.dim()}")
    c = x.shape[dim]
    g.param("scale", [c], "gain")
    g.param("shift", [c], "bias")


def _gen_norm_act(g: _OpGen):
    rng = g.rng
    norm = g.attr("norm", lambda: rng.choice(("layer_norm", "rms_norm", "group_norm", "batch_norm")))
    act = g.attr("activation", lambda: rng.choice(("relu", "gelu", "silu", "tanh", "sigmoid")))
    g.attr("approximate", lambda: rng.choice(("none", "tanh")) if act == "gelu" else "none")
    if norm in ("layer_norm", "rms_norm"):
        x = g.t("x")
        if x is None:
            x = g.act("x", g.b.act_shape(2, 3))
        shape = _norm_shape(g, x)
        g.attr("eps", lambda: _eps(g))
        g.param("weight", shape, "gain")
        g.param("bias", shape, "bias", force=False if norm == "rms_norm" else None)
    elif norm == "group_norm":
        _gen_group_norm(g)
    elif norm == "batch_norm":
        x = g.t("x")
        if x is None:
            x = g.act("x", [rng.choice((2, 3)), g.b.dim()] + [rng.randint(1, 5) for _ in range(rng.choice((0, 1, 2)))])
        if x.dim() < 2:
            raise _Invalid("norm_act batch_norm input has no channel dim")
        c = x.shape[1]
        mean, var = _channel_stats(x)
        g.param("mean", [c], "mean", value=mean + g.b._randn([c]) * 0.1, force=True)
        g.param("var", [c], "var", value=var * (g.b._rand([c]) + 0.5) + 1e-3 * g.b.act_scale ** 2, force=True)
        g.attr("eps", lambda: _eps(g))
        g.param("weight", [c], "gain")
        g.param("bias", [c], "bias")
    else:
        raise _Invalid(f"norm_act over {norm} is not generated")
    if norm != "batch_norm":
        g.param("mean", [1], force=False)
        g.param("var", [1], force=False)


def _gen_embedding(g: _OpGen):
    rng, b = g.rng, g.b
    table = g.t("table")
    v = table.shape[0] if table is not None else rng.randint(3, 12)
    d = table.shape[1] if table is not None else b.dim()
    g.act("ids", b.batch(), ints=v)
    g.param("table", [v, d], "any")
    g.attr("padding_idx", lambda: None if rng.random() < 0.7 else rng.randrange(v))


def _gen_binary(g: _OpGen):
    a, c = g.t("a"), g.t("b")
    nonzero = g.schema.name == "div"
    hints = g.b.hints
    a_var = g._var("a")
    if g.is_free("a") and g.is_free("b") and a_var and (hints.param.get(a_var) or hints.rank.get(a_var) == 0):
        # the guard wants the first operand to be a parameter or a number (`1 + w`): no activation here
        g.other("a", [g.b.C])
        g.other("b", [g.b.C], nonzero)
    elif g.is_free("a") and g.is_free("b"):
        a = g.act("a", g.b.act_shape(2, 3))
        g.other("b", a.shape, nonzero)
    elif g.is_free("b"):
        like = a.shape if a is not None else []
        g.other("b", like, nonzero)
    elif g.is_free("a"):
        like = c.shape if c is not None else []
        g.other("a", like)


def _gen_matmul(g: _OpGen):
    rng, b = g.rng, g.b
    a, w = g.t("a"), g.t("b")
    if a is None:
        k = w.shape[-2] if w is not None and w.dim() >= 2 else b.dim()
        a = g.act("a", b.batch() + [k])
    if g.is_free("b"):
        k = a.shape[-1]
        n = b.out_dim(k)
        var = g._var("b")
        want = b.hints.param.get(var) if var else None
        if want is True or (want is None and rng.random() < 0.5):
            g.param("b", [k, n], "weight")
        else:
            g.act("b", [k, n])


def _gen_unary(g: _OpGen):
    positive = g.schema.name == "inv_sqrt"
    if g.is_free("x"):
        g.act("x", g.b.act_shape(2, 3), positive=positive)
    for a in g.schema.attrs:
        if a == "approximate":
            g.attr(a, lambda: g.rng.choice(("none", "tanh")))


def _gen_softmax(g: _OpGen):
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(2, 3))
    g.attr("dim", lambda: -1 if g.rng.random() < 0.6 else g.rng.randrange(-x.dim(), x.dim()))


def _gen_reduce_mean(g: _OpGen):
    rng = g.rng
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(2, 4))
    r = x.dim()

    def dims():
        p = rng.random()
        if p < 0.5 or r == 1:
            return [-1]
        if p < 0.75:
            return [rng.choice([d for d in range(-r, r) if d not in (-1, r - 1)])]
        if p < 0.85:
            return [r - 1]
        return [-2, -1] if r >= 2 else [-1]
    g.attr("dim", dims)
    g.attr("keepdim", lambda: rng.random() < 0.7)


def _gen_power(g: _OpGen):
    if g.is_free("x"):
        g.act("x", g.b.act_shape(2, 3))
    g.attr("exponent", lambda: g.rng.choice((2, 2, 2, 3, 1, 0.5)))


def _gen_cast(g: _OpGen):
    if g.is_free("x"):
        g.act("x", g.b.act_shape(2, 3))
    g.attr("dtype", lambda: None)


def _gen_crms_norm(g: _OpGen):
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(2, 3))
    g.attr("eps", lambda: _eps(g))
    expand = g.attr("expand", lambda: g.rng.random() < 0.75)
    d = x.shape[-1] + 1
    g.param("weight", [d], "gain", force=None if expand else False)
    g.param("bias", [d], "bias", force=None if expand else False)


def _gen_generic(g: _OpGen):
    """An op without a generator of its own: an activation input, per-channel (last dim) parameters."""
    x = g.t("x")
    first = g.schema.operands[0].name
    if g.is_free(first):
        x = g.act(first, g.b.act_shape(2, 3))
    else:
        x = g.t(first)
    for o in g.schema.operands[1:]:
        if o.param and x is not None:
            g.param(o.name, list(x.shape[-1:]))
        elif x is not None:
            g.other(o.name, x.shape)


def _gen_getitem(g: _OpGen):
    rng = g.rng
    x = g.t("x")
    if x is None:
        x = g.act("x", g.b.act_shape(3, 4))
    r, full = x.dim(), slice(None)

    def index():
        choices = [
            (full, 0), (full, -1), (full, slice(0, 2)), (0,), (Ellipsis, 0), (Ellipsis, full),
            (full,) * (r - 1) + (slice(1, None),), (full,) * r + (None,), (None, Ellipsis), (slice(None, None, 2),),
            (Ellipsis, slice(0, 1)), 0,
        ]
        return rng.choice(choices)
    g.attr("index", index)


UNARY_OPS = {"relu", "gelu", "silu", "tanh", "sigmoid", "inv_sqrt"}  # _gen_unary covers these

_GENERATORS = {
    "getitem": _gen_getitem, "crms_norm": _gen_crms_norm,
    "linear": _gen_linear, "conv": _gen_conv, "conv_transpose": _gen_conv_transpose, "batch_norm": _gen_batch_norm, "layer_norm": _gen_layer_norm,
    "rms_norm": _gen_rms_norm, "group_norm": _gen_group_norm, "fixed_norm": _gen_fixed_norm,
    "norm_act": _gen_norm_act, "embedding": _gen_embedding,
    "add": _gen_binary, "sub": _gen_binary, "mul": _gen_binary, "div": _gen_binary, "matmul": _gen_matmul,
    "softmax": _gen_softmax, "reduce_mean": _gen_reduce_mean, "power": _gen_power, "cast": _gen_cast,
}


# ============================================================================ judging
def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _cast_inputs(inputs, dtype):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, float64; inf when the shapes differ or got is non-finite where ref is not."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
        return math.inf
    a, b = ref.detach().to(torch.float64), got.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(b).all():
        return math.inf
    scale = float(a.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else err


def _rounding_floor(gm: fx.GraphModule, inputs, dtype: torch.dtype, ref: list, runs: int = 2) -> float:
    """How much the original pattern's output moves when every value it computes (inputs, parameters,
    every intermediate) is perturbed by one rounding error of `dtype`: relative perturbations of size
    eps(dtype), evaluated in float64. The error any implementation that rounds to `dtype` may make;
    large where the pattern cancels (`c - mean` with |c| >> |y|), small for scale-invariant norms."""
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    for _ in range(runs):
        out = _evaluate(gm, inputs, torch.float64, perturb=(eps, gen))
        worst = max(worst, max((_rel_err(r, o) for r, o in zip(ref, out)), default=0.0))
    return worst


def _pretty_code(gm: fx.GraphModule) -> str:
    lines = []
    for line in gm.code.strip().splitlines():
        line = re.sub(r";\s+[\w, =]*= None$", "", line)
        line = line.replace("normc_ir_ops_", "")
        if line.strip():
            lines.append("    " + line.strip())
    return "\n".join(lines)


@dataclass
class _Instance:
    index: int
    profile: str
    gm: fx.GraphModule
    inputs: tuple
    outputs64: list
    text: str = ""

    def describe(self) -> str:
        ins = ", ".join(f"{n.target}: {_dtype_name(t.dtype)}{list(t.shape)}"
                        for n, t in zip([n for n in self.gm.graph.nodes if n.op == "placeholder"], self.inputs))
        params = ", ".join(f"{name}: {list(p.shape)}" for name, p in self.gm.named_parameters())
        return (f"instance {self.index} (profile {self.profile}); inputs {ins or 'none'}; "
                f"parameters {params or 'none'}\n  pattern:\n{_pretty_code(self.gm)}")


@dataclass
class _DtypeOutcome:
    status: str        # ok | fail | skip | refused | crash
    err_new: float = 0.0
    err_orig: float = 0.0
    detail: str = ""
    rewritten: str = ""
    hard: bool = False  # a crash, a graph that does not run, a changed shape, non-finite values
    conditioned: bool = True  # the original is accurate in this dtype (counts toward the reported max error)


def _evaluate(gm: fx.GraphModule, inputs, dtype: torch.dtype | None = None, record: dict | None = None,
              stats: Statistics | None = None, perturb: tuple | None = None) -> list:
    """Run a small canonical graph node by node without compiling it; parameters and floating inputs
    cast to `dtype` when given; every floating tensor value recorded by node name in `record` and
    observed by `stats` (the calibration statistics of this run)."""
    env: dict = {}
    feed = iter(inputs)
    cast = (lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) \
        if dtype is not None else (lambda t: t)
    lookup = env.__getitem__
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                v = cast(next(feed))
            elif n.op == "get_attr":
                v = cast(get_param(gm, n))
            elif n.op == "call_function":
                v = n.target(*fx.node.map_arg(n.args, lookup), **fx.node.map_arg(n.kwargs, lookup))
            elif n.op == "output":
                return _outputs(fx.node.map_arg(n.args[0], lookup))
            else:
                raise _Invalid(f"unexpected node {n.op}")
            if perturb is not None and isinstance(v, torch.Tensor) and v.is_floating_point():
                eps, gen = perturb
                v = v * (1 + eps * (torch.rand(v.shape, generator=gen, dtype=v.dtype) * 2 - 1))
            env[n] = v
            if record is not None and isinstance(v, torch.Tensor) and v.is_floating_point():
                record[n.name] = v
            if stats is not None and not (isinstance(v, torch.Tensor) and v.numel() == 0):
                stats.observe(n, v)  # (Statistics.observe cannot take an empty tensor)
    raise _Invalid("graph without output")


def _refusal(report) -> str:
    if report.skipped:
        return report.skipped[0].reason
    if report.near_misses:
        return f"pattern did not match the generated instance: {report.near_misses[0].reason}"
    return "pattern did not match the generated instance"


def _crash(e: Exception) -> str:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _accepts(rule: T.Rule, inst: _Instance, params: dict) -> _DtypeOutcome | None:
    """Dry run on the fp64 instance itself (no copy): None when the rule rewrites it, else the outcome."""
    stats = Statistics()
    _evaluate(inst.gm, inst.inputs, stats=stats)
    annotate_shapes(inst.gm, inst.inputs, {})
    try:
        report = apply_rule(inst.gm, rule, params, None, EvalContext(inst.gm, stats), dry_run=True,
                            max_sweeps=MAX_SWEEPS)
    except Exception as e:  # noqa: BLE001 - any crash of the rewrite on a valid instance is a finding
        return _DtypeOutcome("crash", math.inf, hard=True, detail=f"applying the rule raised {_crash(e)}")
    return None if report.applied else _DtypeOutcome("refused", detail=_refusal(report))


def _run_instance(rule: T.Rule, inst: _Instance, dtype: torch.dtype, params: dict,
                  in_place: bool = False) -> _DtypeOutcome:
    """Judge one instance in one dtype (see the module docstring). `in_place`: rewrite inst.gm itself (last use)."""
    gm = inst.gm if in_place else copy.deepcopy(inst.gm)
    if dtype != torch.float64:
        gm = gm.to(dtype)
    inputs = _cast_inputs(inst.inputs, dtype)
    if not all(torch.isfinite(t).all() for t in list(gm.parameters()) + [i for i in inputs if i.is_floating_point()]):
        return _DtypeOutcome("skip", detail=f"the instance's values overflow {_dtype_name(dtype)}")
    stats = Statistics()
    orig = _evaluate(gm, inputs, stats=stats)
    ref = orig if dtype == torch.float64 else _evaluate(gm, inputs, torch.float64)
    if not all(torch.isfinite(r).all() for r in ref) or not all(torch.isfinite(o).all() for o in orig):
        return _DtypeOutcome("skip", detail="the original pattern is not finite in this dtype")
    tol = TOLERANCE.get(_dtype_name(dtype), 1e-5)
    floor = _rounding_floor(gm, inputs, dtype, ref)
    err_orig = max((_rel_err(r, o) for r, o in zip(ref, orig)), default=0.0)
    annotate_shapes(gm, inputs, {})
    ctx = EvalContext(gm, stats)
    try:
        report = apply_rule(gm, rule, params, None, ctx, max_sweeps=MAX_SWEEPS)
    except Exception as e:  # noqa: BLE001
        return _DtypeOutcome("crash", math.inf, hard=True, detail=f"applying the rule raised {_crash(e)}")
    if report.applied == 0:
        return _DtypeOutcome("refused", detail=_refusal(report))
    rewritten = _pretty_code(gm)
    try:
        new = _evaluate(gm, inputs)
    except Exception as e:  # noqa: BLE001
        return _DtypeOutcome("fail", math.inf, err_orig, hard=True,
                             detail=f"the rewritten graph does not run: {_crash(e)}", rewritten=rewritten)
    if len(new) != len(ref):
        return _DtypeOutcome("fail", math.inf, err_orig, hard=True, detail=f"{len(ref)} outputs became {len(new)}",
                             rewritten=rewritten)
    err_new = max((_rel_err(r, n) for r, n in zip(ref, new)), default=0.0)
    ok = err_new <= tol + SLACK * max(err_orig, floor)
    shapes_same = all(isinstance(n, torch.Tensor) and n.shape == r.shape for r, n in zip(ref, new))
    hard = not shapes_same or not math.isfinite(err_new)
    if ok:
        detail = ""
    elif not shapes_same:
        detail = "an output changed shape: " + ", ".join(
            f"{list(r.shape)} -> {list(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__}"
            for r, n in zip(ref, new))
    else:
        detail = (f"max rel err {err_new:.3g} > {tol:g} + {SLACK:g} x max({err_orig:.3g}, {floor:.3g}) "
                  f"(tolerance + slack x max(the original's own {_dtype_name(dtype)} error, its rounding floor))")
    out = _DtypeOutcome("ok" if ok else "fail", err_new, err_orig, detail, rewritten, hard)
    out.conditioned = err_orig <= tol and floor <= tol
    return out


def _rule_params(rule: T.Rule, params: dict | None) -> dict:
    values = bind_params(rule, params or {})
    for p in rule.params:
        if values.get(p.name) is None:
            values[p.name] = {"float": 0.5, "int": 1, "bool": False}.get(p.type, "")
    return values


# ============================================================================ entry points
@contextlib.contextmanager
def _one_thread():
    """Instances are tiny: intra-op threads only cost (tens of ms per op on a busy 2-core machine).
    torch's warnings about the random instances (padding="same" with even kernels) are not the user's."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(n)


def prove_rule(rule, *, instances: int = 16, dtypes=DEFAULT_DTYPES, seed: int = 0,
               params: dict | None = None, max_tries: int | None = None) -> ProveResult:
    """Check `rule` on `instances` accepted random instances of its pattern (see the module docstring).

    `dtypes`: the dtypes judged (float64 is always among them); `seed`: instances are a pure function
    of (seed, rule name); `params`: the rule's parameters (defaults otherwise); `max_tries`: instances
    generated at most (default 10 x `instances`). A `T.ExternPass` is not proved (verdict "global")."""
    with _one_thread():
        return _prove_rule(rule, instances=instances, dtypes=dtypes, seed=seed, params=params, max_tries=max_tries)


_LOCATION_GUARDS = {"glob", "path", "module_type"}


def _without_location_guards(rule):
    """A copy of `rule` whose `where` drops conjuncts about *where* it applies (module paths and
    types): prove checks the mathematics, and a random instance has no module path."""
    if getattr(rule, "where", None) is None:
        return rule

    def about_location(e):
        if isinstance(e, T.Unary) and e.op == "not":
            return about_location(e.operand)
        if isinstance(e, T.Call):
            return e.func in _LOCATION_GUARDS or any(about_location(a) for a in e.args)
        if isinstance(e, T.Binary):
            return about_location(e.left) or about_location(e.right)
        return False

    kept = [c for c in conjuncts(rule.where) if not about_location(c)]
    if len(kept) == len(conjuncts(rule.where)):
        return rule
    where = None
    for c in kept:
        where = c if where is None else T.Binary("and", where, c, c.loc)
    return dataclasses.replace(rule, where=where)


def _prove_rule(rule, *, instances, dtypes, seed, params, max_tries) -> ProveResult:
    t0 = time.perf_counter()
    rule = _without_location_guards(rule)
    name = getattr(rule, "qualname", "") or rule.name
    kind = getattr(rule, "kind", "exact")
    tols = {_dtype_name(d): TOLERANCE.get(_dtype_name(d), 1e-5) for d in dtypes}
    if isinstance(rule, T.ExternPass):
        return ProveResult(name, 0, 0, {}, tols, "global", "global pass: checked on models", None, kind,
                           time.perf_counter() - t0)
    dtypes = [torch.float64] + [d for d in dtypes if d != torch.float64]  # fp64, always: the mathematics
    tols = {_dtype_name(d): TOLERANCE.get(_dtype_name(d), 1e-5) for d in dtypes}
    max_tries = max_tries or max(40, instances * 10)
    rng = random.Random(f"normc-prove/{seed}/{name}")
    hints = _hints(rule)
    args = _rule_params(rule, params)
    worst = {_dtype_name(d): 0.0 for d in dtypes}
    judged = Counter()
    misses: Counter = Counter()
    tries = applied = 0
    failure: tuple | None = None  # (dtype, outcome, instance)
    while applied < instances and tries < max_tries:
        if failure is not None:
            break
        if tries >= 40 and applied == 0 and sum(misses.values()) >= 40:
            break
        index = tries
        tries += 1
        profile = "normal" if index < 2 else PROFILES[index % len(PROFILES)]
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        builder = _Builder(rule, rng, gen, profile, hints)
        try:
            gm, inputs, outs = builder.build()
        except _Invalid as e:
            misses[f"no valid instance: {e}"] += 1
            continue
        if not all(torch.isfinite(o).all() for o in outs):
            misses["no valid instance: the pattern's output is not finite"] += 1
            continue
        inst = _Instance(index, profile, gm, inputs, outs)
        inst.text = inst.describe()  # before the fp64 run rewrites inst.gm in place
        pre = _accepts(rule, inst, args)
        if pre is not None and pre.status == "refused":
            misses[pre.detail] += 1
            continue
        applied += 1
        if pre is not None:  # the rewrite crashed
            failure = (torch.float64, pre, inst)
            worst["float64"], judged["float64"] = math.inf, judged["float64"] + 1
            break
        outcomes = {}
        for dt in dtypes[1:] + dtypes[:1]:  # copies first; fp64 last, rewriting inst.gm itself
            outcomes[dt] = _run_instance(rule, inst, dt, args, in_place=dt == torch.float64)
        for dt in dtypes:
            outcome, dn = outcomes[dt], _dtype_name(dt)
            if outcome.status in ("refused", "skip"):
                continue
            judged[dn] += 1
            err = outcome.err_new if not math.isnan(outcome.err_new) else math.inf
            if outcome.conditioned or outcome.status != "ok":
                worst[dn] = max(worst[dn], err)
            if outcome.status in ("fail", "crash") and (kind == "exact" or outcome.hard) and failure is None:
                failure = (dt, outcome, inst)
    max_err = {k: v for k, v in worst.items() if judged[k]}
    seconds = time.perf_counter() - t0
    res = ProveResult(name, tries, applied, max_err, tols, "sound", "", None, kind, seconds)
    if failure is not None:
        dt, outcome, inst = failure
        res.verdict = "unsound"
        res.reason = f"{_dtype_name(dt)}: {outcome.detail}"
        res.counterexample = (f"{_dtype_name(dt)} ({prove_hint(name, seed)}), {inst.text}"
                              + (f"\n  rewritten:\n{outcome.rewritten}" if outcome.rewritten else ""))
        return res
    if applied == 0:
        res.verdict = "untestable"
        top = misses.most_common(1)
        res.reason = (f"no instance accepted in {tries} tries; most often: {top[0][0]} ({top[0][1]}x)"
                      if top else f"no instance accepted in {tries} tries")
        return res
    if kind == "approximate":
        res.verdict = "approximate"
        res.reason = "approximate rule: measured error reported, not judged"
    elif kind == "structural":
        res.verdict = "structural"
        res.reason = "structural rule: shapes checked only"
    else:
        res.reason = f"{applied} instance(s) rewritten, all within tolerance"
    return res


def prove_hint(name: str, seed: int) -> str:
    return f"reproduce: prove_rule(<{name}>, seed={seed})"


def prove_program(program, rule_names=None, **kwargs) -> list[ProveResult]:
    """Prove the named rules (rules or groups such as `std.bn`), or every rule of the program."""
    if rule_names is None:
        names = list(program.rules)
    else:
        names = []
        for n in rule_names:
            found = program.resolve(n)
            if not found:
                raise KeyError(f"unknown rule `{n}`")
            names.extend(x for x in found if x not in names)
    return [prove_rule(program.rules[n], **kwargs) for n in names]


def format_table(results: list[ProveResult]) -> str:
    """A plain text table: rule, kind, instances (applied/tried), max relative error per dtype, verdict."""
    dts = []
    for r in results:
        for d in list(r.tolerance_by_dtype) + list(r.max_err_by_dtype):
            if d not in dts:
                dts.append(d)
    head = ["rule", "kind", "applied/tried"] + [f"{d} max rel" for d in dts] + ["verdict"]
    rows = []
    for r in results:
        errs = []
        for d in dts:
            if d in r.max_err_by_dtype:
                e = r.max_err_by_dtype[d]
                errs.append(f"{e:.2e}" if math.isfinite(e) else str(e))
            else:
                errs.append("-")
        rows.append([r.name, r.kind, f"{r.applied}/{r.instances}"] + errs + [r.verdict])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    notes = [f"  {r.name}: {r.reason}" for r in results if r.verdict not in ("sound",)]
    if notes:
        lines += ["", "notes:"] + notes
    return "\n".join(lines)
