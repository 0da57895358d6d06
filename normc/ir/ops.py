"""The canonical op vocabulary: one schema and one executable implementation per op.

A canonical graph is an `fx.GraphModule` whose nodes call these functions
(`call_function` with `target=ops.<name>`): operands are positional (activation
nodes or `get_attr` parameter nodes, `None` when absent), attributes are keyword
arguments. Because the implementations are plain functions over `torch.nn.functional`,
a canonical graph runs eagerly, re-traces with `torch.export` and exports to ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Operand:
    name: str
    optional: bool = False
    param: bool = False  # expected to be a parameter (a constant tensor), not an activation


@dataclass
class OpSchema:
    name: str
    operands: tuple[Operand, ...]
    attrs: dict[str, object] = field(default_factory=dict)  # name -> default
    impl: Callable | None = None
    doc: str = ""
    variadic: bool = False  # cat: one list operand

    @property
    def slots(self) -> list[str]:
        """Positional slots in a pattern: operands first, then attributes in order."""
        return [o.name for o in self.operands] + list(self.attrs)

    @property
    def min_operands(self) -> int:
        return sum(1 for o in self.operands if not o.optional)


# ------------------------------------------------------------------ implementations
def linear(x, w, b=None):
    return F.linear(x, w, b)


def conv(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return fn(x, w, b, stride, padding, dilation, groups)


def conv_transpose(x, w, b=None, *, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed convolution; the weight is [in, out/groups, k...] (output channels on dim 1, per group)."""
    fn = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[w.dim()]
    return fn(x, w, b, stride, padding, output_padding, groups, dilation)


def batch_norm(x, mean, var, weight=None, bias=None, *, eps=1e-5, training=False, momentum=0.1):
    return F.batch_norm(x, mean, var, weight, bias, training, momentum, eps)


def layer_norm(x, weight=None, bias=None, *, normalized_shape=None, eps=1e-5):
    shape = normalized_shape if normalized_shape is not None else (x.shape[-1],)
    return F.layer_norm(x, tuple(shape), weight, bias, eps)


def rms_norm(x, weight=None, *, normalized_shape=None, eps=None):
    shape = normalized_shape if normalized_shape is not None else (x.shape[-1],)
    return F.rms_norm(x, tuple(shape), weight, eps)


def crms_norm(x, weight=None, bias=None, *, eps=1e-5, expand=True):
    """Compressed RMSNorm (Jiang et al. 2023) of a zero-mean vector stored without its last
    coordinate: n' = x / sqrt((sum x^2 + (sum x)^2) / d + eps), d = x.shape[-1] + 1.
    With `expand`, returns the full normalised vector [n', -sum n'] with the affine applied."""
    d = x.shape[-1] + 1
    s = x.sum(-1, keepdim=True)
    n = x * torch.rsqrt(((x * x).sum(-1, keepdim=True) + s * s) / d + eps)
    if not expand:
        return n
    full = torch.cat([n, -n.sum(-1, keepdim=True)], dim=-1)
    if weight is not None:
        full = full * weight
    return full + bias if bias is not None else full


def group_norm(x, weight=None, bias=None, *, groups=1, eps=1e-5):
    return F.group_norm(x, groups, weight, bias, eps)


def fixed_norm(x, scale, shift=None, *, dim=-1):
    """A per-channel affine with frozen statistics along `dim` (UN, PowerNorm, eval BN in a transformer)."""
    shape = [1] * x.dim()
    shape[dim] = -1
    y = x * scale.reshape(shape)
    return y + shift.reshape(shape) if shift is not None else y


def embedding(ids, table, *, padding_idx=None):
    return F.embedding(ids, table, padding_idx)


def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b


def div(a, b):
    return a / b


def matmul(a, b):
    return torch.matmul(a, b)


def relu(x):
    return F.relu(x)


def gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def silu(x):
    return F.silu(x)


def tanh(x):
    return torch.tanh(x)


def sigmoid(x):
    return torch.sigmoid(x)


def softmax(x, *, dim=-1):
    return torch.softmax(x, dim)


def getitem(x, *, index=None):
    return x[index]


def _tracing() -> bool:
    """True while torch.export / dynamo / fx trace us: they must see the plain ops, not a kernel."""
    import torch.fx._symbolic_trace as st
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or st.is_fx_tracing() or torch.jit.is_tracing()


def reduce_mean(x, *, dim=-1, keepdim=False):
    return torch.mean(x, dim=dim, keepdim=keepdim)


def power(x, *, exponent=2):
    return x ** exponent  # a tensor, or a size in a dynamic graph's shape arithmetic (DINOv2's `(n // k) ** 2`)


def inv_sqrt(x):
    return torch.rsqrt(x)


def cast(x, *, dtype=None):
    return x.to(dtype) if dtype is not None else x


_ACT = {"relu": relu, "gelu": gelu, "silu": silu, "tanh": tanh, "sigmoid": sigmoid}


