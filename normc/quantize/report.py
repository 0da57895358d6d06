"""Where the quantization error comes from: each linear's local error, its input's range profile
(which tokens and channels set the static range), and an explain-style ranking of the linears by
their share of the end-to-end error.

Output quality is compared per input as the cosine of the first model output flattened (for a
sentence encoder's last_hidden_state: every token's vector at once).
"""
from __future__ import annotations

import math

import torch

from .run import Quantized
from .simulate import InputStats, local_errors

Inputs = list[tuple[tuple, dict]]


def first_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_output(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return first_output(out[0])
    return first_output(out.last_hidden_state)


def cosines(reference: list[torch.Tensor], model, inputs: Inputs) -> list[float]:
    """Per input: cosine of the model's first output to the reference's (flattened, float64)."""
    out = []
    with torch.no_grad():
        for ref, (args, kwargs) in zip(reference, inputs):
            y = first_output(model(*args, **kwargs)).double().flatten()
            r = ref.double().flatten()
            out.append(float(torch.dot(y, r) / (y.norm() * r.norm()).clamp_min(1e-300)))
    return out


def reference_outputs(model, inputs: Inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_output(model(*a, **k)).detach() for a, k in inputs]


def range_profile(stats: InputStats, top: int = 3) -> dict:
    """Which positions and channels set the input's range: the largest |x| per position and per
    channel, and the ratio of the widest position to the others (a [CLS]-driven range shows as a
    large ratio at position 0)."""
    out: dict = {"min": stats.min, "max": stats.max}
    if stats.position_absmax is not None and stats.position_absmax.numel() > 1:
        p = stats.position_absmax
        order = torch.argsort(p, descending=True)[:top].tolist()
        rest = torch.cat([p[:order[0]], p[order[0] + 1:]])
        out["top_positions"] = [(i, round(float(p[i]), 4)) for i in order]
        out["position_ratio"] = round(float(p[order[0]] / rest.max().clamp_min(1e-30)), 3)
    if stats.channel_absmax is not None:
        c = stats.channel_absmax
        order = torch.argsort(c, descending=True)[:top].tolist()
        out["top_channels"] = [(i, round(float(c[i]), 4)) for i in order]
        out["channel_ratio"] = round(float(c[order[0]] / c.median().clamp_min(1e-30)), 3)
    return out


def error_shares(q: Quantized, inputs: Inputs, reference: list[torch.Tensor]) -> list[tuple[str, float, float]]:
    """(linear, 1 - mean cosine with only that linear quantized, share of the sum), largest first.
    Every other linear runs in float for the measurement (QLinear.local), so one pass per linear."""
    mods = {n: m for n, m in q.sim.modules.items() if m.weight_q is not None}
    losses = {}
    try:
        for m in mods.values():
            m.local = {"err2": 0.0, "ref2": 0.0}
        for name, m in mods.items():
            m.local = None
            cos = cosines(reference, q.sim.graph_module, inputs)
            losses[name] = max(0.0, 1.0 - sum(cos) / len(cos))
            m.local = {"err2": 0.0, "ref2": 0.0}
    finally:
        for m in mods.values():
            m.local = None
    total = sum(losses.values()) or math.inf
    return sorted(((n, v, v / total) for n, v in losses.items()), key=lambda t: -t[1])


def linear_report(q: Quantized, inputs: Inputs) -> list[dict]:
    """One row per linear: scheme, local error on `inputs`, range profile of its calibration input."""
    local = local_errors(q.sim, inputs)
    rows = []
    for lp in q.plan.linears:
        rows.append({"name": lp.name, "scheme": lp.scheme.describe(), "local_error": local.get(lp.name, 0.0),
                     "range": range_profile(q.stats[lp.name]) if lp.name in q.stats else None})
    return rows


__all__ = ["cosines", "error_shares", "first_output", "linear_report", "range_profile", "reference_outputs"]
