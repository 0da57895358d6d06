"""Which linears a `quantize` step selects and how each is quantized: the plan.

The plan is the one source of truth: the torch simulation (`simulate.py`) and the onnxruntime QDQ
export (`ort.py`) both read it, so they quantize the same linears the same way.

Selection runs on the canonical graph:
  * `default:` every linear (sites named by module path, as `quant_sim.linear_sites` names them);
  * `on "glob"`: the linears whose module path matches the glob (fnmatch);
  * `match linear(...) where guard`: the linears at which the pattern matches and the guard holds
    (normc's own matcher and evaluator, so `gelu(x)`, `single_use(x)`, `module_type(...)` mean what
    they mean in rules).
Entries apply in file order; a later entry's words override an earlier one's for the linears both
select. An entry that selects nothing is reported (with the nearest linear name for a glob).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import fx

from ..backends.cpu_features import CpuFeatures, cpu_features
from ..grammar import syntax_tree as T
from ..grammar.diagnostics import nearest
from ..ir.builtins import EvalContext
from ..ir.evaluate import Evaluator
from ..ir.match import Pattern
from ..verify.quant_sim import _const, linear_sites
from .settings import Scheme, default_scheme, entry_scheme


@dataclass
class LinearPlan:
    name: str                       # module path (`#2` for a second site of the same module)
    node: fx.Node                   # the canonical linear node in the planned graph
    scheme: Scheme
    set_by: list[str]               # the entries that chose the scheme ("default", 'on "*.dense" (line 4)')
    weight: torch.Tensor            # [out, in], the graph's own tensor (not copied)
    bias: torch.Tensor | None

    def reduce_range(self, cpu: CpuFeatures) -> bool:
        return self.scheme.reduce_range(cpu.u8s8_saturates)


@dataclass
class QuantPlan:
    precision: str
    linears: list[LinearPlan]
    cpu: CpuFeatures
    warnings: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, LinearPlan]:
        return {lp.name: lp for lp in self.linears}

    @property
    def quantized(self) -> list[LinearPlan]:
        return [lp for lp in self.linears if lp.scheme.quantized]

    def summary(self) -> dict[str, int]:
        """{scheme description: how many linears}."""
        out: dict[str, int] = {}
        for lp in self.linears:
            d = lp.scheme.describe()
            out[d] = out.get(d, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"precision": self.precision, "cpu": self.cpu.to_dict(), "cpu_verdict": self.cpu.describe(),
                "schemes": self.summary(), "warnings": list(self.warnings),
                "linears": [{"name": lp.name, "scheme": lp.scheme.describe(), "set_by": lp.set_by,
                             "reduce_range": lp.reduce_range(self.cpu) if lp.scheme.quantized else None}
                            for lp in self.linears]}


def _weight_bias(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        lin = gm.get_submodule(node.target)
        return lin.weight, lin.bias
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight", node.kwargs.get("w"))
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias", node.kwargs.get("b"))
    return _const(gm, w), _const(gm, b)


def _where(entry: T.QuantEntry) -> str:
    if entry.kind == "match":
        head = f"match {entry.pattern.op}(...)"
    else:
        head = f'on "{entry.glob}"' if entry.kind == "on" else "default"
    return f"{head} (line {entry.loc.line})"


def select(gm: fx.GraphModule, entry: T.QuantEntry, names: dict[fx.Node, str], ctx: EvalContext,
           source: str | None = None) -> set[fx.Node]:
    """The linear nodes an `on` or `match` entry selects."""
    if entry.kind == "default":
        return set(names)
    if entry.kind == "on":
        return {n for n, name in names.items()
                if fnmatch.fnmatchcase(name, entry.glob) or fnmatch.fnmatchcase(name.split("#")[0], entry.glob)}
    rule = T.Rule("quantize_entry", [], "", "structural", [T.MatchStmt("_q", entry.pattern, entry.loc)],
                  entry.where, [], [], entry.loc)
    pattern = Pattern(rule)
    chosen = set()
    for node in names:
        if not pattern.is_candidate(node):
            continue
        for m in pattern.matches(gm, node):
            if entry.where is None or Evaluator(ctx, dict(m.env)).check(entry.where, source) is None:
                chosen.add(node)
                break
    return chosen


def make_plan(gm: fx.GraphModule, step: T.Quantize, stats=None, cpu: CpuFeatures | None = None,
              source: str | None = None) -> QuantPlan:
    """Resolve a checked `quantize` step on `gm`: one LinearPlan per linear, in graph order."""
    cpu = cpu or cpu_features()
    sites = linear_sites(gm)
    names = {s.node: s.name for s in sites if s.node is not None}
    base = default_scheme(step)
    schemes = {n: base for n in names}
    set_by = {n: ["default" if any(e.kind == "default" for e in step.entries) else "defaults for this CPU"]
              for n in names}
    ctx = EvalContext(gm, stats)
    warnings = []
    for entry in step.entries:
        if entry.kind == "default":
            continue
        chosen = select(gm, entry, names, ctx, source)
        if not chosen:
            hint = ""
            if entry.kind == "on":
                near = nearest(entry.glob, list(names.values()))
                hint = f"; did you mean `{near}`?" if near else ""
            warnings.append(f"`{_where(entry)}` selects no linear{hint}")
        for n in chosen:
            schemes[n] = entry_scheme(schemes[n], entry)
            set_by[n].append(_where(entry))
    linears = []
    for node, name in names.items():
        w, b = _weight_bias(gm, node)
        linears.append(LinearPlan(name, node, schemes[node], set_by[node], w, b))
    return QuantPlan(step.precision, linears, cpu, warnings)


__all__ = ["LinearPlan", "QuantPlan", "make_plan", "select"]
