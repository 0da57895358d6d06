"""Small helpers over canonical fx graphs: op names, module paths, parameters, shapes."""
from __future__ import annotations

import operator
import re
from collections import Counter

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .ops import IMPL_TO_NAME

PARAM_STORE = "_normc"  # submodule that holds parameters created by rewrites

_METHOD_NAMES = {"view": "reshape", "reshape": "reshape", "permute": "permute", "transpose": "transpose",
                 "contiguous": "contiguous", "to": "to", "float": "to", "type_as": "to", "size": "size",
                 "mean": "mean", "pow": "pow", "rsqrt": "rsqrt", "sqrt": "sqrt", "expand": "expand",
                 "flatten": "reshape", "unsqueeze": "reshape", "squeeze": "reshape", "chunk": "split", "split": "split"}
_FUNCTION_NAMES = {operator.getitem: "getitem", torch.flatten: "reshape", torch.reshape: "reshape",
                   torch.cat: "cat", torch.permute: "permute", torch.transpose: "transpose",
                   torch.nn.functional.scaled_dot_product_attention: "sdpa"}
_ATEN_NAMES = {"view": "reshape", "_unsafe_view": "reshape", "reshape": "reshape", "flatten": "reshape",
               "unsqueeze": "reshape", "squeeze": "reshape", "permute": "permute", "transpose": "transpose",
               "t": "transpose", "cat": "cat", "split": "split", "split_with_sizes": "split",
               "scaled_dot_product_attention": "sdpa", "_to_copy": "to", "to": "to", "clone": "contiguous",
               "contiguous": "contiguous", "expand": "expand", "slice": "slice", "select": "getitem",
               "mean": "mean", "pow": "pow", "rsqrt": "rsqrt", "sqrt": "sqrt", "neg": "neg", "exp": "exp",
               "max_pool2d": "max_pool", "max_pool1d": "max_pool", "adaptive_avg_pool2d": "avg_pool",
               "avg_pool2d": "avg_pool", "dropout": "dropout"}


def aten_base(target) -> str | None:
    """`aten.conv2d.default` -> `conv2d`; None for anything that is not an aten op overload."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return None


def op_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The canonical name of a node's op ('linear', 'layer_norm', 'reshape', ...), or its traced name."""
    if node.op == "call_function":
        if node.target in IMPL_TO_NAME:
            return IMPL_TO_NAME[node.target]
        if node.target in _FUNCTION_NAMES:
            return _FUNCTION_NAMES[node.target]
        base = aten_base(node.target)
        if base is not None:
            return _ATEN_NAMES.get(base.rstrip("_"), base)
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return _METHOD_NAMES.get(node.target, node.target)
    if node.op == "call_module":
        if gm is not None:
            return type(gm.get_submodule(node.target)).__name__
        return str(node.target)
    return None


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts = Counter(op_name(n, gm) for n in gm.graph.nodes
                     if n.op in ("call_function", "call_method", "call_module") and n.target != "_guards_fn")
    counts.pop("getitem", None)
    return dict(sorted(counts.items()))


def module_path(node: fx.Node) -> str:
    """The dotted path of the module a node came from ('' for the root)."""
    if "normc_path" in node.meta:
        return node.meta["normc_path"]
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path)
    return ""


def module_type(node: fx.Node) -> str:
    if "normc_module_type" in node.meta:
        return node.meta["normc_module_type"]
    stack = node.meta.get("nn_module_stack")
    if stack:
        t = list(stack.values())[-1][1]
        return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]
    return ""


def _clean_path(path: str) -> str:
    # torch.export may spell paths as "L['self'].layer1._modules['0']"; normalise to "layer1.0"
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def site_name(node: fx.Node) -> str:
    path = module_path(node)
    return f"{path} ({node.name})" if path else node.name


def is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def get_param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return _get_attr(gm, node.target)


def _get_attr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def param_users(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """Every node that reads the same parameter tensor as `node` (same target or same storage)."""
    tensor = get_param(gm, node)
    users = []
    for other in gm.graph.nodes:
        if other.op != "get_attr":
            continue
        if other.target == node.target:
            users.extend(other.users)
            continue
        try:
            t = _get_attr(gm, other.target)
        except AttributeError:
            continue
        if isinstance(t, torch.Tensor) and isinstance(tensor, torch.Tensor) and t.numel() and tensor.numel() \
                and t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            users.extend(other.users)
    return users


def new_param(gm: fx.GraphModule, base_name: str, value: torch.Tensor) -> str:
    """Register a tensor created by a rewrite; returns its get_attr target."""
    if not hasattr(gm, PARAM_STORE):
        gm.add_module(PARAM_STORE, torch.nn.Module())
    store = getattr(gm, PARAM_STORE)
    name = re.sub(r"[^0-9A-Za-z_]", "_", base_name).strip("_") or "p"
    candidate, i = name, 1
    while hasattr(store, candidate):
        i += 1
        candidate = f"{name}_{i}"
    store.register_parameter(candidate, torch.nn.Parameter(value.detach().contiguous(), requires_grad=False))
    return f"{PARAM_STORE}.{candidate}"


def drop_unused_params(gm: fx.GraphModule) -> None:
    """Remove parameters and buffers that no get_attr node reads any more, then empty submodules."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used or any(name.startswith(m + ".") for m in used_modules):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
    gm.delete_all_unused_submodules()


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Inputs in placeholder order, for running the graph node by node."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return pytree.tree_flatten((tuple(args), dict(kwargs)))[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args)
    for node in placeholders[len(args):]:
        default = node.args[0] if node.args else None  # symbolic_trace keeps forward's defaults here
        flat.append(kwargs.get(node.target.lstrip("*"), default))
    return flat


class _Recorder(fx.Interpreter):
    def __init__(self, gm, on_node):
        super().__init__(gm)
        self.on_node = on_node

    def run_node(self, n):
        out = super().run_node(n)
        self.on_node(n, out)
        return out


def run_recording(gm: fx.GraphModule, args: tuple, kwargs: dict, on_node) -> object:
    """Run the graph node by node, calling `on_node(node, value)` after each."""
    with torch.no_grad():
        return _Recorder(gm, on_node).run(*flat_inputs(gm, args, kwargs))


def annotate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Record every tensor-valued node's shape and dtype in meta (guards read them)."""
    def on_node(node, value):
        if isinstance(value, torch.Tensor):
            node.meta["normc_shape"] = tuple(value.shape)
            node.meta["normc_dtype"] = value.dtype
    run_recording(gm, args, kwargs, on_node)


def index_keeps_last_dim(index, rank: int) -> bool:
    """Whether x[index] (x of `rank` dims) leaves the last dim whole and last: such indexing
    commutes with anything per-channel (norm affines, centring over the hidden dim)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items):
        cut = [j for j, i in enumerate(items) if i is Ellipsis][0]
        return items[cut + 1:] in ((), (slice(None),))
    dim = 0
    for it in items:
        if it is None:
            if dim >= rank:  # a new axis after the last dim would move it
                return False
            continue
        if dim == rank - 1 and it != slice(None):
            return False
        dim += 1
    return True
