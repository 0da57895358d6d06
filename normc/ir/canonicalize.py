"""Turn a traced graph (torch.fx.symbolic_trace or torch.export) into the canonical vocabulary.

Every form a model was written in becomes one node per op: `nn.BatchNorm2d`, `F.batch_norm`,
`aten.batch_norm` and `aten._native_batch_norm_legit_no_training` all become `ops.batch_norm`
with the running statistics and affine as `get_attr` operands. The 1:1 translations live in
the tables below (data, not logic); multi-node recognizers (a decomposed RMSNorm chain) are
rules in the language (`normc/passes/std/recognize.nc`).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .graph import aten_base, delete_unused_submodules, module_path, module_type

aten = torch.ops.aten


class _Ctx:
    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        self.gm, self.node, self.graph = gm, node, gm.graph

    def param(self, owner: str, attr: str):
        mod = self.gm.get_submodule(owner)
        if getattr(mod, attr, None) is None:
            return None
        target = f"{owner}.{attr}" if owner else attr
        with self.graph.inserting_before(self.node):
            p = self.graph.get_attr(target)
        p.meta["normc_path"] = owner
        return p


def _tuple(v, n):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


# ------------------------------------------------------------------ nn.Module call sites
def _from_module(ctx: _Ctx, mod: nn.Module, args, kwargs):
    t = ctx.node.target
    x = args[0] if args else kwargs.get("input")
    describe = getattr(mod, "__normc_canonical__", None)
    if describe is not None:  # normc's own modules (normc.nn) say what they are
        found = describe()
        if found is None:
            return None
        name, param_names, attrs = found
        return name, [x] + [ctx.param(t, p) if p else None for p in param_names], attrs
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros":
        return "conv", [x, ctx.param(t, "weight"), ctx.param(t, "bias")], dict(
            stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and mod.padding_mode == "zeros" \
            and len(args) <= 1 and not kwargs.get("output_size"):
        return "conv_transpose", [x, ctx.param(t, "weight"), ctx.param(t, "bias")], dict(
            stride=mod.stride, padding=mod.padding, output_padding=mod.output_padding, groups=mod.groups,
            dilation=mod.dilation)
    if isinstance(mod, nn.Linear):
        return "linear", [x, ctx.param(t, "weight"), ctx.param(t, "bias")], {}
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        has_stats = mod.running_mean is not None
        return "batch_norm", [x, ctx.param(t, "running_mean"), ctx.param(t, "running_var"),
                              ctx.param(t, "weight"), ctx.param(t, "bias")], dict(
            eps=mod.eps, training=bool(mod.training or not has_stats), momentum=mod.momentum or 0.0)
    if isinstance(mod, nn.LayerNorm):
        return "layer_norm", [x, ctx.param(t, "weight"), ctx.param(t, "bias")], dict(
            normalized_shape=tuple(mod.normalized_shape), eps=mod.eps)
    if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
        return "rms_norm", [x, ctx.param(t, "weight")], dict(normalized_shape=tuple(mod.normalized_shape), eps=mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return "group_norm", [x, ctx.param(t, "weight"), ctx.param(t, "bias")], dict(groups=mod.num_groups, eps=mod.eps)
    if isinstance(mod, nn.Embedding) and mod.max_norm is None:
        return "embedding", [x, ctx.param(t, "weight")], dict(padding_idx=mod.padding_idx)
    if isinstance(mod, nn.ReLU):
        return "relu", [x], {}
    if isinstance(mod, nn.GELU):
        return "gelu", [x], dict(approximate=mod.approximate)
    if isinstance(mod, nn.SiLU):
        return "silu", [x], {}
    if isinstance(mod, nn.Tanh):
        return "tanh", [x], {}
    if isinstance(mod, nn.Sigmoid):
        return "sigmoid", [x], {}
    if isinstance(mod, nn.Softmax):
        return "softmax", [x], dict(dim=mod.dim if mod.dim is not None else -1)
    if isinstance(mod, (nn.Dropout, nn.Identity)):
        return "identity", [x], {}
    return None


# ------------------------------------------------------------------ functions and aten ops
def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _conv(a, k):
    w = _arg(a, k, 1, "weight")
    return "conv", [_arg(a, k, 0, "input"), w, _arg(a, k, 2, "bias")], dict(
        stride=_arg(a, k, 3, "stride", 1), padding=_arg(a, k, 4, "padding", 0),
        dilation=_arg(a, k, 5, "dilation", 1), groups=_arg(a, k, 6, "groups", 1))


def _aten_convolution(a, k):  # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    if _arg(a, k, 6, "transposed", False):
        return "conv_transpose", [a[0], a[1], a[2]], dict(stride=a[3], padding=a[4], output_padding=a[7],
                                                          groups=a[8], dilation=a[5])
    return "conv", [a[0], a[1], a[2]], dict(stride=a[3], padding=a[4], dilation=a[5], groups=a[8])


def _conv_transpose(a, k):  # F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return "conv_transpose", [_arg(a, k, 0, "input"), _arg(a, k, 1, "weight"), _arg(a, k, 2, "bias")], dict(
        stride=_arg(a, k, 3, "stride", 1), padding=_arg(a, k, 4, "padding", 0),
        output_padding=_arg(a, k, 5, "output_padding", 0), groups=_arg(a, k, 6, "groups", 1),
        dilation=_arg(a, k, 7, "dilation", 1))


def _linear(a, k):
    return "linear", [_arg(a, k, 0, "input"), _arg(a, k, 1, "weight"), _arg(a, k, 2, "bias")], {}


def _f_batch_norm(a, k):  # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    mean = _arg(a, k, 1, "running_mean")
    training = bool(_arg(a, k, 5, "training", False)) or mean is None
    return "batch_norm", [a[0], mean, _arg(a, k, 2, "running_var"), _arg(a, k, 3, "weight"), _arg(a, k, 4, "bias")], dict(
        eps=_arg(a, k, 7, "eps", 1e-5), training=training, momentum=_arg(a, k, 6, "momentum", 0.1) or 0.0)


def _aten_batch_norm(a, k):  # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
    training = bool(a[5]) or a[3] is None
    return "batch_norm", [a[0], a[3], a[4], a[1], a[2]], dict(eps=a[7], training=training, momentum=a[6] or 0.0)


def _aten_bn_no_training(a, k):  # (input, weight, bias, running_mean, running_var, momentum, eps) -> tuple
    return "batch_norm", [a[0], a[3], a[4], a[1], a[2]], dict(eps=a[6], training=False, momentum=a[5] or 0.0)


def _aten_bn_legit(a, k):
    """Batch statistics (training=True), e.g. weight standardization over a conv weight. Overloads:
    `no_stats(input, weight, bias, training, momentum, eps)` and
    `default(input, weight, bias, running_mean, running_var, training, momentum, eps)` -> tuple."""
    if len(a) == 6:
        return "batch_norm", [a[0], None, None, a[1], a[2]], dict(eps=a[5], training=bool(a[3]), momentum=a[4] or 0.0)
    if len(a) == 8:
        return "batch_norm", [a[0], a[3], a[4], a[1], a[2]], dict(eps=a[7], training=bool(a[5]), momentum=a[6] or 0.0)
    return None


def _norm_shape(v):
    """normalized_shape as written: a tuple of sizes, or a graph value (`x.shape[-1:]`) resolved once shapes are known."""
    return v if isinstance(v, fx.Node) else tuple(_tuple(v, 1))


def _f_layer_norm(a, k):  # F.layer_norm(input, normalized_shape, weight, bias, eps)
    return "layer_norm", [a[0], _arg(a, k, 2, "weight"), _arg(a, k, 3, "bias")], dict(
        normalized_shape=_norm_shape(_arg(a, k, 1, "normalized_shape")), eps=_arg(a, k, 4, "eps", 1e-5))


def _f_rms_norm(a, k):  # F.rms_norm(input, normalized_shape, weight, eps)
    return "rms_norm", [a[0], _arg(a, k, 2, "weight")], dict(
        normalized_shape=_norm_shape(_arg(a, k, 1, "normalized_shape")), eps=_arg(a, k, 3, "eps", None))


def _f_group_norm(a, k):  # F.group_norm(input, num_groups, weight, bias, eps)
    return "group_norm", [a[0], _arg(a, k, 2, "weight"), _arg(a, k, 3, "bias")], dict(
        groups=_arg(a, k, 1, "num_groups"), eps=_arg(a, k, 4, "eps", 1e-5))


def _f_embedding(a, k):  # F.embedding(input, weight, padding_idx, ...)
    if _arg(a, k, 3, "max_norm") is not None:
        return None
    return "embedding", [a[0], _arg(a, k, 1, "weight")], dict(padding_idx=_arg(a, k, 2, "padding_idx"))


def _aten_embedding(a, k):  # aten.embedding(weight, indices, padding_idx=-1, ...)
    pad = _arg(a, k, 2, "padding_idx", -1)
    return "embedding", [a[1], a[0]], dict(padding_idx=None if pad == -1 else pad)


def _aten_index_select(a, k):  # aten.index_select(table, 0, ids): rows of a table (XGLM's sinusoidal positions)
    if len(a) == 3 and a[1] == 0 and isinstance(a[0], fx.Node) and a[0].op == "get_attr":
        return "embedding", [a[2], a[0]], dict(padding_idx=None)
    return None


def _aten_index(a, k):  # aten.index(table, [ids]): table[ids]
    if len(a) == 2 and isinstance(a[0], fx.Node) and a[0].op == "get_attr" and isinstance(a[1], (list, tuple)) \
            and len(a[1]) == 1 and isinstance(a[1][0], fx.Node):
        return "embedding", [a[1][0], a[0]], dict(padding_idx=None)
    return None


def _binary(name):
    def convert(a, k):
        if _arg(a, k, 2, "alpha", 1) != 1 or len(a) < 2:
            return None
        return name, [a[0], a[1]], {}
    return convert


def _unary(name):
    return lambda a, k: (name, [a[0]], {})


def _gelu(a, k):
    return "gelu", [a[0]], dict(approximate=_arg(a, k, 1, "approximate", "none"))


def _softmax(a, k):
    if _arg(a, k, 2, "dtype", None) is not None or _arg(a, k, 2, "half_to_float", False) is True:
        return None
    return "softmax", [a[0]], dict(dim=_arg(a, k, 1, "dim", -1))


def _mean(a, k):
    dim = _arg(a, k, 1, "dim", None)
    if dim is None or _arg(a, k, 3, "dtype", None) is not None:
        return None
    return "reduce_mean", [a[0]], dict(dim=list(_tuple(dim, 1)), keepdim=bool(_arg(a, k, 2, "keepdim", False)))


def _pow(a, k):
    exp = _arg(a, k, 1, "exponent")
    if not isinstance(exp, (int, float)):
        return None
    return "power", [a[0]], dict(exponent=exp)


def _to_copy(a, k):
    if set(k) - {"dtype"} or len(a) > 1:
        return None
    return "cast", [a[0]], dict(dtype=k.get("dtype"))


def _type_as(a, k):  # x.type_as(other): a cast to other's dtype (a constant once dtypes are known)
    return ("cast", [a[0]], {"dtype": a[1]}) if len(a) == 2 and not k and isinstance(a[1], fx.Node) else None


def _identity(a, k):
    return None if k else ("identity", [a[0]], {})


def _clone(a, k):
    # eval-mode dropout is exported as a bare clone; `.contiguous()` is a clone with a memory
    # format, and a view after it relies on its strides, so that one stays
    return None if k or len(a) > 1 else ("identity", [a[0]], {})


def _getitem(a, k):
    # tensor indexing with slices/tuples; a bare int usually picks an element of a tuple output
    index = a[1] if len(a) > 1 else None
    if isinstance(index, slice) or (isinstance(index, tuple) and all(
            isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index)):
        return "getitem", [a[0]], {"index": index}
    return None


def _dropout(a, k):
    if _arg(a, k, 2, "training", _arg(a, k, 2, "train", False)):
        return None
    return "identity", [a[0]], {}


_FUNCTIONS = {
    F.conv1d: _conv, F.conv2d: _conv, F.conv3d: _conv, torch.conv1d: _conv, torch.conv2d: _conv, torch.conv3d: _conv,
    F.conv_transpose1d: _conv_transpose, F.conv_transpose2d: _conv_transpose, F.conv_transpose3d: _conv_transpose,
    F.linear: _linear, F.batch_norm: _f_batch_norm, F.layer_norm: _f_layer_norm, torch.layer_norm: _f_layer_norm,
    F.group_norm: _f_group_norm, F.embedding: _f_embedding,
    operator.add: _binary("add"), torch.add: _binary("add"), operator.sub: _binary("sub"), torch.sub: _binary("sub"),
    operator.mul: _binary("mul"), torch.mul: _binary("mul"), operator.truediv: _binary("div"), torch.div: _binary("div"),
    operator.matmul: _binary("matmul"), torch.matmul: _binary("matmul"), operator.pow: _pow, torch.pow: _pow,
    torch.rsqrt: _unary("inv_sqrt"), torch.mean: _mean, operator.getitem: _getitem,
    F.relu: _unary("relu"), torch.relu: _unary("relu"), F.gelu: _gelu, F.silu: _unary("silu"),
    torch.tanh: _unary("tanh"), torch.sigmoid: _unary("sigmoid"), F.sigmoid: _unary("sigmoid"), F.tanh: _unary("tanh"),
    torch.softmax: _softmax, F.softmax: _softmax, F.dropout: _dropout,
}
if hasattr(F, "rms_norm"):
    _FUNCTIONS[F.rms_norm] = _f_rms_norm

def _method_to(a, k):
    dtype = k.get("dtype", a[1] if len(a) > 1 else None)
    if (set(k) - {"dtype"}) or len(a) > 2:
        return None
    if isinstance(dtype, fx.Node) and dtype.op == "call_function" and getattr(dtype.target, "__name__", "") == "getattr" \
            and len(dtype.args) > 1 and dtype.args[1] == "dtype":
        return "cast", [a[0]], {"dtype": dtype}  # `.to(other.dtype)`: resolved once dtypes are known
    if not isinstance(dtype, torch.dtype):
        return None
    return "cast", [a[0]], {"dtype": dtype}


_METHODS = {"to": _method_to, "float": lambda a, k: ("cast", [a[0]], {"dtype": torch.float32}) if len(a) == 1 and not k else None,
            "pow": _pow, "rsqrt": _unary("inv_sqrt"), "mean": _mean, "add": _binary("add"), "sub": _binary("sub"), "mul": _binary("mul"), "div": _binary("div"),
            "matmul": _binary("matmul"), "relu": _unary("relu"), "sigmoid": _unary("sigmoid"), "type_as": _type_as,
            "detach": lambda a, k: ("identity", [a[0]], {}) if len(a) == 1 and not k else None,
            "tanh": _unary("tanh"), "softmax": _softmax}

_ATEN = {
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _aten_convolution, "linear": _linear,
    "conv_transpose1d": _conv_transpose, "conv_transpose2d": _conv_transpose, "conv_transpose3d": _conv_transpose,
    "batch_norm": _aten_batch_norm, "_native_batch_norm_legit_no_training": _aten_bn_no_training,
    "_native_batch_norm_legit": _aten_bn_legit,
    "layer_norm": _f_layer_norm, "native_layer_norm": _f_layer_norm, "rms_norm": _f_rms_norm,
    "group_norm": _f_group_norm, "embedding": _aten_embedding,
    "add": _binary("add"), "sub": _binary("sub"), "mul": _binary("mul"), "div": _binary("div"),
    "matmul": _binary("matmul"), "relu": _unary("relu"), "gelu": _gelu, "silu": _unary("silu"),
    "tanh": _unary("tanh"), "sigmoid": _unary("sigmoid"), "softmax": _softmax, "_softmax": _softmax,
    "dropout": _dropout, "alias": _identity, "detach": _identity, "type_as": _type_as,
    "index_select": _aten_index_select, "index": _aten_index, "clone": _clone, "mean": _mean, "pow": _pow, "rsqrt": _unary("inv_sqrt"), "_to_copy": _to_copy,
}
# ops that return a tuple whose first element is the result (the others are saved statistics)
_TUPLE_RESULT = {"_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_layer_norm"}


def _translate(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        return _from_module(_Ctx(gm, node), gm.get_submodule(node.target), node.args, node.kwargs)
    if node.op == "call_method":
        conv = _METHODS.get(node.target)
        return conv(node.args, node.kwargs) if conv else None
    if node.op == "call_function":
        if node.target in _FUNCTIONS:
            return _FUNCTIONS[node.target](node.args, node.kwargs)
        base = aten_base(node.target)
        if base is not None and base in _ATEN:
            if base.endswith("_") and base not in ("_softmax",):
                return None  # in-place variant: not ours to move
            return _ATEN[base](node.args, node.kwargs)
    return None


def _is_table(gm, node) -> bool:
    """A 2-d floating parameter or buffer: what an embedding looks rows up in."""
    from .graph import get_param
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    try:
        t = get_param(gm, node)
    except AttributeError:
        return False
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point()


def _integer_ids(node) -> bool:
    """Row indices (not a boolean mask), where the traced value says so."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    dtype = getattr(val, "dtype", None)
    return dtype is None or not (dtype.is_floating_point or dtype == torch.bool)


