"""Simulated W8A8 quantization in torch, and the per-linear errors it causes.

The scheme (what SmoothQuant and Outlier Suppression+ are judged against):

* **activations**: the INPUT of every quantized linear, per-tensor symmetric int8:
  ``x_q = clamp(round(x / s), -127, 127) * s`` with ``s = absmax / 127``, ``absmax`` the
  largest ``|x|`` that linear's input reached on the calibration inputs (static scales);
* **weights**: per-output-channel symmetric int8, ``s_k = max_j |W_kj| / 127``.

Everything else (norms, softmax, attention matmuls, residual adds) stays in floating point.

:func:`simulate_w8a8` returns a copy of an eager model or of an fx ``GraphModule`` in which
each quantized linear is a :class:`FakeQuantLinear` (an ``nn.Linear`` subclass holding the
fake-quantized weight, the fp weight and the activation scale). In a graph, canonical
``linear`` nodes (and ``aten.linear``) become ``call_module`` nodes of such modules whose
``meta["normc_path"]`` keeps the original module path, so names stay the same.

:func:`per_linear_errors` measures, for named linears, ``||y_q - y|| / ||y||`` over all
inputs (norms over every element of every input), where ``y`` is the linear's output in the
reference and ``y_q`` in the simulated model:

* ``mode="propagated"``: both models run end to end; the error at a layer includes what
  the quantized layers before it contributed;
* ``mode="local"``: the simulated model runs in floating point, and each quantized linear
  additionally computes its quantized output from the same floating-point input: the error
  that layer's own quantization causes. The reference is then not needed (the fp path of the
  simulated model is the reference; a migrated model's linear outputs equal the original's).

Names: eager models use module names (``encoder.layer.0.attention.self.query``); graphs
use :func:`normc.ir.graph.module_path` of the linear node (the same dotted paths for traced
HF models); a name that occurs at several sites gets ``#2``, ``#3`` ... for the later ones.
``names`` filters accept exact names or ``fnmatch`` globs (``encoder.layer.*.attention.self.query``).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from normc.errors import NormcError
from normc.frontend.specs import set_eval

Inputs = list[tuple[tuple, dict]]

QMAX = 127  # symmetric int8: [-127, 127] (the -128 code is left unused, as SmoothQuant does)
_TINY = 1e-12


# --------------------------------------------------------------------------- primitives
def qmax_for(bits: int) -> int:
    return 2 ** (int(bits) - 1) - 1


def fake_quant_per_tensor(x: torch.Tensor, scale: torch.Tensor | float, qmax: int = QMAX) -> torch.Tensor:
    """Symmetric per-tensor fake quantization with a fixed (calibrated) scale."""
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def weight_scales_per_channel(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric scales ``[out, 1, ...]`` of a weight ``[out, in, ...]``."""
    dims = tuple(range(1, w.dim()))
    absmax = w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()
    return absmax.clamp(min=_TINY) / qmax_for(bits)