def norm_act(x, weight=None, bias=None, mean=None, var=None, *, norm="layer_norm", activation="gelu", eps=1e-5,
             normalized_shape=None, groups=1, approximate="none"):
    """A norm followed by an activation, as one op (a fused Triton kernel on CUDA where one exists)."""
    if eps is None:  # RMSNorm's default: the dtype's machine epsilon (as F.rms_norm does)
        eps = torch.finfo(x.dtype).eps
    if x.is_cuda and norm in ("layer_norm", "rms_norm") and not _tracing():
        from ..kernels import norm_act_triton
        if norm_act_triton.is_available():
            return norm_act_triton.norm_act_triton(x, weight, bias, norm=norm, activation=activation, eps=eps,
                                                   approximate=approximate)
    if norm == "layer_norm":
        y = layer_norm(x, weight, bias, normalized_shape=normalized_shape, eps=eps)
    elif norm == "rms_norm":
        y = rms_norm(x, weight, normalized_shape=normalized_shape, eps=eps)
    elif norm == "group_norm":
        y = group_norm(x, weight, bias, groups=groups, eps=eps)
    elif norm == "batch_norm":
        y = batch_norm(x, mean, var, weight, bias, eps=eps)
    else:
        raise ValueError(f"norm_act: unknown norm {norm!r}")
    return gelu(y, approximate=approximate) if activation == "gelu" else _ACT[activation](y)


def _op(name, operands, attrs=None, impl=None, doc=""):
    ops = tuple(Operand(*o) if isinstance(o, tuple) else Operand(o) for o in operands)
    return OpSchema(name, ops, dict(attrs or {}), impl, doc)


OPS: dict[str, OpSchema] = {s.name: s for s in [
    _op("linear", ["x", ("w", False, True), ("b", True, True)], {}, linear, "y = x W^T + b"),
    _op("conv", ["x", ("w", False, True), ("b", True, True)],
        {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}, conv, "convolution of rank 1, 2 or 3"),
    _op("conv_transpose", ["x", ("w", False, True), ("b", True, True)],
        {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}, conv_transpose,
        "transposed convolution of rank 1, 2 or 3; weight [in, out/groups, k...]"),
    _op("batch_norm", ["x", ("mean", True, True), ("var", True, True), ("weight", True, True), ("bias", True, True)],
        {"eps": 1e-5, "training": False, "momentum": 0.1}, batch_norm, "batch norm (eval: frozen statistics)"),
    _op("layer_norm", ["x", ("weight", True, True), ("bias", True, True)],
        {"normalized_shape": None, "eps": 1e-5}, layer_norm, "layer norm over the trailing dims"),
    _op("rms_norm", ["x", ("weight", True, True)], {"normalized_shape": None, "eps": None}, rms_norm,
        "RMS norm over the trailing dims"),
    _op("crms_norm", ["x", ("weight", True, True), ("bias", True, True)], {"eps": 1e-5, "expand": True}, crms_norm,
        "compressed RMSNorm of a d-1 dim zero-mean stream; expand: the full d-dim output with affine"),
    _op("group_norm", ["x", ("weight", True, True), ("bias", True, True)], {"groups": 1, "eps": 1e-5},
        group_norm, "group norm"),
    _op("fixed_norm", ["x", ("scale", False, True), ("shift", True, True)], {"dim": -1}, fixed_norm,
        "per-channel affine with frozen statistics"),
    _op("norm_act", ["x", ("weight", True, True), ("bias", True, True), ("mean", True, True), ("var", True, True)],
        {"norm": "layer_norm", "activation": "gelu", "eps": 1e-5, "normalized_shape": None, "groups": 1,
         "approximate": "none"}, norm_act, "norm followed by an activation, one op"),
    _op("embedding", ["ids", ("table", False, True)], {"padding_idx": None}, embedding, "table lookup"),
    _op("add", ["a", "b"], {}, add), _op("sub", ["a", "b"], {}, sub), _op("mul", ["a", "b"], {}, mul),
    _op("div", ["a", "b"], {}, div), _op("matmul", ["a", "b"], {}, matmul),
    _op("relu", ["x"], {}, relu), _op("gelu", ["x"], {"approximate": "none"}, gelu), _op("silu", ["x"], {}, silu),
    _op("tanh", ["x"], {}, tanh), _op("sigmoid", ["x"], {}, sigmoid), _op("softmax", ["x"], {"dim": -1}, softmax),
    # structural ops: what decomposed norms are made of, so recognizers can be written as rules
    _op("reduce_mean", ["x"], {"dim": -1, "keepdim": False}, reduce_mean, "mean over dims"),
    _op("power", ["x"], {"exponent": 2}, power, "x ** exponent"),
    _op("inv_sqrt", ["x"], {}, inv_sqrt, "1 / sqrt(x)"),
    _op("cast", ["x"], {"dtype": None}, cast, "dtype conversion"),
    _op("getitem", ["x"], {"index": None}, getitem, "tensor indexing x[index] (slices, ints, none)"),
]}

# Ops whose two operands may be matched in either order.
COMMUTATIVE = {"add", "mul"}

# Pattern names that mean "this op, with a constraint": conv2d is conv with a 4-d weight.
ALIASES: dict[str, tuple[str, int]] = {"conv1d": ("conv", 3), "conv2d": ("conv", 4), "conv3d": ("conv", 5),
                                       "conv_transpose1d": ("conv_transpose", 3), "conv_transpose2d": ("conv_transpose", 4),
                                       "conv_transpose3d": ("conv_transpose", 5)}

IMPL_TO_NAME: dict[Callable, str] = {s.impl: s.name for s in OPS.values() if s.impl is not None}


def schema_for(pattern_name: str) -> tuple[OpSchema, int | None] | None:
    """The schema a pattern name refers to, and the weight rank it requires (for conv1d/2d/3d)."""
    if pattern_name in ALIASES:
        base, rank = ALIASES[pattern_name]
        return OPS[base], rank
    if pattern_name in OPS:
        return OPS[pattern_name], None
    return None


def all_pattern_names() -> list[str]:
    return sorted(list(OPS) + list(ALIASES))
