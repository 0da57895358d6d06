"""The plan lowered to onnxruntime's QDQ INT8 (through backends/quantize.quantize_int8).

ONNX linears (MatMul/Gemm with a constant weight) are tied to the plan's linears by their weight
values (exact bytes of the [out, in] float32 matrix): names change through export, ORT's
pre-processing and the Gemm rewrite, the weights do not. Per scheme:

* static uint8/int8 (default): ORT's `quantize_static` (QDQ, per-channel int8 weights); a
  symmetric-activation linear gets a `TensorQuantOverrides` entry on its input tensor;
* `first_tokens N`: before quantizing, the linear is split along the token axis into
  `Slice -> MatMul (+ bias)` for positions [0, N) and for the rest, then `Concat`: ORT calibrates
  and quantizes each half with its own static range (plain QDQ, fused into integer kernels);
* `keep fp32`: excluded from quantization;
* weight-only (`activations fp32`, W8A16-style): excluded, then its weight is replaced by the
  dequantized int8 weight, stored in float32 (onnxruntime's CPU optimizer would turn
  `DequantizeLinear(weight) -> MatMul` into dynamic int8 activations; the numbers are W8A16's,
  the file is not smaller);
* dynamic activations (`per_token` or `per_tensor`): excluded, then replaced by a subgraph of
  standard ops: run-time range (ReduceMin/ReduceMax over the last axis or the whole tensor),
  uint8/int8 quantization, `MatMulInteger` with the int8 weight, and the float rescale
  `(acc - zp * colsum(Wq)) * s_x * s_w + b` (what ORT's own integer kernels compute).

Not expressible here (refused with the reason): per_group weights (QDQ Gemm has no blocked
scales), a mix of weight ranges among statically quantized linears (reduce_range is one flag),
and different activation settings on linears that read the same tensor (QDQ quantizes a tensor once).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import NormcError
from .plan import LinearPlan, QuantPlan
from .simulate import InputStats, qrange, quant_weight

INT_MAX = 2**62


def _key(w: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest() + str(w.shape)


def _linear_weights(model) -> dict[str, tuple]:
    """{node name: (node, weight initializer name, [out, in] array)} for MatMul/Gemm with a constant weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2:
            continue
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        out[node.name or node.output[0]] = (node, node.input[1], w if trans_b else w.T)
    return out


