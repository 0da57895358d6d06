"""Static INT8 quantization of an ONNX model with onnxruntime (QDQ format).

``quantize_int8`` = ``onnxruntime.quantization.quantize_static`` with:

* **QDQ format** (QuantizeLinear/DequantizeLinear pairs around float ops): the format ORT's
  CPU kernels are optimized for since 1.11; ORT fuses ``DQ -> MatMul -> Q`` into integer
  kernels at session creation, and the file stays a standard ONNX graph other runtimes
  (TensorRT) read.
* **weights QInt8, symmetric, per output channel** (``per_channel=True``; MatMul weights are
  ``[in, out]``, so the channel axis is 1, ORT's default for MatMul).
* **activations QUInt8, asymmetric** (MinMax calibration): the combination ORT recommends
  for x86-64 (U8S8: ``VPMADDUBSW`` / VNNI ``VPDPBUSD`` multiply unsigned activations by
  signed weights). Asymmetric uint8 also spends the codes of one-sided ranges (post-GELU
  activations) instead of wasting half of them. ``reduce_range`` (7-bit weights) is needed
  on x86 without VNNI, where U8S8 products saturate (see :mod:`normc.backends.cpu_features`);
  by default it is on exactly there.
  ``activation_type="int8"`` (symmetric int8, S8S8) is the choice for ARM or TensorRT.
* by default only the **linears** are quantized (``MatMul``/``Gemm`` with a constant weight:
  ``MatMulConstBOnly``): the W8A8 scheme of SmoothQuant / OS+ and of
  :mod:`normc.verify.quant_sim`. ``linears_only=False`` quantizes every op ORT can
  (attention matmuls, adds, ...).

Calibration inputs are normc's ``(args, kwargs)`` pairs, fed to the graph inputs exactly as
:func:`normc.backends.onnx_backend.run_onnx` does (keyword tensors by name, the remaining
graph inputs take the positional tensors in order). ``quant_pre_process`` (shape inference
and ORT graph optimisations, as ORT recommends) runs first when ``preprocess=True``; if it
fails the unprocessed model is quantized and the report says why. The output is written
atomically (temporary file in the target folder, then renamed).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np


from normc.atomic import atomic_path
from normc.backends.cpu_features import cpu_features, default_reduce_range
from normc.backends.onnx_backend import _iter_nodes, onnx_op_counts
from normc.backends.torch_backend import one_line
from normc.errors import BackendMissing, NormcError

Inputs = list[tuple[tuple, dict]]

_ACT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def onnx_feed(graph_inputs: Sequence[str], args: tuple, kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """The ``{graph input name: array}`` feed for one ``(args, kwargs)`` (``run_onnx``'s mapping)."""
    from .onnx_backend import onnx_feed as feed
    return feed(graph_inputs, args, kwargs, hint="calibrate with the same arguments the model was exported with")


def _reader_class():
    try:
        from onnxruntime.quantization import CalibrationDataReader
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise BackendMissing("onnxruntime.quantization is not available",
                             hint="pip install 'onnxruntime>=1.18'") from exc

    class TorchInputsReader(CalibrationDataReader):
        """Feeds normc calibration inputs to ORT's calibrator (re-iterable via ``rewind``)."""

        def __init__(self, graph_inputs: Sequence[str], inputs: Inputs):
            self.feeds = [onnx_feed(graph_inputs, a, k) for a, k in inputs]
            self._it = iter(self.feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.feeds)

        def __len__(self):
            return len(self.feeds)

    return TorchInputsReader


def calibration_reader(onnx_path: str | os.PathLike, inputs: Inputs):
    """A ``CalibrationDataReader`` over ``inputs`` for the model at ``onnx_path``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return _reader_class()(names, inputs)


@dataclass
class QuantizeReport:
    path: Path
    settings: dict
    op_counts: dict[str, int]
    n_calibration: int
    seconds: float
    preprocessed: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_quantize(self) -> int:
        return self.op_counts.get("QuantizeLinear", 0)

    @property
    def n_dequantize(self) -> int:
        return self.op_counts.get("DequantizeLinear", 0)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "settings": self.settings, "op_counts": self.op_counts,
                "n_calibration": self.n_calibration, "seconds": round(self.seconds, 3),
                "preprocessed": self.preprocessed, "notes": list(self.notes)}


@contextlib.contextmanager
def _quiet_ort():
    """ORT's quantizer logs through the root logger ('Please consider to run pre-processing')."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    calibration_inputs: Inputs,
    per_channel: bool = True,
    *,
    activation_type: str = "uint8",
    linears_only: bool = True,
    op_types: Sequence[str] | None = None,
    reduce_range: bool | None = None,
    preprocess: bool = True,
    gemm: bool = True,
    calibrate_method: str = "minmax",
    nodes_to_exclude: Sequence[str] | None = None,
    extra_options: dict | None = None,
    policy: Any = None,
) -> QuantizeReport:
    """Quantize ``onnx_in`` to INT8 QDQ with static activation scales from
    ``calibration_inputs``; write ``onnx_out`` atomically; return what was done.

    ``activation_type``: ``"uint8"`` (asymmetric, x86 default) or ``"int8"`` (symmetric).
    ``reduce_range``: 7-bit weights; None chooses for this CPU (on where U8S8 saturates).
    ``op_types``: the ONNX op types to quantize (default ``MatMul``, ``Gemm`` when
    ``linears_only``, else every op ORT supports). ``calibrate_method``: ``minmax``,
    ``entropy`` or ``percentile``. ``gemm``: rewrite every remaining MatMul(+bias Add) linear
    as ``Reshape -> Gemm -> Reshape`` before quantizing (see :func:`_linears_to_gemm`).
    ``policy``: per-linear settings (normc.quantize.ort.PlanPolicy): ``prepare(path, out) -> bool``
    rewrites the float model first (True when it wrote ``out``), ``decide(path, linears) ->
    (linears to quantize statically, tensor overrides, notes)``, ``finish(path) -> notes`` edits
    the quantized model in place.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:  # pragma: no cover
        raise BackendMissing("onnxruntime.quantization is not available", hint="pip install 'onnxruntime>=1.18'") from exc
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if not onnx_in.is_file():
        raise NormcError(f"ONNX model `{onnx_in}` does not exist", hint="export the model to ONNX first")
    if not calibration_inputs:
        raise NormcError("INT8 quantization needs calibration inputs",
                         hint="give calibration data: a tensor file, a text file, or input specs")
    act = _ACT_TYPES.get(str(activation_type).lower())
    if act is None:
        raise NormcError(f"activation type `{activation_type}` is not supported", hint="use uint8 or int8")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    method = methods.get(str(calibrate_method).lower())
    if method is None:
        raise NormcError(f"calibration method `{calibrate_method}` is unknown", hint="use " + ", ".join(methods))
    if op_types is None and linears_only:
        op_types = ["MatMul", "Gemm"]
    options = {"MatMulConstBOnly": bool(linears_only)}
    if linears_only:
        # W8A8: quantize the linears' inputs and weights, keep their outputs in float (ORT then
        # runs DQ->MatMul as MatMulIntegerToFloat instead of re-quantizing every output)
        options["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
    if act == "QInt8":
        options["ActivationSymmetric"] = True
    cpu = cpu_features()
    if reduce_range is None:
        reduce_range = default_reduce_range(cpu)
    options.update(extra_options or {})
    settings = {"format": "QDQ", "weights": "int8 symmetric " + ("per-channel" if per_channel else "per-tensor"),
                "activations": ("uint8 asymmetric" if act == "QUInt8" else "int8 symmetric") + ", per-tensor static",
                "op_types": list(op_types) if op_types else "all", "calibrate_method": str(calibrate_method),
                "reduce_range": bool(reduce_range), "cpu": cpu.describe(), "extra_options": {k: _plain(v) for k, v in options.items()}}

    t0 = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="normc-quant-") as scratch:
        source = onnx_in
        preprocessed = False
        if policy is not None and policy.prepare(source, Path(scratch) / "prepared.onnx"):
            source = Path(scratch) / "prepared.onnx"
        if preprocess:
            pre = Path(scratch) / "preprocessed.onnx"
            try:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                with _quiet_ort():
                    quant_pre_process(str(source), str(pre), skip_symbolic_shape=False)
                source, preprocessed = pre, True
            except Exception as exc:  # pre-processing is an optimisation, not a requirement
                notes.append(f"quant_pre_process failed ({one_line(exc)}); quantized the model as exported")
        if gemm:
            converted = _linears_to_gemm(source, Path(scratch) / "gemm.onnx")
            if converted:
                source = Path(scratch) / "gemm.onnx"
                notes.append(f"{converted} MatMul(+Add) linear(s) rewritten as Reshape-Gemm-Reshape "
                             "(onnxruntime fuses QDQ Gemm into int8 QGemm)")
        nodes_to_quantize = None
        if linears_only:
            source, nodes_to_quantize = _name_linears(source, Path(scratch) / "named.onnx", op_types)
            if not nodes_to_quantize:
                raise NormcError(f"`{onnx_in}` has no linear (MatMul/Gemm with a constant weight) to quantize",
                                 hint="pass linears_only=False to quantize every op onnxruntime can")
        if policy is not None:
            nodes_to_quantize, overrides, more = policy.decide(source, nodes_to_quantize)
            notes.extend(more)
            if overrides:
                options["TensorQuantOverrides"] = overrides
        reader = calibration_reader(source, calibration_inputs)
        try:
            with atomic_path(onnx_out) as tmp, _quiet_ort():
                if linears_only and not nodes_to_quantize:  # the policy keeps every linear float
                    import shutil
                    shutil.copyfile(source, tmp)
                else:
                    quantize_static(
                        str(source),
                        str(tmp),
                        calibration_data_reader=reader,
                        quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types) if op_types else None,
                        per_channel=bool(per_channel),
                        reduce_range=bool(reduce_range),
                        activation_type=getattr(QuantType, act),
                        weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes_to_quantize,
                        nodes_to_exclude=list(nodes_to_exclude or []),
                        calibrate_method=method,
                        extra_options=options,
                    )
                if linears_only and nodes_to_quantize:
                    rewired = _float_bypass(tmp, set(nodes_to_quantize))
                    if rewired:
                        notes.append(f"{rewired} non-linear consumer(s) of quantized activations "
                                     "(residual adds) read the float tensor again")
                if policy is not None:
                    notes.extend(policy.finish(tmp))
        except NormcError:
            raise
        except Exception as exc:
            raise NormcError(f"onnxruntime could not quantize `{onnx_in}`: {one_line(exc)}",
                             hint="check that the model runs in onnxruntime and that the calibration "
                                  "inputs have the exported shapes") from exc
    counts = onnx_op_counts(onnx_out)
    if not counts.get("QuantizeLinear") and not counts.get("DequantizeLinear"):
        notes.append("no op was quantized (no MatMul/Gemm with a constant weight?)")
    return QuantizeReport(onnx_out, settings, counts, len(calibration_inputs), time.perf_counter() - t0,
                          preprocessed, notes)


def _static_shapes(model) -> dict[str, list[int]]:
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if dims and all(isinstance(d, int) and d > 0 for d in dims):
                shapes[vi.name] = dims
    return shapes


def splice_nodes(model, new_nodes: dict, removed: set, new_inits: list) -> None:
    """Rebuild `model.graph.node` in order: each node whose id is in `new_nodes` replaced by those nodes,
    those in `removed` dropped; `new_inits` appended to the initializers."""
    rebuilt = []
    for node in model.graph.node:
        if id(node) not in removed:
            rebuilt.extend(new_nodes.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    model.graph.initializer.extend(new_inits)


def _linears_to_gemm(path: Path, out_path: Path) -> int:
    """Rewrite ``MatMul(x, W) [+ Add(b)]`` with a constant 2-D ``W`` (and constant 1-D ``b``)
    on an input of rank >= 3 as ``Reshape(x, [-1, K]) -> Gemm(., W, b) -> Reshape([..., N])``.

    Why: onnxruntime (CPU) runs a QDQ ``Gemm`` as the int8 ``QGemm`` kernel, but a QDQ
    ``MatMul`` whose bias ``Add`` it keeps for its own attention / SkipLayerNorm fusions (BERT's
    Q/K/V and attention-output projections) stays ``DequantizeLinear -> float MatMul``:
    slower than fp32. Needs static shapes (normc exports them); other linears are left alone.
    Returns how many linears were rewritten (``out_path`` is written only when any)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes = _static_shapes(inferred)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    new_nodes, removed, new_inits = {}, set(), []
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        x_shape = shapes.get(node.input[0])
        if len(w.dims) != 2 or x_shape is None or len(x_shape) < 3:
            continue
        k, n_out = int(w.dims[0]), int(w.dims[1])
        out_name, bias, add = node.output[0], None, None
        users = consumers.get(out_name, [])
        if len(users) == 1 and users[0].op_type == "Add" and out_name not in graph_outputs:
            other = [i for i in users[0].input if i != out_name]
            if len(other) == 1 and other[0] in inits:
                b = numpy_helper.to_array(inits[other[0]])
                if b.size == n_out and b.ndim >= 1 and all(d == 1 for d in b.shape[:-1]):
                    add, out_name = users[0], users[0].output[0]
                    bias = other[0]
                    if b.ndim != 1:
                        bias = f"{node.name or node.output[0]}_gemm_bias"
                        new_inits.append(numpy_helper.from_array(b.reshape(n_out), bias))
        base = node.name or node.output[0]
        in_shape, out_shape = f"{base}_gemm_in_shape", f"{base}_gemm_out_shape"
        new_inits.append(numpy_helper.from_array(np.array([-1, k], dtype=np.int64), in_shape))
        new_inits.append(numpy_helper.from_array(np.array(x_shape[:-1] + [n_out], dtype=np.int64), out_shape))
        x2d, y2d = f"{base}_gemm_x2d", f"{base}_gemm_y2d"
        new_nodes[id(node)] = [
            helper.make_node("Reshape", [node.input[0], in_shape], [x2d], name=f"{base}/gemm_reshape_in"),
            helper.make_node("Gemm", [x2d, node.input[1]] + ([bias] if bias else []), [y2d], name=f"{base}/gemm"),
            helper.make_node("Reshape", [y2d, out_shape], [out_name], name=f"{base}/gemm_reshape_out"),
        ]
        if add is not None:
            removed.add(id(add))
        count += 1
    if not count:
        return 0
    splice_nodes(model, new_nodes, removed, new_inits)
    used = {i for n in _iter_nodes(model.graph) for i in n.input} | {o.name for o in model.graph.output}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(out_path))
    return count


