"""Evaluate language expressions against a match: guards on the graph, values on real tensors (float64)."""
from __future__ import annotations

import operator
import re

import torch

from ..grammar import syntax_tree as T
from .builtins import BUILTINS, CONSTANTS, EvalContext, Guard, NodeRef, RefuseSite


def source_text(expr, source: str | None) -> str:
    loc = getattr(expr, "loc", None)
    if not source or loc is None or loc.line == 0:
        return "condition"
    lines = source.splitlines()
    if loc.end_line == loc.line:
        return lines[loc.line - 1][loc.column - 1: loc.end_column - 1]
    return lines[loc.line - 1][loc.column - 1:] + " ..."


_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "**": operator.pow}


def _huge_power(a, b) -> bool:
    """int ** int is exact in Python: 2 ** 2 ** 62 would run out of memory, so refuse past 4096 bits."""
    if type(a) is not int or type(b) is not int or b <= 0 or abs(a) <= 1:
        return False
    return b * abs(a).bit_length() > 4096


FANOUT_REDUCTION = re.compile(r"(max|min|sum|mean)_([A-Za-z_][A-Za-z0-9_]*)")


class Evaluator:
    def __init__(self, ctx: EvalContext, env: dict, each: dict | None = None):
        self.ctx = ctx
        self.env = env  # name -> NodeRef | None | python value | tensor
        self.each = each or {}  # fan-out var -> list of per-user envs (for max_u(...) reductions)

    # -------------------------------------------------------------- values
    def eval(self, e):
        # the most frequent node kinds first: this runs for every expression node of every site
        if isinstance(e, T.Name):
            if e.id in self.env:
                return self.env[e.id]
            if e.id in CONSTANTS:
                return e.id  # dtype names compare as strings: dtype(w) == f32
            raise RefuseSite(f"`{e.id}` is not bound")  # the checker prevents this
        if isinstance(e, T.Binary):
            return self._binary(e)
        if isinstance(e, T.Call):
            return self._call(e)
        if isinstance(e, (T.Num, T.Str, T.Const)):
            return e.value
        if isinstance(e, T.ListLit):
            return [self.eval(i) for i in e.items]
        if isinstance(e, T.Unary):
            if e.op == "not":
                v = self.eval(e.operand)
                if isinstance(v, Guard):
                    return Guard(not v.value, why_false=v.why_true, why_true=v.why_false)
                return not self._truth(v)
            return -self._num(self.eval(e.operand))
        if isinstance(e, T.Index):
            return self._index(e)
        raise TypeError(f"cannot evaluate {type(e).__name__}")

    def _num(self, v):
        if isinstance(v, NodeRef):
            return self.ctx.tensor(v)
        if isinstance(v, Guard):
            return v.value
        return v

    @staticmethod
    def _truth(v):
        if isinstance(v, torch.Tensor):
            return bool(v.all())
        return bool(v)

    def _binary(self, e):
        op = e.op
        if op == "and":
            left = self.eval(e.left)
            return left if not self._truth(left) else self.eval(e.right)
        if op == "or":
            left = self.eval(e.left)
            return left if self._truth(left) else self.eval(e.right)
        if op == "??":
            left = self.eval(e.left)
            return self.eval(e.right) if left is None else left
        a, b = self._num(self.eval(e.left)), self._num(self.eval(e.right))
        if a is None or b is None:
            raise RefuseSite(f"an absent optional operand is used in `{op}` (write `x ?? 0` to give it a value)")
        if op in ("==", "!="):
            eq = bool((a == b).all()) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b
            if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
                eq = list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else False
            return eq if op == "==" else not eq
        if op in ("<", "<=", ">", ">="):
            r = {"<": lambda: a < b, "<=": lambda: a <= b, ">": lambda: a > b, ">=": lambda: a >= b}[op]()
            return bool(r.all()) if isinstance(r, torch.Tensor) else r
        if op == "**" and _huge_power(a, b):
            raise RefuseSite("`**` of integers gives a number too large to compute")
        fn = _ARITH.get(op)
        if fn is None:
            raise TypeError(op)
        try:
            r = fn(a, b)
        except ZeroDivisionError:
            raise RefuseSite(f"division by zero in `{op}`") from None
        except (OverflowError, ArithmeticError) as err:  # plain Python numbers: 10.0 ** 400
            raise RefuseSite(f"`{op}` failed: {err.args[-1] if err.args else type(err).__name__}") from None
        if isinstance(r, complex):  # (-1) ** 0.5 on plain numbers
            raise RefuseSite(f"`{op}` has no real result here (a negative number to a fractional power)")
        return r

    def _call(self, e: T.Call):
        red = FANOUT_REDUCTION.fullmatch(e.func) if self.each else None  # max_u(...) needs a fan-out
        if red and red.group(2) in self.each and e.func not in BUILTINS:
            return self._reduce_fanout(red.group(1), self.each[red.group(2)], e.args[0])
        fn = BUILTINS[e.func]
        args = [self.eval(a) for a in e.args]
        kwargs = {k: self.eval(v) for k, v in e.kwargs}
        return fn.fn(self.ctx, *args, **kwargs)

    def _reduce_fanout(self, how: str, envs: list, arg):
        """max_u(expr): expr evaluated for every user of a fan-out, reduced elementwise."""
        values = []
        for local in envs:
            env = dict(self.env)
            env.update(local)
            values.append(self._num(Evaluator(self.ctx, env, self.each).eval(arg)))
        stacked = torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
                               for v in values])
        return {"max": stacked.amax(0), "min": stacked.amin(0), "sum": stacked.sum(0), "mean": stacked.mean(0)}[how]

    def _index(self, e: T.Index):
        value = self._num(self.eval(e.value))
        items = []
        for it in e.items:
            if isinstance(it, T.Slice):
                items.append(slice(*(None if p is None else int(self._num(self.eval(p))) for p in (it.start, it.stop, it.step))))
            elif isinstance(it, T.Ellipsis_):
                items.append(Ellipsis)
            elif isinstance(it, T.Const) and it.value is None:
                items.append(None)
            else:
                items.append(int(self._num(self.eval(it))))
        if isinstance(value, (list, tuple)):
            return value[items[0]] if len(items) == 1 else [value[i] for i in items]
        return value[tuple(items)]

    # -------------------------------------------------------------- guards
    def check(self, where, source: str | None) -> str | None:
        """None when the guard holds, else the reason (of the first failing conjunct)."""
        for conjunct in conjuncts(where):
            value = self.eval(conjunct)
            if not self._truth(value):
                if isinstance(value, Guard) and value.why_false:
                    return value.why_false
                return f"`{source_text(conjunct, source)}` is false"
        return None


def conjuncts(e):
    if isinstance(e, T.Binary) and e.op == "and":
        return conjuncts(e.left) + conjuncts(e.right)
    return [e]
