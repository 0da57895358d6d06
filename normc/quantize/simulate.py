"""The plan simulated in torch, computing what onnxruntime computes.

onnxruntime's static QDQ quantization (quant_utils.compute_scale_zp, quantize_data, the bias
quantizer), which this module reproduces number for number:

* activations, static uint8 asymmetric (the x86 default): the calibrated range is widened to hold
  0, ``rmin = min(min, 0)``, ``rmax = max(max, 0)``; ``scale = (rmax - rmin) / 255`` (float64, stored
  as float32), ``zero_point = round(-rmin / scale)``; at run time ``q = clamp(round(x / scale) + zp,
  0, 255)`` (round half to even). Symmetric: ``[-a, a]`` with zp 128 (uint8) or 0 (int8, codes
  [-127, 127]). ``reduce_range`` never narrows activations;
* weights, int8 symmetric per output channel: ``scale = 2 absmax / (qmax - qmin)`` with
  ``[qmin, qmax] = [-127, 127]``, or ``[-64, 64]`` under ``reduce_range`` (7-bit weights, which
  onnxruntime needs on x86 without VNNI, where U8S8 int16 sums saturate: see
  backends/cpu_features.py);
* the bias of a quantized Gemm becomes int32 with scale ``s_x * s_w`` (per channel).

The integer kernels then compute exactly ``sum (q_x - zp) q_w`` in int32 and rescale: the float
simulation below differs only by float32 summation order (~1e-7). U8S8 saturation itself is not
simulated: the default scheme avoids it (reduce_range where the CPU saturates), and a plan that
forces `full_range` on such a CPU is flagged by the report.

Remedies simulated with the same arithmetic as their onnxruntime lowering (ort.py): per-token (or
per-tensor) dynamic ranges computed at run time, a separate static range for the first N positions,
weight-only (activations fp32) and keep fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..backends.cpu_features import CpuFeatures
from ..errors import NormcError
from ..ir.graph import run_recording
from .plan import LinearPlan, QuantPlan
from .settings import Scheme

Inputs = list[tuple[tuple, dict]]
_TINY = float(torch.finfo(torch.float32).tiny)


# --------------------------------------------------------------------------- calibration statistics
@dataclass
class InputStats:
    """What a linear's input reached on the calibration inputs (last dim = channels, dim -2 = tokens)."""
    min: float = math.inf
    max: float = -math.inf
    channel_absmax: torch.Tensor | None = None       # [C]
    position_absmax: torch.Tensor | None = None      # [T] (longest T seen)
    position_min: torch.Tensor | None = None
    position_max: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        c = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
        self.channel_absmax = c if self.channel_absmax is None else torch.maximum(self.channel_absmax, c)
        self.rows += x.numel() // x.shape[-1]
        if x.dim() >= 2:
            t = x.transpose(-2, 0).reshape(x.shape[-2], -1)  # positions first
            lo, hi = t.amin(dim=1), t.amax(dim=1)
            self.position_min = _merge(self.position_min, lo, torch.minimum)
            self.position_max = _merge(self.position_max, hi, torch.maximum)
            self.position_absmax = torch.maximum(self.position_min.abs(), self.position_max.abs())

    def split(self, n: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """((min, max) of positions [0, n), (min, max) of the rest)."""
        if self.position_min is None or self.position_min.numel() <= n:
            raise NormcError(f"a separate range for the first {n} token(s) needs inputs longer than {n} positions",
                             hint="drop `first_tokens`, or calibrate on longer inputs")
        head = (float(self.position_min[:n].min()), float(self.position_max[:n].max()))
        tail = (float(self.position_min[n:].min()), float(self.position_max[n:].max()))
        return head, tail


def _merge(old, new, op):
    if old is None:
        return new
    if old.numel() < new.numel():
        old, new = new.clone(), old
    else:
        old = old.clone()
    old[: new.numel()] = op(old[: new.numel()], new)
    return old


def observe(gm: fx.GraphModule, plan: QuantPlan, inputs: Inputs) -> dict[str, InputStats]:
    """Input statistics of every planned linear over `inputs` (one run per input)."""
    if not inputs:
        raise NormcError("quantization needs calibration inputs", hint="add `calibrate from ...` before `quantize`")
    by_node = {lp.node: lp.name for lp in plan.linears}
    stats = {lp.name: InputStats() for lp in plan.linears}
    wanted: dict[fx.Node, list[str]] = {}
    for n, name in by_node.items():
        if isinstance(n.args[0], fx.Node):
            wanted.setdefault(n.args[0], []).append(name)

    def on_node(node, value):
        for name in wanted.get(node, ()):
            stats[name].add(value)

    for args, kwargs in inputs:
        run_recording(gm, args, kwargs, on_node)
    return stats


# --------------------------------------------------------------------------- onnxruntime's arithmetic
def qrange(kind: str, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """onnxruntime's get_qmin_qmax_for_qType."""
    if reduce_range:
        return (0, 127) if kind == "uint8" else (-64, 64)
    if kind == "uint8":
        return (0, 255)
    return (-127, 127) if symmetric else (-128, 127)


def scale_zero_point(rmin: float, rmax: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """onnxruntime's compute_scale_zp: (float32 scale, zero point)."""
    rmin, rmax = min(float(torch.tensor(rmin, dtype=torch.float32)), 0.0), max(float(torch.tensor(rmax, dtype=torch.float32)), 0.0)
    if symmetric:
        a = max(abs(rmin), abs(rmax))
        rmin, rmax = -a, a
    scale = (rmax - rmin) / (qmax - qmin)
    if scale < _TINY:
        return 1.0, 0
    if symmetric:
        zp = round((qmin + qmax) / 2.0)
    else:
        zp = round(qmin - rmin / scale)
    return float(torch.tensor(scale, dtype=torch.float32)), zp


def fake_quant(x: torch.Tensor, scale, zp, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear, in float32 as onnxruntime computes them."""
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def quant_weight(w: torch.Tensor, scheme: Scheme, reduce_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized weight [out, in], per-output-channel scales [out]) as onnxruntime's quantize_data."""
    w = w.detach().float()
    qmin, qmax = qrange("int8", True, reduce_range)
    if scheme.weight_granularity == "per_group":
        g = scheme.weight_group
        out_f, in_f = w.shape
        pad = (-in_f) % g
        wp = F.pad(w, (0, pad)).reshape(out_f, -1, g)
        a = wp.abs().amax(dim=-1, keepdim=True)
        s = (2 * a.double() / (qmax - qmin)).float().clamp(min=_TINY)
        wq = (torch.clamp(torch.round(wp / s), qmin, qmax) * s).reshape(out_f, -1)[:, :in_f]
        return wq, s.reshape(out_f, -1)
    if scheme.weight_granularity == "per_tensor":
        a = w.abs().amax().reshape(1, 1).expand(w.shape[0], 1)
    else:
        a = w.abs().amax(dim=1, keepdim=True)
    s = (2 * a.double() / (qmax - qmin)).float()
    s = torch.where(s < _TINY, torch.ones_like(s), s)
    return torch.clamp(torch.round(w / s), qmin, qmax) * s, s.reshape(-1)


def dynamic_params(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Run-time (scale, zero point) per token (reduce the last dim) or per tensor, float32, as the
    onnxruntime subgraph built by ort.py computes them."""
    symmetric = scheme.act_symmetric or scheme.act == "int8"
    qmin, qmax = qrange(scheme.act, symmetric)
    if scheme.act_granularity == "per_token":
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.amin(), x.amax()
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        a = torch.maximum(-lo, hi)
        lo, hi = -a, a
    scale = (hi - lo) / float(qmax - qmin)
    scale = torch.where(scale < _TINY, torch.ones_like(scale), scale)
    if symmetric:
        zp = torch.full_like(scale, float(round((qmin + qmax) / 2.0)))
    else:
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp, qmin, qmax


@dataclass
class ActParams:
    """Static activation parameters: one (scale, zp) or, with first_tokens, one for the head and one for the rest."""
    scale: float
    zp: int
    qmin: int
    qmax: int
    head: tuple[float, int] | None = None
    n_head: int = 0


def static_params(stats: InputStats, scheme: Scheme) -> ActParams:
    symmetric = scheme.act_symmetric or scheme.act == "int8"
    qmin, qmax = qrange(scheme.act, symmetric)
    if scheme.first_tokens:
        (hmin, hmax), (tmin, tmax) = stats.split(scheme.first_tokens)
        s, z = scale_zero_point(tmin, tmax, qmin, qmax, symmetric)
        return ActParams(s, z, qmin, qmax, scale_zero_point(hmin, hmax, qmin, qmax, symmetric), scheme.first_tokens)
    s, z = scale_zero_point(stats.min, stats.max, qmin, qmax, symmetric)
    return ActParams(s, z, qmin, qmax)


# --------------------------------------------------------------------------- the simulated linear
def _exact(xq: torch.Tensor, wq: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The product of quantized values summed in float64: onnxruntime's int32 accumulation is exact,
    and a float32 sum would move values across rounding boundaries of the next quantized linear
    (measured: 7e-4 relative output difference on MiniLM's first layer, 5e-7 with this)."""
    return F.linear(xq.double(), wq.double(), None if b is None else b.double())


class QLinear(nn.Module):
    """A linear quantized as its LinearPlan says. `weight_fp`/`bias_fp` are the graph's own tensors
    (shared); `local`, when a dict, makes forward return the float output and accumulate the
    squared error of the quantized one (the linear's own error on float inputs)."""

    def __init__(self, lp: LinearPlan, stats: InputStats | None, cpu: CpuFeatures):
        super().__init__()
        self.site, self.scheme = lp.name, lp.scheme
        self.weight_fp, self.bias_fp = lp.weight, lp.bias
        self.local: dict | None = None
        self.act: ActParams | None = None
        self.weight_q = self.bias_q = None
        if not lp.scheme.quantized:
            return
        self.weight_q, self.weight_scale = quant_weight(lp.weight, lp.scheme, lp.reduce_range(cpu))
        if lp.scheme.act == "fp32" or lp.scheme.act_dynamic:
            # weight-only keeps the float bias; the dynamic subgraph adds the float bias after rescaling
            self.bias_q = None if lp.bias is None else lp.bias.detach().float()
            return
        if stats is None or stats.rows == 0:
            raise NormcError(f"linear `{lp.name}` never ran on the calibration inputs",
                             hint="calibrate on inputs that reach every linear, or keep it in fp32")
        self.act = static_params(stats, lp.scheme)
        self.bias_q = None
        if lp.bias is not None:
            self.bias_q = self._bias(lp.bias, self.act.scale)

    def _bias(self, b, s_x):
        s = (s_x * self.weight_scale.double()) if self.weight_scale.dim() == 1 else None
        if s is None:  # per_group: no single bias scale; onnxruntime has no such Gemm, keep it float
            return b.detach().float()
        s = s.float().double()
        return (torch.round(b.detach().double() / s) * s).float()

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        sc = self.scheme
        if sc.act == "fp32":
            return x
        if sc.act_dynamic:
            s, z, qmin, qmax = dynamic_params(x, sc)
            return fake_quant(x, s, z, qmin, qmax)
        a = self.act
        if a.head is None:
            return fake_quant(x, a.scale, a.zp, a.qmin, a.qmax)
        n = a.n_head
        head = fake_quant(x[..., :n, :], a.head[0], a.head[1], a.qmin, a.qmax)
        return torch.cat([head, fake_quant(x[..., n:, :], a.scale, a.zp, a.qmin, a.qmax)], dim=-2)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_q is None:
            return F.linear(x, self.weight_fp, self.bias_fp)
        xq = self.quantized_input(x)
        if self.act is not None and self.act.head is not None and self.bias_fp is not None:
            # each half has its own input scale, so its own int32 bias
            n = self.act.n_head
            return torch.cat([_exact(xq[..., :n, :], self.weight_q, self._bias(self.bias_fp, self.act.head[0])),
                              _exact(xq[..., n:, :], self.weight_q, self.bias_q)], dim=-2).to(x.dtype)
        if self.act is None and not self.scheme.act_dynamic:  # weight-only: a float MatMul in onnxruntime too
            return F.linear(x, self.weight_q.to(x.dtype), None if self.bias_q is None else self.bias_q.to(x.dtype))
        return _exact(xq, self.weight_q, self.bias_q).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_q = self.quantized(x)
        if self.local is None:
            return y_q
        from ..verify.quant_sim import add_local_error
        return add_local_error(self.local, y_q, F.linear(x, self.weight_fp, self.bias_fp))

    def extra_repr(self) -> str:
        return f"site={self.site!r}, {self.scheme.describe()}"


@dataclass
class Simulation:
    graph_module: fx.GraphModule
    modules: dict[str, QLinear] = field(default_factory=dict)


def simulate(gm: fx.GraphModule, plan: QuantPlan, stats: dict[str, InputStats]) -> Simulation:
    """A GraphModule sharing `gm`'s parameters whose planned linears run as QLinear (gm is not changed)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_node = {lp.node: lp for lp in plan.linears}
    store = nn.Module()
    mods: dict[str, QLinear] = {}
    for i, node in enumerate(gm.graph.nodes):
        lp = by_node.get(node)
        if lp is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        q = QLinear(lp, stats.get(lp.name), plan.cpu)
        attr = f"q{len(mods)}"
        store.add_module(attr, q)
        mods[lp.name] = q
        new = graph.call_module(f"_normc_int8.{attr}", (env[node.args[0]],))
        new.meta = dict(node.meta)
        env[node] = new
    # a dict root: the new module references gm's own parameters and submodules (nothing copied)
    owned = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            owned[target] = store.get_submodule(target.split(".", 1)[1]) if target.startswith("_normc_int8.") \
                else _resolve(gm, target)
    sim = fx.GraphModule(owned, graph, class_name="Int8Simulation")
    sim.graph.eliminate_dead_code()
    sim.recompile()
    return Simulation(sim, mods)


def _resolve(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def local_errors(sim: Simulation, inputs: Inputs) -> dict[str, float]:
    """{linear: ||y_q - y|| / ||y||}: each linear's own quantization error, on float inputs."""
    mods = {n: m for n, m in sim.modules.items() if m.weight_q is not None}
    for m in mods.values():
        m.local = {"err2": 0.0, "ref2": 0.0}
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                sim.graph_module(*args, **kwargs)
        return {n: (math.sqrt(m.local["err2"] / m.local["ref2"]) if m.local["ref2"] > 0 else 0.0)
                for n, m in mods.items()}
    finally:
        for m in mods.values():
            m.local = None


__all__ = ["ActParams", "InputStats", "QLinear", "Simulation", "dynamic_params", "fake_quant", "local_errors",
           "observe", "qrange", "quant_weight", "scale_zero_point", "simulate", "static_params"]