def _name_linears(path: Path, named_path: Path, op_types: Sequence[str] | None) -> tuple[Path, list[str]]:
    """Names of the MatMul/Gemm nodes whose weight (input 1) is an initializer: the linears.
    Nodes without a name get one (written to ``named_path``; ``path`` is left alone)."""
    import onnx

    model = onnx.load(str(path))
    types = set(op_types or ("MatMul", "Gemm"))
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    renamed = False
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"normc_node_{i}"
            while name in used:
                name += "_"
            node.name, renamed = name, True
            used.add(name)
    linears = [n.name for n in model.graph.node
               if n.op_type in types and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts)]
    if renamed:
        onnx.save(model, str(named_path))
        return named_path, linears
    return path, linears


def _float_bypass(path: Path, quantized: set[str]) -> int:
    """In a QDQ model, let every consumer of a dequantized activation that is not a quantized
    linear read the float tensor the QuantizeLinear took (ORT rewires *all* consumers of a
    quantized tensor, so a residual add would otherwise see the int8-rounded value). Returns
    how many inputs were rewired; rewrites ``path`` in place when any."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_float = {n.output[0]: q_input[n.input[0]] for n in graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in q_input}
    outputs = {o.name for o in graph.output}
    rewired = 0
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in dq_float and name not in outputs:
                node.input[i] = dq_float[name]
                rewired += 1
    if rewired:
        onnx.save(model, str(path))
    return rewired


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


__all__ = ["QuantizeReport", "calibration_reader", "onnx_feed", "quantize_int8"]
