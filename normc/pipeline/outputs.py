"""Writing a verified run's outputs: .pt2, .onnx (checked with onnxruntime), INT8 ONNX, state dicts, TensorRT.

`run` is the pipeline runner (its loaded model, options, verification and calibration inputs).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..checkpoint.writer import DEFAULT_SHARD_BYTES
from ..errors import NormcError, VerificationFailed
from ..ir.graph import op_counts
from ..verify import Tolerance


FALLBACK_OPSET = 18


def _write_checked_onnx(run, result, gm, path, opts, program):
    """Export and check with onnxruntime. Tried in turn, until one passes:
    - the rewritten graph untraced (:meth:`_Program.untraced`: the exporter retraces it anyway), then the
      graph traced by torch.export, when the first is refused or fails its check: a shortcut never decides
      the outcome;
    - each at the opset chosen, then at opset 18 when normc chose it (23, for RMSNormalization): the
      exporter also fuses rotary embeddings and attention into opset-23 ops, and onnxruntime does not run
      every such fusion at every shape (LLaMA's RotaryEmbedding at another sequence length). With a
      warning. An opset the user chose is kept, failure or not."""
    from ..backends import onnx_backend
    loaded = run.loaded
    opset = onnx_opset(gm, opts, run.options)
    chosen = "opset" not in opts and run.options.opset is None
    opsets = [opset] + ([FALLBACK_OPSET] if chosen and opset != FALLBACK_OPSET else [])
    tries = [(False, at) for at in opsets] if program.untraced() is not None else []
    tries += [(True, at) for at in opsets]
    why, refused = "", False
    for i, (traced, at) in enumerate(tries):
        last = i == len(tries) - 1
        if refused and not traced:
            continue
        ep = program() if traced else program.untraced()  # a failing trace is the model's problem: raised
        try:
            onnx_backend.export_onnx(gm, loaded.example_args, loaded.example_kwargs, path, opset=at, program=ep)
        except NormcError:
            if traced:
                raise  # the traced graph does not export: that is the answer
            refused = True
            continue
        try:
            check = onnx_backend.check_onnx(path, gm, check_inputs(run), None)
            if check.passed or last:
                break
            why = check.summary()
        except NormcError as exc:  # onnxruntime cannot load or run it
            if last:
                raise
            why = exc.message
        path.unlink(missing_ok=True)
    if at != opset:
        result.report["warnings"].append(f"`{path}`: the opset {opset} export failed its onnxruntime check "
                                         f"({why}); written at opset {FALLBACK_OPSET} instead (pass `--opset` "
                                         "to choose)")
    return check


def onnx_opset(gm, opts, options) -> int:
    if "opset" in opts:
        return int(opts["opset"])
    if options.opset is not None:
        return options.opset
    # LayerNormalization needs >= 17; RMSNormalization exists from 23: below it, it would be decomposed
    return 23 if op_counts(gm).get("rms_norm") else 18


class _Program:
    """The rewritten graph's ExportedProgram, exported on first use and shared by every output; for the
    ONNX exporter (which retraces), the graph as a program without that trace."""

    def __init__(self, run, result):
        self.run, self.result, self.ep = run, result, None
        self._untraced, self._refused = None, False

    def untraced(self):
        """:func:`program_of_graph` of the rewritten graph; None when it cannot be built or the graph is
        traced already (then that program serves)."""
        if self.ep is not None or self._refused:
            return None
        if self._untraced is None:
            from ..backends.torch_backend import program_of_graph
            self._untraced = program_of_graph(self.result.graph_module)
            self._refused = self._untraced is None
        return self._untraced

    def __call__(self):
        if self.ep is None:
            from ..backends.torch_backend import export_graph
            self.run.say("exporting the rewritten graph")
            loaded = self.run.loaded
            self.ep, warnings = export_graph(self.result.graph_module, loaded.example_args, loaded.example_kwargs)
            self.result.report.setdefault("warnings", []).extend(warnings)
        return self.ep


def check_inputs(run) -> list:
    """The inputs an ONNX output is checked on: two at the example shape and every one at another shape."""
    from ..frontend.shapes import input_shapes
    example = input_shapes(run.loaded.example_args, run.loaded.example_kwargs)
    others = [x for x in run.verify_set if input_shapes(*x) != example]
    return run.verify_set[:2] + others


def write_outputs(run, result) -> None:
    """Write every output the run asks for (`-o` and the pipeline's `export` steps); only called once verified."""
    from ..backends import onnx_backend, torch_backend
    gm, loaded = result.graph_module, run.loaded
    program = _Program(run, result)
    targets = []
    if run.options.output is not None:
        targets.append((format_of(run.options.output), Path(run.options.output), {}))
    for ex in run.exports:
        if ex.path is not None:
            targets.append((ex.format, Path(ex.path), ex.options))
    hf_plans = {}
    if any(fmt == "hf" for fmt, _, _ in targets):  # refused before anything at all is written
        hf_plans = plan_hf_dir(run, result)
    for fmt, path, opts in targets:
        if fmt == "torch" or (fmt == "onnx" and program.untraced() is None):
            program()  # its own progress stage, before the writing one
        run.say(f"writing {path}")
        if fmt == "hf":
            write_hf(run, result, path, hf_plans)
        elif fmt == "torch":
            torch_backend.save_pt2(gm, loaded.example_args, loaded.example_kwargs, path, program=program())
        elif fmt == "safetensors":
            torch_backend.save_state_dict(gm, path)
        elif fmt == "onnx" and getattr(run, "quantized", None) is not None:  # the `quantize` step's plan
            from ..quantize.run import write_onnx_int8
            done = write_onnx_int8(run.quantized, loaded.example_args, loaded.example_kwargs, path,
                                   run.calib_inputs or run.inputs(32)[1:], opset=onnx_opset(gm, opts, run.options))
            result.report.setdefault("int8", []).append({"path": str(path), "quantize": _plain_dict(done)})
        elif fmt == "onnx" and opts.get("quantize") is not None:
            write_int8(run, gm, path, opts, result, program())
        elif fmt == "onnx":
            check = _write_checked_onnx(run, result, gm, path, opts, program)
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
                                     opset=onnx_opset(gm, opts, run.options), program=program())
            tensorrt_backend.build_engine(onnx_path, path, fp16=bool(opts.get("fp16", False)))
        result.outputs.append(str(path))
        result.report["outputs"].append({"format": fmt, "path": str(path)})

def plan_hf_dir(run, result) -> dict:
    """The original canonical graph and the layout plan of `-o OUTDIR/`; raises LayoutRefused."""
    from ..checkpoint import plan_layout
    from ..checkpoint.hf_dir import refuse_if_no_place
    from .runner import prepare_graph
    before = result.before if result.before is not None else prepare_graph(run.loaded)[0]
    plan = plan_layout(before, result.graph_module, run.loaded.module)
    refuse_if_no_place(plan, run.loaded.module)
    return {"before": before}


def write_hf(run, result, path: Path, plans: dict) -> None:
    from ..checkpoint import write_hf_dir
    # the input directory (normc.frontend.hf sets hf_dir; API callers may set source_dir)
    src = getattr(run.loaded, "hf_dir", None) or getattr(run.loaded, "source_dir", None)
    done = write_hf_dir(run.loaded.module, plans["before"], result.graph_module, path, source_dir=src,
                        verify_inputs=run.verify_set[:3], say=run.say,
                        max_shard_bytes=getattr(run.options, "max_shard_bytes", None) or DEFAULT_SHARD_BYTES)
    result.report.setdefault("checkpoint", []).append(done.to_dict())


def write_int8(run, gm, path: Path, opts: dict, result, program=None) -> None:
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
                                 opset=onnx_opset(gm, opts, run.options), program=program)
        done = quantize_int8(fp32, path, calib)
    check = onnx_backend.check_onnx(path, gm, run.verify_set, Tolerance(max_rel=1.0))
    result.report.setdefault("int8", []).append({
        "path": str(path), "calibration_samples": len(calib), "quantize": _plain_dict(done),
        "max_rel_err": check.max_rel_err, "min_cosine": check.min_cosine})


def _plain_dict(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return {k: v for k, v in dataclasses.asdict(obj).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    return {}


def format_of(path) -> str:
    """The output format of `-o PATH`; a path ending in / (or an existing directory) is a checkpoint directory."""
    if str(path).endswith(("/", os.sep)) or Path(path).is_dir():
        return "hf"
    path = Path(path)
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
                     "use a .pt2 (torch.export), .onnx, .safetensors or .engine (TensorRT) file name, "
                     "or a directory ending in / (a checkpoint in the original layout)")
