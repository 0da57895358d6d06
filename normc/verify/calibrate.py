"""Calibration statistics: one pass over calibration inputs, per-channel statistics of every activation.

Rules read them through `absmax(h)`, `min(h)`, `max(h)`, `mean(h)`, `rms(h)` on an activation:
per channel of the last dim, over every sample and position, in float64. They are
collected once for all the rules that follow a `calibrate` step.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx

from ..errors import NormcError
from ..ir.builtins import RefuseSite
from ..ir.graph import run_recording, site_name
from ..report.progress import track

BUILTIN_DATA = Path(__file__).resolve().parent.parent / "data"


class Statistics:
    """Per-channel (last dim) running statistics of every floating activation of a graph."""

    def __init__(self):
        # keyed by node name
        self._min: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._sumsq: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self.samples = 0
        self.source = ""

    def observe(self, node: fx.Node, value) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() == 0 or value.numel() == 0:
            return
        if node.op in ("get_attr", "output"):
            return
        node = node.name  # by name: a deep copy of the graph (bisection, replays) finds the same statistics
        v = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
        lo, hi = v.amin(0), v.amax(0)
        if node in self._max:
            if self._max[node].shape != hi.shape:
                return
            self._min[node] = torch.minimum(self._min[node], lo)
            self._max[node] = torch.maximum(self._max[node], hi)
            self._sum[node] += v.sum(0)
            self._sumsq[node] += (v * v).sum(0)
            self._count[node] += v.shape[0]
        else:
            self._min[node], self._max[node] = lo, hi
            self._sum[node], self._sumsq[node] = v.sum(0), (v * v).sum(0)
            self._count[node] = v.shape[0]

    def get(self, node: fx.Node, kind: str) -> torch.Tensor:
        where = node
        node = node.name
        if node not in self._max:
            raise RefuseSite(f"no calibration statistics for `{site_name(where)}`: it was created or changed after "
                             "`calibrate`; calibrate again after the steps that change it")
        if kind == "absmax":
            return torch.maximum(self._max[node].abs(), self._min[node].abs())
        if kind == "min":
            return self._min[node]
        if kind == "max":
            return self._max[node]
        if kind == "mean":
            return self._sum[node] / self._count[node]
        if kind == "rms":
            return (self._sumsq[node] / self._count[node]).sqrt()
        raise RefuseSite(f"unknown statistic `{kind}`")

    def __contains__(self, node) -> bool:
        return getattr(node, "name", node) in self._max

    def __len__(self) -> int:
        return len(self._max)


def resolve_source(source: str, base: Path | None) -> str | Path | None:
    """`random`, `builtin:NAME` (normc/data/NAME.txt), or a path relative to the .nc file (then the cwd)."""
    if source in ("random", ""):
        return None
    if source == "builtin:sentences":  # the calibration split only: the evaluation sentences stay held apart
        from ..data import calibration_sentences
        return calibration_sentences()
    if source.startswith("builtin:"):
        path = BUILTIN_DATA / f"{source[len('builtin:'):]}.txt"
        if not path.is_file():
            names = sorted(p.stem for p in BUILTIN_DATA.glob("*.txt"))
            raise NormcError(f"no built-in calibration set `{source}`", f"built-in sets: {', '.join('builtin:' + n for n in names)}")
        return path
    for candidate in ([base / source] if base is not None else []) + [Path(source)]:
        if candidate.is_file():
            return candidate
    raise NormcError(f"calibration data `{source}` not found", "paths are relative to the .nc file, then to the current folder")


def calibration_inputs(loaded, source: str, samples: int | None, base: Path | None = None, seed: int = 1):
    from ..data.calibration import load_calibration
    return load_calibration(resolve_source(source, base), loaded, samples, seed=seed)


def collect(gm: fx.GraphModule, inputs) -> Statistics:
    stats = Statistics()
    for args, kwargs in track(inputs, "calibrating", len(inputs)):
        run_recording(gm, args, kwargs, stats.observe)
        stats.samples += 1
    return stats


def collect_statistics(gm: fx.GraphModule, loaded, step, base: Path | None = None) -> Statistics:
    """The `calibrate from "..." samples N` step."""
    inputs = calibration_inputs(loaded, step.source, step.samples, base)
    if not inputs:
        raise NormcError(f"calibration data `{step.source}` holds no samples")
    stats = collect(gm, inputs)
    stats.source = step.source
    return stats