def _conv_attrs(gm, w, attrs):
    """stride/padding/dilation as tuples of the conv's rank, whatever form the model used."""
    from .graph import get_param
    try:
        rank = get_param(gm, w).dim() - 2 if isinstance(w, fx.Node) and w.op == "get_attr" else None
    except AttributeError:
        rank = None
    if rank is None:
        return attrs
    out = dict(attrs)
    for k in ("stride", "padding", "dilation", "output_padding"):
        v = out.get(k)
        if isinstance(v, int):
            out[k] = (v,) * rank
        elif isinstance(v, list):
            out[k] = tuple(v)
    return out


def _val_shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None and isinstance(node, fx.Node) and "normc_shape" in node.meta:
        return tuple(node.meta["normc_shape"])
    return tuple(val.shape) if hasattr(val, "shape") else None


def _is_view(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and aten_base(node.target) in ("view", "_unsafe_view", "reshape")


def _collapse_addmm(gm: fx.GraphModule) -> None:
    """HF Conv1D (GPT-2): view(x, [-1, in]) -> addmm(b, x2d, W[in, out]) -> view(.., [*, out]) becomes linear(x, W^T, b)."""
    from .graph import get_param, module_path, new_param
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or aten_base(node.target) != "addmm" or len(node.args) != 3 or node.kwargs:
            continue
        bias, x2d, w = node.args
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        weight = get_param(gm, w)
        if weight.dim() != 2:
            continue
        src, out = x2d, node
        if _is_view(x2d) and len(node.users) == 1 and _is_view(next(iter(node.users))):
            x = x2d.args[0]
            view_out = next(iter(node.users))
            xs, ys = _val_shape(x), _val_shape(view_out)
            if xs is not None and ys is not None and xs[:-1] == ys[:-1] and xs[-1] == weight.shape[0]:
                src, out = x, view_out
        path = module_path(node)
        target = new_param(gm, f"{path}.weight" if path else "weight", weight.t().contiguous())
        with graph.inserting_before(node):
            wt = graph.get_attr(target)
            wt.meta["normc_path"] = path
            new = graph.call_function(ops.linear, (src, wt, bias), {})
        new.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "val")})
        new.meta["normc_path"], new.meta["normc_module_type"] = path, module_type(node)
        out.replace_all_uses_with(new)
        for dead in (out, node):
            if not dead.users:
                graph.erase_node(dead)
        if isinstance(x2d, fx.Node) and not x2d.users:
            graph.erase_node(x2d)


