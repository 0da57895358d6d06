"""Writing a verified run's outputs: .pt2, .onnx (checked with onnxruntime), INT8 ONNX, state dicts, TensorRT.

`run` is the pipeline runner (its loaded model, options, verification and calibration inputs).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import NormcError, VerificationFailed
from ..ir.graph import op_counts
from ..verify import Tolerance


def onnx_opset(gm, opts, options) -> int:
    if "opset" in opts:
        return int(opts["opset"])
    if options.opset is not None:
        return options.opset
    # LayerNormalization needs >= 17; RMSNormalization exists from 23: below it, it would be decomposed
    return 23 if op_counts(gm).get("rms_norm") else 18


def write_outputs(run, result) -> None:
    """Write every output the run asks for (`-o` and the pipeline's `export` steps); only called once verified."""
    from ..backends import onnx_backend, torch_backend
    gm, loaded = result.graph_module, run.loaded
    targets = []
    if run.options.output is not None:
        targets.append((format_of(run.options.output), Path(run.options.output), {}))
    for ex in run.exports:
        if ex.path is not None:
            targets.append((ex.format, Path(ex.path), ex.options))
    for fmt, path, opts in targets:
        run.say(f"writing {path}")
        if fmt == "torch":
            torch_backend.save_pt2(gm, loaded.example_args, loaded.example_kwargs, path)
        elif fmt == "safetensors":
            torch_backend.save_state_dict(gm, path)
        elif fmt == "onnx" and getattr(run, "quantized", None) is not None:  # the `quantize` step's plan
            from ..quantize.run import write_onnx_int8
            done = write_onnx_int8(run.quantized, loaded.example_args, loaded.example_kwargs, path,
                                   run.calib_inputs or run.inputs(32)[1:], opset=onnx_opset(gm, opts, run.options))
            result.report.setdefault("int8", []).append({"path": str(path), "quantize": _plain_dict(done)})
        elif fmt == "onnx" and opts.get("quantize") is not None:
            write_int8(run, gm, path, opts, result)
        elif fmt == "onnx":
            opset = onnx_opset(gm, opts, run.options)
            onnx_backend.export_onnx(gm, loaded.example_args, loaded.example_kwargs, path, opset=opset)
            check = onnx_backend.check_onnx(path, gm, run.verify_set[:2], None)
            result.report.setdefault("onnx_check", []).append({"path": str(path), **check.to_dict()})
            if not check.passed:
                path.unlink(missing_ok=True)
                raise VerificationFailed(f"the ONNX export `{path}` does not match torch: {check.summary()}",
                                         "report this with the model; export torch (.pt2) meanwhile")
        elif fmt == "tensorrt":
            from ..backends import tensorrt_backend
            tensorrt_backend.require()  # say what is missing before writing anything
            onnx_path = path.with_suffix(".onnx")
            onnx_backend.export_onnx(gm, loaded.example_args, loaded.example_kwargs, onnx_path,
                                     opset=onnx_opset(gm, opts, run.options))
            tensorrt_backend.build_engine(onnx_path, path, fp16=bool(opts.get("fp16", False)))
        result.outputs.append(str(path))
        result.report["outputs"].append({"format": fmt, "path": str(path)})

def write_int8(run, gm, path: Path, opts: dict, result) -> None:
    """ONNX, then static INT8 (QDQ, per-channel weights) calibrated on the pipeline's calibration
    inputs; its error against torch is measured and reported (quantization is not exact)."""
    import tempfile

    from ..backends import onnx_backend
    from ..backends.quantize import quantize_int8
    if str(opts["quantize"]) != "int8":
        raise NormcError(f"`quantize {opts['quantize']}` is not supported", "use `export onnx quantize int8 to \"m.onnx\"`")
    calib = run.calib_inputs or run.inputs(32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx_backend.export_onnx(gm, run.loaded.example_args, run.loaded.example_kwargs, fp32,
                                 opset=onnx_opset(gm, opts, run.options))
        done = quantize_int8(fp32, path, calib)
    check = onnx_backend.check_onnx(path, gm, run.verify_set, Tolerance(max_rel=1.0))
    result.report.setdefault("int8", []).append({
        "path": str(path), "calibration_samples": len(calib), "quantize": _plain_dict(done),
        "max_rel_err": check.max_rel_err, "min_cosine": check.min_cosine})


def _plain_dict(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return {k: v for k, v in dataclasses.asdict(obj).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    return {}


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".pt2",):
        return "torch"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".engine", ".plan", ".trt"):
        return "tensorrt"
    raise NormcError(f"cannot tell the output format of `{path}`",
                     "use a .pt2 (torch.export), .onnx, .safetensors or .engine (TensorRT) file name")