def fake_quant_weight_per_channel(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization of a weight ``[out, in, ...]``."""
    s = weight_scales_per_channel(w, bits)
    q = qmax_for(bits)
    return torch.clamp(torch.round(w / s), -q, q) * s


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` with a fake-quantized weight and a static per-tensor input scale.

    ``weight`` holds the fake-quantized weight (what the model computes with), ``weight_fp``
    the original. ``local`` (a dict or None): when set, forward returns the floating-point
    output and adds ``||y_q - y||^2`` and ``||y||^2`` of this call to ``local['err2']`` /
    ``local['ref2']`` (see ``per_linear_errors(mode="local")``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_absmax: float,
                 site: str = "", act_bits: int = 8, weight_bits: int = 8):
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias=bias is not None, device="meta")
        w = weight.detach().clone()
        self.weight = nn.Parameter(fake_quant_weight_per_channel(w, weight_bits), requires_grad=False)
        self.register_buffer("weight_fp", w, persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.act_qmax = qmax_for(act_bits)
        scale = max(float(act_absmax), _TINY) / self.act_qmax
        self.register_buffer("act_scale", torch.tensor(scale, dtype=w.dtype))
        self.site = site
        self.act_absmax = float(act_absmax)
        self.local: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_q = F.linear(fake_quant_per_tensor(x, self.act_scale, self.act_qmax), self.weight, self.bias)
        if self.local is None:
            return y_q
        return add_local_error(self.local, y_q, F.linear(x, self.weight_fp, self.bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, site={self.site!r}, act_absmax={self.act_absmax:.4g}"


def add_local_error(local: dict, y_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accumulate a linear's squared quantization error and squared reference (float64) into `local`;
    returns the float output `y`, so measuring one linear does not carry its error downstream."""
    local["err2"] += float((y_q.double() - y.double()).pow(2).sum())
    local["ref2"] += float(y.double().pow(2).sum())
    return y


# --------------------------------------------------------------------------- finding linears
@dataclass
class LinearSite:
    name: str
    module: nn.Module | None = None   # eager nn.Linear (or a call_module target in a graph)
    node: fx.Node | None = None       # graph linear node (call_function or call_module)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    if patterns is None:
        return True
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_graph(model: Any) -> bool:
    return isinstance(model, fx.GraphModule)


def _graph_linear_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """(node, kind) for every linear in a graph: kind 'function' (canonical / aten linear)
    or 'module' (call_module of an nn.Linear)."""
    from normc.ir.graph import op_name

    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            try:
                sub = gm.get_submodule(n.target)
            except AttributeError:
                continue
            if isinstance(sub, nn.Linear):
                out.append((n, "module"))
        elif n.op == "call_function" and op_name(n, gm) == "linear":
            out.append((n, "function"))
    return out


def _param_prefix(node: fx.Node) -> str | None:
    """``encoder.layer.0.attention.self.query`` for a linear reading ``...query.weight`` (or,
    when a rewrite replaced the weight, ``...query.bias``); None when neither is an original
    parameter."""
    from normc.ir.graph import PARAM_STORE

    for arg in list(node.args[1:3]) + [node.kwargs.get(k) for k in ("weight", "bias", "w", "b")]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            target = str(arg.target)
            if target.startswith(PARAM_STORE + ".") or "." not in target:
                continue
            prefix, _, leaf = target.rpartition(".")
            if leaf in ("weight", "bias"):
                return prefix
    return None


def _graph_site_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A graph linear's name: its module path, or -- when the node carries the path of some
    other module (a rewrite that gave new linear nodes the matched norm's metadata) -- the
    module path of the parameters it reads."""
    from normc.ir.graph import module_path, module_type

    if node.op == "call_module":
        sub = gm.get_submodule(node.target)
        if isinstance(sub, FakeQuantLinear) and sub.site:
            return sub.site
        return node.meta.get("normc_path") or str(node.target)
    path, typ = module_path(node), module_type(node)
    if path and (not typ or "Linear" in typ or "Conv1D" in typ):
        return path
    return _param_prefix(node) or path or node.name


def linear_sites(model: nn.Module, names: Sequence[str] | None = None) -> list[LinearSite]:
    """The linears of an eager model or a graph, in execution/definition order, by name."""
    sites: list[LinearSite] = []
    seen: dict[str, int] = {}

    def unique(name: str) -> str:
        seen[name] = seen.get(name, 0) + 1
        return name if seen[name] == 1 else f"{name}#{seen[name]}"

    if _is_graph(model):
        for node, kind in _graph_linear_nodes(model):
            name = unique(_graph_site_name(model, node))
            if _matches(name, names):
                mod = model.get_submodule(node.target) if kind == "module" else None
                sites.append(LinearSite(name, mod, node))
    else:
        for name, mod in model.named_modules():
            if isinstance(mod, FakeQuantLinear) and mod.site:
                name = mod.site
            if isinstance(mod, nn.Linear) and _matches(name, names):
                sites.append(LinearSite(unique(name), mod, None))
    return sites


# --------------------------------------------------------------------------- recording
def _run(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def record_linears(model: nn.Module, args: tuple, kwargs: dict, names: Sequence[str] | None = None,
                   on_linear: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Run ``model`` once; call ``on_linear(name, x, y)`` for each named linear (x its input,
    y its output). Returns ``{name: y}`` when ``on_linear`` is None."""
    sites = linear_sites(model, names)
    captured: dict[str, torch.Tensor] = {}
    callback = on_linear or (lambda name, x, y: captured.__setitem__(name, y.detach()))
    handles = []
    by_node: dict[fx.Node, str] = {}
    for site in sites:
        if site.module is not None:
            handles.append(site.module.register_forward_hook(
                lambda mod, inp, out, _n=site.name: callback(_n, inp[0], out)))
        elif site.node is not None:
            by_node[site.node] = site.name
    try:
        if by_node:
            from normc.ir.graph import run_recording

            env: dict[fx.Node, Any] = {}
            wanted_inputs = {n.args[0] for n in by_node if isinstance(n.args[0], fx.Node)}

            def on_node(node, value):
                if node in wanted_inputs:
                    env[node] = value
                name = by_node.get(node)
                if name is not None:
                    x = env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else node.args[0]
                    callback(name, x, value)

            run_recording(model, args, kwargs, on_node)
        else:
            _run(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return captured


@dataclass
class ChannelStats:
    """Per-channel statistics of one linear's input over the calibration inputs (last dim = channels)."""

    absmax: torch.Tensor  # [C]
    min: torch.Tensor     # [C]
    max: torch.Tensor     # [C]
    n_rows: int = 0

    @property
    def tensor_absmax(self) -> float:
        return float(self.absmax.max())

    def outlier_ratio(self, channel: int) -> float:
        """``absmax[channel] / median(absmax)``: how far one channel sticks out."""
        med = float(self.absmax.median())
        return float(self.absmax[channel]) / med if med > 0 else math.inf


def linear_input_stats(model: nn.Module, inputs: Inputs, names: Sequence[str] | None = None) -> dict[str, ChannelStats]:
    """Per-channel absmax / min / max of each named linear's input over ``inputs``."""
    if not inputs:
        raise NormcError("no calibration inputs", hint="give calibration data (a file, sentences, or input specs)")
    stats: dict[str, ChannelStats] = {}

    def on_linear(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = flat.amin(dim=0), flat.amax(dim=0)
        s = stats.get(name)
        if s is None:
            stats[name] = ChannelStats(torch.maximum(lo.abs(), hi.abs()), lo, hi, flat.shape[0])
        else:
            s.min, s.max = torch.minimum(s.min, lo), torch.maximum(s.max, hi)
            s.absmax = torch.maximum(s.min.abs(), s.max.abs())
            s.n_rows += flat.shape[0]

    was_training = model.training
    set_eval(model)
    try:
        for args, kwargs in inputs:
            record_linears(model, args, kwargs, names, on_linear)
    finally:
        if was_training:
            with contextlib.suppress(NotImplementedError):  # torch.export graphs refuse train()/eval()
                model.train(True)
    return stats


# --------------------------------------------------------------------------- simulation
def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


def _const(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr argument (None for None; raises for activations)."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj: Any = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise NormcError("a linear's weight or bias is computed in the graph, not a parameter",
                     hint="simulated quantization needs constant weights; fold the computation first")


def simulate_w8a8(
    model: nn.Module,
    calib_inputs: Inputs,
    names: Sequence[str] | None = None,
    *,
    act_bits: int = 8,
    weight_bits: int = 8,
    stats: dict[str, ChannelStats] | None = None,
) -> nn.Module:
    """A copy of ``model`` (eager module or fx GraphModule) whose named linears (default: all)
    run W8A8: static per-tensor symmetric input quantization (scale from the calibration
    absmax) and per-output-channel symmetric weight quantization. ``model`` is not changed.

    ``stats``: input statistics already measured with :func:`linear_input_stats` on the same
    model (skips the calibration run; ``calib_inputs`` may then be empty)."""
    if stats is None:
        stats = linear_input_stats(model, calib_inputs, names)
    sim = copy.deepcopy(model)
    set_eval(sim)
    sites = linear_sites(sim, names)
    if not sites:
        raise NormcError("no linear layers to quantize" + (f" match {list(names)}" if names else ""),
                         hint="name linears by module path, e.g. `encoder.layer.*.attention.self.query`")
    if _is_graph(sim):
        _simulate_graph(sim, sites, stats, act_bits, weight_bits)
    else:
        replacement: dict[int, FakeQuantLinear] = {}
        for site in sites:
            if site.name not in stats:  # never ran on the calibration inputs
                continue
            lin = site.module
            replacement[id(lin)] = FakeQuantLinear(lin.weight, lin.bias, stats[site.name].tensor_absmax, site.name,
                                                   act_bits, weight_bits)
        # every path of a linear registered under several names gets the same quantized module
        for path, mod in list(sim.named_modules(remove_duplicate=False)):
            if path and id(mod) in replacement:
                _set_submodule(sim, path, replacement[id(mod)])
    return sim


def _simulate_graph(gm: fx.GraphModule, sites: list[LinearSite], stats: dict[str, ChannelStats],
                    act_bits: int, weight_bits: int) -> None:
    store_name = "_normc_w8a8"
    if not hasattr(gm, store_name):
        gm.add_module(store_name, nn.Module())
    store = getattr(gm, store_name)
    for i, site in enumerate(sites):
        if site.name not in stats:
            continue
        node = site.node
        if node.op == "call_module":
            lin = gm.get_submodule(node.target)
            w, b, x = lin.weight, lin.bias, node.args[0]
        else:
            x = node.args[0]
            w = _const(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight", node.kwargs.get("w")))
            b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias", node.kwargs.get("b"))
            b = _const(gm, b_arg)
        fq = FakeQuantLinear(w, b, stats[site.name].tensor_absmax, site.name, act_bits, weight_bits)
        attr = f"q{i}"
        store.add_module(attr, fq)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{store_name}.{attr}", (x,))
        new.meta = dict(node.meta)
        new.meta["normc_path"] = site.name.split("#")[0]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


# --------------------------------------------------------------------------- errors
def per_linear_errors(
    ref_model: nn.Module | None,
    sim_model: nn.Module,
    inputs: Inputs,
    names: Sequence[str] | None = None,
    *,
    mode: str = "propagated",
) -> dict[str, float]:
    """``{name: ||y_q - y|| / ||y||}`` for the named linears (default: every quantized one).

    ``mode="propagated"``: y from ``ref_model``, y_q from ``sim_model``, both run end to end.
    ``mode="local"``: each linear's own quantization error with floating-point inputs (the
    simulated model's fp path is the reference; ``ref_model`` is ignored).
    """
    if mode not in ("propagated", "local"):
        raise ValueError(f"mode must be 'propagated' or 'local', not {mode!r}")
    if not inputs:
        raise NormcError("no inputs to measure quantization errors on")
    sim_sites = [s for s in linear_sites(sim_model, names) if isinstance(s.module, FakeQuantLinear)]
    if not sim_sites:
        raise NormcError("the simulated model has no quantized linears" + (f" matching {list(names)}" if names else ""),
                         hint="build it with simulate_w8a8, and name linears by module path")
    wanted = [s.name for s in sim_sites]
    if mode == "local":
        for s in sim_sites:
            s.module.local = {"err2": 0.0, "ref2": 0.0}
        try:
            for args, kwargs in inputs:
                _run(sim_model, args, kwargs)
            return {s.name: _ratio(s.module.local["err2"], s.module.local["ref2"]) for s in sim_sites}
        finally:
            for s in sim_sites:
                s.module.local = None
    if ref_model is None:
        raise NormcError("propagated errors need the reference model")
    err2 = {n: 0.0 for n in wanted}
    ref2 = {n: 0.0 for n in wanted}
    for args, kwargs in inputs:
        ref_out = record_linears(ref_model, args, kwargs, wanted)
        missing = [n for n in wanted if n not in ref_out]
        if missing:
            raise NormcError(f"the reference model has no linear named {missing[0]}",
                             hint="compare models with the same module paths (the original and its rewrite)")
        sim_out = record_linears(sim_model, args, kwargs, wanted)
        for n in wanted:
            y, yq = ref_out[n].double(), sim_out[n].double()
            err2[n] += float((yq - y).pow(2).sum())
            ref2[n] += float(y.pow(2).sum())
    return {n: _ratio(err2[n], ref2[n]) for n in wanted}


def _ratio(err2: float, ref2: float) -> float:
    if ref2 == 0.0:
        return 0.0 if err2 == 0.0 else math.inf
    return math.sqrt(err2 / ref2)


def group_errors(errors: dict[str, float], groups: dict[str, str]) -> dict[str, list[float]]:
    """``{label: [error per match in name order]}`` for ``groups = {label: glob}``."""
    out: dict[str, list[float]] = {}
    for label, pattern in groups.items():
        out[label] = [v for k, v in errors.items() if fnmatch.fnmatchcase(k, pattern)]
    return out


def iter_quantized(model: nn.Module) -> Iterable[FakeQuantLinear]:
    return (m for m in model.modules() if isinstance(m, FakeQuantLinear))


__all__ = [
    "ChannelStats",
    "FakeQuantLinear",
    "LinearSite",
    "fake_quant_per_tensor",
    "fake_quant_weight_per_channel",
    "group_errors",
    "iter_quantized",
    "linear_input_stats",
    "linear_sites",
    "per_linear_errors",
    "record_linears",
    "simulate_w8a8",
    "weight_scales_per_channel",
]
