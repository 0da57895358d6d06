"""Quantizing a canonical graph as a `quantize` step says: plan, calibration statistics, simulation,
and the ONNX INT8 export of the same plan."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import fx

from ..backends.cpu_features import CpuFeatures
from ..grammar import syntax_tree as T
from .plan import QuantPlan, make_plan
from .simulate import InputStats, Simulation, observe, simulate


@dataclass
class Quantized:
    graph_module: fx.GraphModule      # the float graph the plan was made on (unchanged)
    plan: QuantPlan
    stats: dict[str, InputStats]
    sim: Simulation


def quantize_graph(gm: fx.GraphModule, step: T.Quantize, calib_inputs, *, cpu: CpuFeatures | None = None,
                   source: str | None = None, stats=None, observed: dict[str, InputStats] | None = None) -> Quantized:
    """Plan `step` on `gm`, calibrate the planned linears on `calib_inputs`, build the simulation.
    `stats`: normc calibration statistics for guards that read them (absmax(x) in a `where`);
    `observed`: input statistics measured before on the same graph (skips the calibration run)."""
    plan = make_plan(gm, step, stats=stats, cpu=cpu, source=source)
    if observed is None or any(lp.name not in observed for lp in plan.linears):
        observed = observe(gm, plan, calib_inputs)
    return Quantized(gm, plan, observed, simulate(gm, plan, observed))


def write_onnx_int8(q: Quantized, example_args, example_kwargs, out: Path, calib_inputs, opset: int = 18,
                    preprocess: bool = True):
    """Export the float graph to ONNX and quantize it as the plan says (onnxruntime QDQ); returns the
    QuantizeReport."""
    from ..backends.onnx_backend import export_onnx
    from .ort import export_int8

    with tempfile.TemporaryDirectory(prefix="normc-int8-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        # The INT8 model is exported at the example's shape: with symbolic dims onnxruntime's quantization
        # (pre-processing and QDQ placement) computes something else than the plan (measured 7.6e-3 from the
        # simulation, against < 1e-5 static, tests/quantize/test_ort_agreement.py). Not understood yet.
        gm = q.graph_module
        saved = gm.meta.pop("normc_dynamic", None) if hasattr(gm, "meta") else None
        try:
            export_onnx(gm, example_args, example_kwargs, fp32, opset=opset)
        finally:
            if saved is not None:
                gm.meta["normc_dynamic"] = saved
        return export_int8(q.plan, q.stats, fp32, Path(out), calib_inputs, preprocess=preprocess)


__all__ = ["Quantized", "quantize_graph", "write_onnx_int8"]