def _transposed_param(gm: fx.GraphModule, node) -> fx.Node | None:
    """The 2-d parameter W when `node` is W.T in any spelling (`W.T`, `W.t()`, `aten.t`, `permute(W, [1, 0])`,
    `transpose(W, 0, 1)`), else None."""
    from .graph import get_param
    if not isinstance(node, fx.Node) or not node.args:
        return None
    src, rest = node.args[0], node.args[1:]
    if node.op == "call_function":
        base = aten_base(node.target)
        name = base or getattr(node.target, "__name__", "")
        if node.target is getattr and rest and rest[0] in ("T", "mT", "H", "mH"):
            name = "t"
    elif node.op == "call_method":
        name = node.target
    else:
        return None
    if name == "t" or name == "numpy_T":
        swaps = True
    elif name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        swaps = [int(d) % 2 for d in dims] == [1, 0]
    elif name in ("transpose", "swapaxes"):
        swaps = len(rest) == 2 and {int(d) % 2 for d in rest} == {0, 1}
    else:
        return None
    if not (swaps and isinstance(src, fx.Node) and src.op == "get_attr"):
        return None
    try:
        return src if get_param(gm, src).dim() == 2 else None
    except AttributeError:
        return None


def _weight_matmuls_to_linear(gm: fx.GraphModule) -> None:
    """`x @ W.T` by a weight parameter is a linear (Falcon's FalconLinear, hand-written projections); so is
    `x @ W` with W stored [in, out] (it gets a transposed copy, as GPT-2's Conv1D does). A bias added after it
    joins the linear in the recognizers (std.recognize: linear_bias)."""
    from .graph import get_param, module_path, new_param
    graph = gm.graph
    for node in list(graph.nodes):
        is_mm = node.op == "call_function" and (node.target is ops.matmul or aten_base(node.target) == "mm")
        if not is_mm or len(node.args) != 2 or node.kwargs:
            continue
        x, rhs = node.args
        w = _transposed_param(gm, rhs)
        if w is None and isinstance(rhs, fx.Node) and rhs.op == "get_attr":
            try:
                weight = get_param(gm, rhs)
            except AttributeError:
                continue
            if weight.dim() != 2 or not weight.is_floating_point():
                continue
            path = module_path(node)
            with graph.inserting_before(node):
                w = graph.get_attr(new_param(gm, f"{path}.weight" if path else "weight", weight.t().contiguous()))
            w.meta["normc_path"] = path
        if w is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(ops.linear, (x, w, None), {})
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val", "tensor_meta")})
        new.meta["normc_path"], new.meta["normc_module_type"] = module_path(node), module_type(node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def canonicalize(gm: fx.GraphModule, recognize: bool = True) -> fx.GraphModule:
    """Rewrite `gm` in place into canonical ops; returns it.

    With `recognize`, the standard recognizers (std.recognize: decomposed norms written
    as chains of small ops) run afterwards, so every spelling of a norm is one node.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        # torch.export's metadata assertions check dtypes/shapes it already fixed; they would
        # count as users of the values they check (and break single_use, fan-out matching)
        if node.op == "call_function" and aten_base(node.target) == "_assert_tensor_metadata" and not node.users:
            graph.erase_node(node)
    _collapse_addmm(gm)
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if node.op == "call_function" and node.target in ops.IMPL_TO_NAME:
            continue
        path, mtype = module_path(node), module_type(node)
        if node.op == "call_module":
            mtype = type(gm.get_submodule(node.target)).__name__
        translated = _translate(gm, node)
        if translated is None:
            continue
        name, operands, attrs = translated
        if name == "embedding" and not (_is_table(gm, operands[1]) and _integer_ids(operands[0])):
            continue
        if name == "identity":
            node.replace_all_uses_with(operands[0])
            graph.erase_node(node)
            continue
        if name in ("conv", "conv_transpose"):
            attrs = _conv_attrs(gm, operands[1], attrs)
        schema = ops.OPS[name]
        operands = list(operands) + [None] * (len(schema.operands) - len(operands))
        with graph.inserting_before(node):
            new = graph.call_function(schema.impl, tuple(operands), attrs)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val", "tensor_meta")})
        new.meta["normc_path"], new.meta["normc_module_type"] = path, mtype
        base = aten_base(node.target) if node.op == "call_function" else None
        if base in _TUPLE_RESULT:
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
            if node.users:  # statistics outputs are used: leave the original in place
                graph.erase_node(new)
                continue
        else:
            node.replace_all_uses_with(new)
        graph.erase_node(node)
    _weight_matmuls_to_linear(gm)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    delete_unused_submodules(gm)  # fx's own is quadratic in the number of modules
    if recognize:
        run_recognizers(gm)
    return gm


def drop_noop_casts(gm: fx.GraphModule) -> int:
    """Casts to the dtype a value already has (HF's `.to(torch.float32)` in an fp32 model). Needs shapes/dtypes."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ops.cast:
            src, dtype = node.args[0], node.kwargs.get("dtype")
            if isinstance(dtype, fx.Node):  # `.to(v.dtype)` or `.type_as(v)`: the dtype v had when traced
                dtype = _traced_dtype(dtype)
            if isinstance(src, fx.Node) and src.meta.get("normc_dtype") is not None \
                    and src.meta.get("normc_dtype") == dtype:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                n += 1
    if n:
        gm.recompile()
    return n


def drop_full_slices(gm: fx.GraphModule) -> int:
    """`x[:, 0:]`-style slices that keep every element (HF's `hidden[:, slice(-logits_to_keep, None)]` with
    logits_to_keep=0). A static trace folds them away; a dynamic one keeps them, and they would stand between
    a norm and the linear reading it. Start 0 (or None), step 1 and an end past any size: shape-independent."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or aten_base(node.target) != "slice":
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        start = node.kwargs.get("start", args[2])
        end = node.kwargs.get("end", args[3])
        step = node.kwargs.get("step", args[4])
        if start in (0, None) and step in (1, None) and (end is None or (type(end) is int and end >= 2 ** 62)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    if n:
        gm.recompile()
    return n


def _traced_dtype(node: fx.Node):
    """The dtype a cast's `dtype` operand stood for when traced: `v.dtype` or a tensor `v` (`type_as`)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "dtype":
        node = node.args[0]
    return node.meta.get("normc_dtype") if isinstance(node, fx.Node) else None


def resolve_with_shapes(gm: fx.GraphModule) -> None:
    """The canonicalization steps that need the shapes and dtypes of one run (`annotate_shapes` first):
    no-op casts dropped, `normalized_shape` read from a tensor (`x.shape[-1:]`) made a constant, static facts
    read from a value (its rank, its dtype) made constants, and shape-only readers moved past the
    shape-preserving op that reads the same value (so a BatchNorm wrapper's `x.shape` check does not count as a
    second user of the conv before it)."""
    drop_noop_casts(gm)
    drop_full_slices(gm)
    changed = _resolve_norm_shapes(gm) + _fold_static_facts(gm) + _sink_shape_readers(gm)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def _shape_of(node) -> tuple | None:
    return tuple(node.meta["normc_shape"]) if isinstance(node, fx.Node) and "normc_shape" in node.meta else None


def _shape_value(node):
    """The value of a shape expression over a traced value (`x.shape`, `x.size()`, `x.shape[-1:]`,
    `x.size(-1)`, a tuple of those), from the recorded shapes; None when it is not one."""
    if isinstance(node, (int, torch.SymInt)) and not isinstance(node, bool):
        return int(node)
    if isinstance(node, (list, tuple)):
        parts = [_shape_value(v) for v in node]
        return None if any(p is None for p in parts) else tuple(parts)
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
        return _shape_of(node.args[0])
    if node.op == "call_method" and node.target == "size":
        shape = _shape_of(node.args[0])
        if shape is None:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return shape if dim is None else shape[int(dim)]
    if node.op == "call_function" and node.target in (operator.getitem, ops.getitem) and node.args:
        base = _shape_value(node.args[0])
        index = node.args[1] if node.target is operator.getitem and len(node.args) == 2 else node.kwargs.get("index")
        if isinstance(base, tuple) and isinstance(index, (int, slice)):
            return base[index]
    return None


def _resolve_norm_shapes(gm: fx.GraphModule) -> int:
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (ops.layer_norm, ops.rms_norm):
            continue
        ns = node.kwargs.get("normalized_shape")
        if ns is None or not (isinstance(ns, fx.Node) or any(isinstance(v, fx.Node) for v in _tuple(ns, 1))):
            continue
        value = _shape_value(ns)
        if value is None:
            continue
        node.kwargs = {**node.kwargs, "normalized_shape": tuple(_tuple(value, 1))}
        n += 1
    return n


def _static_fact(node):
    """(True, value) for a read of a traced value's rank or dtype (fixed by tracing), else (False, None)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        src, attr = node.args
        if attr == "ndim" and _shape_of(src) is not None:
            return True, len(_shape_of(src))
        if attr == "dtype" and isinstance(src.meta.get("normc_dtype"), torch.dtype):
            return True, src.meta["normc_dtype"]
    if node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1 \
            and _shape_of(node.args[0]) is not None:
        return True, len(_shape_of(node.args[0]))
    return False, None


def _fold_static_facts(gm: fx.GraphModule) -> int:
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ops.cast and isinstance(node.kwargs.get("dtype"), fx.Node):
            dtype = _traced_dtype(node.kwargs["dtype"])  # `.to(v.dtype)`, `.type_as(v)`: fixed by tracing
            if isinstance(dtype, torch.dtype):
                node.kwargs = {**node.kwargs, "dtype": dtype}
                n += 1
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        known, value = _static_fact(node)
        if not known:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        n += 1
    return n


def reads_shape_only(node: fx.Node) -> bool:
    """A reader of a value's shape, size or rank only (not its values)."""
    if node.op == "call_method" and node.target in ("size", "dim", "ndimension"):
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.op == "call_function" and aten_base(node.target) == "sym_size"


# canonical ops whose output has the shape of their first operand, whatever the input
_SHAPE_PRESERVING = {ops.batch_norm, ops.layer_norm, ops.rms_norm, ops.group_norm, ops.fixed_norm, ops.norm_act,
                     ops.relu, ops.gelu, ops.silu, ops.tanh, ops.sigmoid, ops.softmax}


def _sink_shape_readers(gm: fx.GraphModule) -> int:
    """A shape reader of v moves to u when u = op(v, params...) is v's only value reader and keeps its shape
    (norms, activations); repeated down the chain. Its dependents that come before u move after u."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    moved = 0
    for v in list(graph.nodes):
        readers = [u for u in v.users if reads_shape_only(u)
                   and not (u.op == "call_function" and u.target is getattr and u.args[1] in ("dtype", "device"))]
        values = [u for u in v.users if not reads_shape_only(u)]
        if not readers or len(values) != 1:
            continue
        u = values[0]
        if u.op != "call_function" or u.target not in _SHAPE_PRESERVING or u.args[0] is not v \
                or _shape_of(u) is None or _shape_of(u) != _shape_of(v):
            continue
        # the readers and what depends on them, if placed before u, move right after u (keeping their order)
        late, todo = set(), list(readers)
        while todo:
            n = todo.pop()
            if n in late or order[n] > order[u]:
                continue
            late.add(n)
            todo.extend(n.users)
        if any(a in late for a in u.all_input_nodes):
            continue
        anchor = u
        for n in sorted(late, key=order.__getitem__):
            anchor.append(n)
            anchor = n
        for r in readers:
            r.replace_input_with(v, u)
        order = {n: i for i, n in enumerate(graph.nodes)}
        moved += len(readers)
    return moved


def run_recognizers(gm: fx.GraphModule) -> int:
    """Apply the std.recognize rules (multi-node patterns that become one canonical op).

    Costs next to nothing where nothing matches: candidates come from fx's index by op, the ops of
    their operands reject most at a glance (no near-miss reasons are built: nobody reads them), and
    the cleanup (dead code, unused parameters, recompile) runs once, only when something changed.
    The rules are parsed once per process."""
    from .rewrite import apply_rule, finish
    applied = 0
    for rule in _recognizers():
        applied += apply_rule(gm, rule, explain=False, cleanup=False).applied
    if applied:
        finish(gm)
    return applied


@functools.lru_cache(maxsize=1)
def _recognizers() -> tuple:
    from ..grammar.loader import load_std
    program = load_std()
    return tuple(program.rules[name] for name in program.groups.get("std.recognize", []))