class PlanPolicy:
    """The per-linear hooks `quantize_int8` calls (see backends/quantize.py)."""

    def __init__(self, plan: QuantPlan, stats: dict[str, InputStats]):
        self.plan, self.stats = plan, stats
        self.by_key: dict[str, LinearPlan] = {}
        for lp in plan.linears:
            k = _key(lp.weight.detach().float().cpu().numpy())
            other = self.by_key.get(k)
            if other is not None and other.scheme != lp.scheme:
                raise NormcError(f"`{lp.name}` and `{other.name}` share one weight but not one scheme",
                                 hint="give linears with the same weight the same settings")
            self.by_key[k] = lp
        for lp in plan.quantized:
            if lp.scheme.weight_granularity == "per_group":
                raise NormcError(f"onnxruntime's QDQ export cannot express per_group weights (`{lp.name}`)",
                                 hint="use per_channel for the ONNX export; per_group is simulated only")
        static = [lp for lp in plan.quantized if not lp.scheme.weight_only and not lp.scheme.act_dynamic]
        ranges = {lp.reduce_range(plan.cpu) for lp in static}
        if len(ranges) > 1:
            raise NormcError("statically quantized linears mix reduce_range and full_range weights; onnxruntime's "
                             "quantizer takes one flag", hint="give every static linear the same weight range")
        self.reduce_range = ranges.pop() if ranges else plan.cpu.u8s8_saturates
        grains = {lp.scheme.weight_granularity for lp in static}
        if len(grains) > 1:
            raise NormcError("statically quantized linears mix per_channel and per_tensor weights; onnxruntime's "
                             "quantizer takes one flag", hint="give every static linear the same weight granularity")
        self.per_channel = grains.pop() != "per_tensor" if grains else True
        self.found: dict[str, LinearPlan] = {}  # onnx node name -> plan
        self.notes: list[str] = []

    def _match(self, model) -> dict[str, tuple]:
        found = {}
        for name, (node, wname, w) in _linear_weights(model).items():
            lp = self.by_key.get(_key(w))
            if lp is not None:
                found[name] = (node, wname, w, lp)
        return found

    # -------------------------------------------------------------- before the Gemm rewrite
    def prepare(self, path: Path, out: Path) -> bool:
        """Split every `first_tokens N` linear along the token axis (each half its own range)."""
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(path))
        found = self._match(model)
        split = {name: v for name, v in found.items() if v[3].scheme.quantized and v[3].scheme.first_tokens
                 and not v[3].scheme.act_dynamic and v[3].scheme.act != "fp32"}
        if not split:
            return False
        inits = {i.name: i for i in model.graph.initializer}
        consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        outputs = {o.name for o in model.graph.output}
        new_nodes, removed, new_inits = {}, set(), []
        for name, (node, wname, _, lp) in split.items():
            if node.op_type != "MatMul":
                raise NormcError(f"`first_tokens` on `{lp.name}`: its ONNX linear is a {node.op_type}, not a MatMul "
                                 "on a [batch, tokens, channels] input", hint="drop first_tokens for this linear")
            n_head = lp.scheme.first_tokens
            x, y = node.input[0], node.output[0]
            bias, add = None, None
            users = consumers.get(y, [])
            if len(users) == 1 and users[0].op_type == "Add" and y not in outputs:
                other = [i for i in users[0].input if i != y]
                if len(other) == 1 and other[0] in inits:
                    bias, add, y = other[0], users[0], users[0].output[0]
            base = f"{name}_normc_first{n_head}"
            consts = {"s0": [0], "s1": [n_head], "e0": [n_head], "e1": [INT_MAX], "ax": [-2]}
            for k, v in consts.items():
                new_inits.append(numpy_helper.from_array(np.array(v, dtype=np.int64), f"{base}_{k}"))
            nodes = []
            parts = []
            for part, (s, e) in (("head", ("s0", "e0")), ("tail", ("s1", "e1"))):
                xs, ym = f"{base}_{part}_x", f"{base}_{part}_mm"
                nodes.append(helper.make_node("Slice", [x, f"{base}_{s}", f"{base}_{e}", f"{base}_ax"], [xs],
                                              name=f"{base}/{part}_slice"))
                nodes.append(helper.make_node("MatMul", [xs, wname], [ym], name=f"{base}/{part}_matmul"))
                if bias is not None:
                    yb = f"{base}_{part}_y"
                    nodes.append(helper.make_node("Add", [ym, bias], [yb], name=f"{base}/{part}_bias"))
                    ym = yb
                parts.append(ym)
            nodes.append(helper.make_node("Concat", parts, [y], axis=-2, name=f"{base}/concat"))
            new_nodes[id(node)] = nodes
            if add is not None:
                removed.add(id(add))
        from ..backends.quantize import splice_nodes
        splice_nodes(model, new_nodes, removed, new_inits)
        onnx.save(model, str(out))
        self.notes.append(f"{len(split)} linear(s) split at token {sorted({v[3].scheme.first_tokens for v in split.values()})}"
                          " (first tokens get their own static range)")
        return True

    # -------------------------------------------------------------- which nodes quantize_static takes
    def decide(self, path: Path, linears: list[str]):
        import onnx

        model = onnx.load(str(path))
        found = self._match(model)
        self.found = {name: v[3] for name, v in found.items()}
        missing = {lp.name for lp in self.plan.linears} - {lp.name for lp in self.found.values()}
        notes = list(self.notes)
        if missing:
            notes.append(f"{len(missing)} planned linear(s) not found in the ONNX graph (left float): "
                         + ", ".join(sorted(missing)[:4]))
        keep, overrides = [], {}
        by_input: dict[str, set] = {}
        for name in linears:
            lp = self.found.get(name)
            if lp is None:
                continue  # not a linear of the plan (e.g. a weight computed in the graph): left float
            sc = lp.scheme
            if not sc.quantized or sc.weight_only or sc.act_dynamic:
                continue
            keep.append(name)
            node = found[name][0]
            setting = ("int8" if sc.act == "int8" else "uint8", sc.act_symmetric or sc.act == "int8")
            by_input.setdefault(node.input[0], set()).add(setting)
            if setting != ("uint8", False):
                overrides[node.input[0]] = [{"quant_type": _quant_type(setting[0]), "symmetric": setting[1]}]
        for tensor, settings in by_input.items():
            if len(settings) > 1:
                raise NormcError(f"linears reading `{tensor}` ask for different activation settings; QDQ quantizes a "
                                 "tensor once", hint="give linears that share an input the same activation settings")
        return keep, overrides, notes

    # -------------------------------------------------------------- after quantize_static
    def finish(self, path: Path) -> list[str]:
        import onnx

        model = onnx.load(str(path))
        graph = model.graph
        nodes = {n.name: n for n in graph.node}
        todo = [(nodes[name], lp) for name, lp in self.found.items()
                if name in nodes and lp.scheme.quantized and (lp.scheme.weight_only or lp.scheme.act_dynamic)]
        if not todo:
            return []
        inits = {i.name: i for i in graph.initializer}
        replace: dict[int, list] = {}
        new_inits = []
        counts = {"weight-only": 0, "dynamic": 0}
        for node, lp in todo:
            if lp.scheme.weight_only:
                replace[id(node)] = self._weight_only(node, lp, inits, new_inits)
                counts["weight-only"] += 1
            else:
                replace[id(node)] = self._dynamic(node, lp, inits, new_inits)
                counts["dynamic"] += 1
        rebuilt = []
        for n in graph.node:
            rebuilt.extend(replace.get(id(n), [n]))
        del graph.node[:]
        graph.node.extend(rebuilt)
        graph.initializer.extend(new_inits)
        if counts["dynamic"] and not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in model.opset_import):
            raise NormcError("dynamic activations need ONNX opset >= 13 (ReduceMin with axes as input in 18)",
                             hint="export with opset 18")
        onnx.save(model, str(path))
        return [f"{v} linear(s) {k}" for k, v in counts.items() if v]

    def _qweight(self, node, lp: LinearPlan, inits):
        """(int8 weight in the node's layout, scales [out]) with the plan's rounding."""
        wq, s = quant_weight(lp.weight, lp.scheme, lp.reduce_range(self.plan.cpu))
        q = torch.round(wq / s.reshape(-1, 1)).to(torch.int8).numpy()
        s = s.numpy()
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        return (q if trans_b else q.T), s, (0 if trans_b else 1)

    def _weight_only(self, node, lp, inits, new_inits):
        """The dequantized int8 weight stored in float32. A `DequantizeLinear(int8 weight) -> MatMul`
        is not kept weight-only by onnxruntime: its extended graph optimizations turn it into dynamic
        int8 activations (measured: 2.5e-3 vs 1.8e-7 from the simulation with optimizations off)."""
        from onnx import numpy_helper

        q, s, axis = self._qweight(node, lp, inits)
        shape = [1, 1]
        shape[axis] = -1
        w = q.astype(np.float32) * s.astype(np.float32).reshape(shape)
        name = f"{node.name}_normc_w8_dequantized"
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
        node.input[1] = name
        return [node]

    def _dynamic(self, node, lp, inits, new_inits):
        from onnx import TensorProto, helper, numpy_helper

        sc = lp.scheme
        q, s, _ = self._qweight(node, lp, inits)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w_kn = q.T if trans_b else q  # [in, out] for MatMulInteger
        if node.op_type == "Gemm" and any(a.name in ("alpha", "beta", "transA") and
                                          (a.f not in (0.0, 1.0) or a.i) for a in node.attribute if a.name != "transB"):
            raise NormcError(f"dynamic activations on `{lp.name}`: its Gemm scales or transposes its input",
                             hint="keep this linear static or fp32")
        symmetric = sc.act_symmetric or sc.act == "int8"
        qmin, qmax = qrange(sc.act, symmetric)
        base = f"{node.name}_normc_dyn"

        def f32(name, v):
            return numpy_helper.from_array(np.asarray(v, dtype=np.float32), f"{base}_{name}")

        new_inits += [numpy_helper.from_array(np.ascontiguousarray(w_kn, dtype=np.int8), f"{base}_wq"),
                      f32("ws", s), f32("colsum", w_kn.astype(np.float64).sum(axis=0)),
                      f32("zero", 0.0), f32("range", float(qmax - qmin)), f32("qmin", float(qmin)),
                      f32("qmax", float(qmax)), f32("one", 1.0), f32("tiny", np.finfo(np.float32).tiny),
                      f32("mid", float(round((qmin + qmax) / 2.0))),
                      numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{base}_axes")]
        x = node.input[0]

        def n(op, ins, out_name, **kw):
            return helper.make_node(op, [f"{base}_{i}" for i in ins], [f"{base}_{out_name}"], name=f"{base}/{out_name}", **kw)

        per_token = sc.act_granularity == "per_token"
        red = {"keepdims": 1}
        out = [
            helper.make_node("ReduceMin", [x, f"{base}_axes"] if per_token else [x], [f"{base}_lo0"], name=f"{base}/lo0", **red),
            helper.make_node("ReduceMax", [x, f"{base}_axes"] if per_token else [x], [f"{base}_hi0"], name=f"{base}/hi0", **red),
            n("Min", ["lo0", "zero"], "lo1"), n("Max", ["hi0", "zero"], "hi1"),
        ]
        if symmetric:
            out += [n("Neg", ["lo1"], "nlo"), n("Max", ["nlo", "hi1"], "a"), n("Neg", ["a"], "lo"),
                    n("Identity", ["a"], "hi")]
        else:
            out += [n("Identity", ["lo1"], "lo"), n("Identity", ["hi1"], "hi")]
        out += [n("Sub", ["hi", "lo"], "span"), n("Div", ["span", "range"], "s0"),
                n("Less", ["s0", "tiny"], "small"), n("Where", ["small", "one", "s0"], "s")]
        if symmetric:
            out += [n("Identity", ["mid"], "zp")]
        else:
            out += [n("Div", ["lo", "s"], "los"), n("Sub", ["qmin", "los"], "zp0"), n("Round", ["zp0"], "zp1"),
                    n("Clip", ["zp1", "qmin", "qmax"], "zp")]
        xs = helper.make_node("Div", [x, f"{base}_s"], [f"{base}_xs"], name=f"{base}/xs")
        qtype = TensorProto.UINT8 if sc.act == "uint8" else TensorProto.INT8
        out += [xs, n("Round", ["xs"], "xr"), n("Add", ["xr", "zp"], "xz"), n("Clip", ["xz", "qmin", "qmax"], "xc"),
                n("Cast", ["xc"], "xq", to=qtype), n("MatMulInteger", ["xq", "wq"], "acc"),
                n("Cast", ["acc"], "accf", to=TensorProto.FLOAT), n("Mul", ["zp", "colsum"], "corr"),
                n("Sub", ["accf", "corr"], "acc2"), n("Mul", ["acc2", "s"], "y0")]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        y = node.output[0]
        if bias:
            out += [n("Mul", ["y0", "ws"], "y1"),
                    helper.make_node("Add", [f"{base}_y1", bias], [y], name=f"{base}/y")]
        else:
            out += [helper.make_node("Mul", [f"{base}_y0", f"{base}_ws"], [y], name=f"{base}/y")]
        return out


def _quant_type(kind: str):
    from onnxruntime.quantization import QuantType
    return QuantType.QInt8 if kind == "int8" else QuantType.QUInt8


def export_int8(plan: QuantPlan, stats: dict[str, InputStats], fp32_onnx: Path, out: Path, calib_inputs,
                preprocess: bool = True):
    """Quantize `fp32_onnx` (the exported planned graph) as `plan` says; write `out` atomically."""
    from ..backends.quantize import quantize_int8

    policy = PlanPolicy(plan, stats)
    report = quantize_int8(fp32_onnx, out, calib_inputs, policy.per_channel, reduce_range=policy.reduce_range, policy=policy,
                           preprocess=preprocess)
    report.settings["plan"] = plan.summary()
    return report


__all__ = ["PlanPolicy", "export_int8"]
