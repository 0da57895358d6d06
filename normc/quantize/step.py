"""The `quantize` pipeline step and the quality gate of a `verify` after it (called by the runner).

    pipeline {
      calibrate from "builtin:sentences" samples 64
      apply std.shift_scale_compensated(alpha = 0.8)
      quantize int8 { match linear(gelu(x), w, b?): keep fp32 }
      verify approx min_cosine 0.997 approx mean_cosine 0.998 samples 256 data "builtin:heldout"
      export onnx to "model_int8.onnx"
    }

`quantize` plans on the graph as it is (after the migrations), calibrates the planned linears on
the pipeline's calibration inputs and builds the simulation; the float graph is not changed. A
`verify` after it compares the quantized model -- simulated, and in onnxruntime (the same plan
exported) -- with the fp32 original on held-apart inputs (`data`, default: held-out sentences
when the calibration came from the built-in sentences, else random inputs from the input specs
with another seed; `samples`, default 256) and fails below `approx min_cosine` / `mean_cosine`
(`cosine` = min). `export onnx` after `quantize` writes the INT8 model of the same plan.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import NormcError
from ..grammar import syntax_tree as T
from .report import cosines, linear_report, reference_outputs
from .run import Quantized, quantize_graph, write_onnx_int8

DEFAULT_HELDOUT = 256


def run_quantize(runner, gm, step: T.Quantize) -> tuple[Quantized, dict]:
    calib = runner.calib_inputs
    note = None
    if not calib:
        calib = runner.inputs(32)[1:]
        note = "no `calibrate` step before `quantize`: calibrated on 32 random inputs from the input specs"
        if not calib:
            raise NormcError("`quantize` needs calibration inputs", hint="add `calibrate from \"data\"` before it")
    q = quantize_graph(gm, step, calib, stats=runner.stats, source=runner.program.main.source)
    rows = linear_report(q, calib[:16])
    report = q.plan.to_dict()
    report["calibration_samples"] = len(calib)
    report["linears"] = [dict(a, **{k: v for k, v in b.items() if k != "name"})
                         for a, b in zip(report["linears"], rows)]
    if note:
        report["warnings"].append(note)
    runner.warnings.extend(report["warnings"])
    return q, report


def heldout_inputs(runner, step: T.Verify) -> tuple[list, str]:
    n = int(step.options.get("samples", DEFAULT_HELDOUT))
    source = step.options.get("data")
    loaded = runner.loaded
    calibrated = getattr(runner.stats, "source", None) if runner.stats is not None else None
    if source is None and calibrated == "builtin:sentences":
        source = "builtin:heldout"
    if source == "builtin:heldout":
        from ..data.calibration import from_sentences
        from ..data.heldout import heldout_sentences
        return from_sentences(heldout_sentences(n), specs=loaded.input_specs,
                              n_positional=len(loaded.example_args)), f"{n} held-out sentences"
    if source is not None:
        from ..verify.calibrate import calibration_inputs
        return calibration_inputs(loaded, str(source), n, Path(runner.program.main.file).parent,
                                  seed=runner.options.seed + 2), f"{n} samples of {source}"
    from ..data.calibration import from_specs
    return (from_specs(loaded.input_specs, n, seed=runner.options.seed + 2, n_positional=len(loaded.example_args)),
            f"{n} random inputs (seed {runner.options.seed + 2})")


def verify_quantized(runner, q: Quantized, step: T.Verify, ort: bool = True) -> tuple[bool, str | None, dict]:
    """Simulated (and onnxruntime) INT8 against the fp32 original on held-apart inputs; the gates."""
    import tempfile

    inputs, what = heldout_inputs(runner, step)
    reference = reference_outputs(runner.loaded.module, inputs)
    result = {"inputs": what}
    sim = cosines(reference, q.sim.graph_module, inputs)
    result["simulated"] = {"mean_cosine": sum(sim) / len(sim), "min_cosine": min(sim)}
    if ort:
        from ..backends.onnx_backend import ort_session, run_onnx
        with tempfile.TemporaryDirectory(prefix="normc-int8-verify-") as tmp:
            path = Path(tmp) / "int8.onnx"
            write_onnx_int8(q, runner.loaded.example_args, runner.loaded.example_kwargs, path, runner.calib_inputs
                            or runner.inputs(32)[1:])
            sess = ort_session(path)
            got = []
            for ref, (a, k) in zip(reference, inputs):
                import torch
                y = torch.from_numpy(run_onnx(sess, a, k)[0]).double().flatten()
                r = ref.double().flatten()
                got.append(float(torch.dot(y, r) / (y.norm() * r.norm()).clamp_min(1e-300)))
        result["onnxruntime"] = {"mean_cosine": sum(got) / len(got), "min_cosine": min(got)}
    gates = {"min_cosine": step.approx.get("min_cosine", step.approx.get("cosine")),
             "mean_cosine": step.approx.get("mean_cosine")}
    result["gates"] = {k: v for k, v in gates.items() if v is not None}
    if not result["gates"]:
        return False, "a quantized model needs a quality gate: add `verify approx min_cosine X`", result
    for kind in ("simulated", "onnxruntime"):
        if kind not in result:
            continue
        for gate, bound in result["gates"].items():
            got_v = result[kind][gate]
            if got_v < float(bound):
                return False, (f"INT8 ({kind}) {gate.replace('_', ' ')} {got_v:.5f} on {what} is below the gate "
                               f"approx {gate} {bound}"), result
    return True, None, result


__all__ = ["heldout_inputs", "run_quantize", "verify_quantized"]
