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
    return param_at(gm, node.target)


def param_at(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter (or buffer) a get_attr target names."""
    return _get_attr(gm, target)


def _get_attr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = _child(obj, part)
    return obj


def _child(obj, name: str):
    """getattr(obj, name), reading an nn.Module's parameter/buffer/submodule tables directly: the
    plain getattr first fails the normal lookup (an AttributeError inside) before nn.Module's
    __getattr__ finds them, which makes it the most expensive line of a rewrite."""
    d = getattr(obj, "__dict__", None)
    if isinstance(obj, torch.nn.Module) and name not in d:
        for table in ("_parameters", "_buffers", "_modules"):
            entries = d.get(table)
            if entries is not None and name in entries:
                return entries[name]
    return getattr(obj, name)


def live(node: fx.Node) -> bool:
    """Whether `node` is still in its graph (fx marks erased nodes with a private flag: read it here only)."""
    return not getattr(node, "_erased", False)


def erase_dead(graph: fx.Graph, nodes) -> int:
    """Erase each of `nodes` that nothing reads, then, transitively, the operands that nothing reads any
    more (what a rewritten site leaves behind). Side-effecting nodes stay. Returns the nodes examined."""
    stack = list(nodes)
    examined = 0
    while stack:
        node = stack.pop()
        examined += 1
        if not live(node) or node.users or not _pure(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        stack.extend(inputs)
    return examined


def _pure(node: fx.Node) -> bool:
    """Whether erasing an unread `node` changes nothing (canonical ops and parameters: known pure)."""
    if node.op == "get_attr" or (node.op == "call_function" and node.target in IMPL_TO_NAME):
        return True
    return not node.is_impure()


def _storage_key(gm: fx.GraphModule, target: str, tensors: dict | None = None):
    """What identifies the memory a parameter reads (tied weights share it); None for no tensor memory.
    `tensors`: the module's parameters and buffers by name, when the caller has them."""
    t = tensors.get(target) if tensors is not None else None
    if t is None:
        try:
            t = _get_attr(gm, target)
        except AttributeError:
            return None
    if not isinstance(t, torch.Tensor) or not t.numel() or t.device.type == "meta":
        return None
    return t.untyped_storage().data_ptr()


class ParamIndex:
    """The get_attr nodes that read each parameter, by target and by storage (tied weights, a module
    called twice): `users(node)` without scanning the graph. The rewriter adds the nodes it creates;
    erased nodes are skipped when read."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._by_target: dict[str, list[fx.Node]] = {}
        self._by_storage: dict[int, dict[str, None]] = {}
        self._key: dict[str, int | None] = {}
        self._built = False  # built on the first question (most rules never ask)

    def _build(self) -> None:
        self._built = True
        # one walk of the module's tables instead of a dotted lookup per get_attr node
        tensors = dict(self.gm.named_parameters(remove_duplicate=False))
        tensors.update(self.gm.named_buffers(remove_duplicate=False))
        for node in self.gm.graph.find_nodes(op="get_attr"):
            self.add(node, tensors)

    def add(self, node: fx.Node, tensors: dict | None = None) -> None:
        if not self._built:
            return  # the build will find it
        target = node.target
        self._by_target.setdefault(target, []).append(node)
        if target not in self._key:
            key = self._key[target] = _storage_key(self.gm, target, tensors)
            if key is not None:
                self._by_storage.setdefault(key, {})[target] = None

    def users(self, node: fx.Node) -> list[fx.Node]:
        """Every node that reads the same parameter tensor as `node` (same target or same storage)."""
        if not self._built:
            self._build()
        if node.target not in self._key:
            self.add(node)
        key = self._key[node.target]
        targets = [node.target] + [t for t in (self._by_storage.get(key, ()) if key is not None else ())
                                   if t != node.target]
        return [u for t in targets for n in self._by_target.get(t, ()) if live(n) for u in n.users]


def param_users(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """Every node that reads the same parameter tensor as `node` (same target or same storage).
    Scans the graph: code that asks repeatedly keeps a ParamIndex."""
    return ParamIndex(gm).users(node)


def new_param(gm: fx.GraphModule, base_name: str, value: torch.Tensor, taken: dict[str, int] | None = None) -> str:
    """Register a tensor created by a rewrite; returns its get_attr target.

    `taken` (name -> last suffix used) lets a caller that creates many parameters without deleting
    any skip the suffixes it already used (the names are the same, found in O(1))."""
    if not _has_attr(gm, PARAM_STORE):
        gm.add_module(PARAM_STORE, torch.nn.Module())
    store = _child(gm, PARAM_STORE)
    name = re.sub(r"[^0-9A-Za-z_]", "_", base_name).strip("_") or "p"
    i = taken.get(name, 1) if taken is not None else 1
    candidate = name if i == 1 else f"{name}_{i}"
    while _has_attr(store, candidate):
        i += 1
        candidate = f"{name}_{i}"
    if taken is not None:
        taken[name] = i
    store.register_parameter(candidate, torch.nn.Parameter(value.detach().contiguous(), requires_grad=False))
    return f"{PARAM_STORE}.{candidate}"


def _has_attr(module: torch.nn.Module, name: str) -> bool:
    """hasattr(module, name) without nn.Module's failing-lookup path (see _child)."""
    d = module.__dict__
    return name in d or any(name in d[t] for t in ("_parameters", "_buffers", "_modules")) \
        or hasattr(type(module), name)


def drop_unused_params(gm: fx.GraphModule) -> None:
    """Remove the parameters and buffers no get_attr node reads, and the submodules nothing reads.
    One walk of the module tree: whole unused modules go first, then the unread entries of the rest."""
    read = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    called = {n.target for n in gm.graph.find_nodes(op="call_module")}
    delete_unused_submodules(gm)
    for path, mod in gm.named_modules(remove_duplicate=False):
        if called and (path in called or _under_any(path, called)):
            continue  # a module that runs reads its own parameters
        prefix = f"{path}." if path else ""
        for store in (mod._parameters, mod._buffers):
            for attr in [a for a, v in store.items() if v is not None and prefix + a not in read]:
                del store[attr]


def delete_unused_submodules(gm: fx.GraphModule) -> None:
    """Delete the submodules no node reads (fx's delete_all_unused_submodules, with a set instead of
    its list: that one is quadratic in the number of modules)."""
    used: set[str] = set()
    for op in ("get_attr", "call_module"):
        for node in gm.graph.find_nodes(op=op):
            if not isinstance(node.target, str):
                continue
            parts = node.target.split(".")
            used.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
            if op == "call_module":
                try:
                    sub = gm.get_submodule(node.target)
                except AttributeError:
                    continue
                used.update(f"{node.target}.{name}" for name, _ in sub.named_modules() if name)
    doomed: list[str] = []
    for name, _ in gm.named_modules():
        if name and name not in used and not (doomed and name.startswith(doomed[-1] + ".")):
            doomed.append(name)  # named_modules is pre-order: a deleted module takes its children along
    for name in doomed:
        gm.delete_submodule(name)


def _under_any(name: str, modules: set[str]) -> bool:
    """Whether `name` lies inside one of `modules` (checks its own prefixes: O(depth), not O(modules))."""
    parts = name.split(".")
    return any(".".join(parts[:k]) in modules for k in range(1, len(parts)))


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


def _meta_value(node: fx.Node) -> torch.Tensor:
    """A node's recorded shape and dtype as a tensor without memory (raises KeyError when unknown)."""
    return torch.empty(node.meta["normc_shape"], dtype=node.meta["normc_dtype"], device="meta")


def _signature(value):
    """A hashable stand-in for an op's argument: a node by its recorded shape and dtype."""
    if isinstance(value, fx.Node):
        return ("node", tuple(value.meta["normc_shape"]), value.meta["normc_dtype"])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _signature(v)) for k, v in sorted(value.items()))
    if isinstance(value, torch.Tensor):
        raise TypeError("a tensor attribute: not cached")
    hash(value)
    return (type(value).__name__, value)  # 1, 1.0 and True are equal keys, not equal attributes


# (op, operand shapes/dtypes, attributes) -> (shape, dtype): running an op on meta tensors costs
# ~100x a dict lookup, and models repeat the same few signatures (one per block kind)
_SHAPE_CACHE: dict = {}
_SHAPE_CACHE_SIZE = 4096


def _call_shape(node: fx.Node):
    """Shape and dtype of a canonical op's output, from its operands' recorded ones."""
    key = None
    if node.target in IMPL_TO_NAME:  # canonical ops: the output shape depends on input shapes and attributes only
        try:
            key = (node.target, _signature(node.args), _signature(dict(node.kwargs)))
        except TypeError:  # an unhashable attribute
            key = None
        if key is not None and key in _SHAPE_CACHE:
            return _SHAPE_CACHE[key]
    args = fx.node.map_arg(node.args, _meta_value)
    kwargs = fx.node.map_arg(node.kwargs, _meta_value)
    with torch.no_grad():
        value = node.target(*args, **kwargs)
    out = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None
    if key is not None:
        if len(_SHAPE_CACHE) >= _SHAPE_CACHE_SIZE:
            _SHAPE_CACHE.clear()
        _SHAPE_CACHE[key] = out
    return out


def infer_shapes(gm: fx.GraphModule, nodes) -> list[fx.Node]:
    """Record shape and dtype on new `nodes` (in topological order) from their operands' recorded ones:
    parameters from their tensor, calls by running the op on meta tensors (no data, no whole-model run).
    Returns the nodes whose shape could not be inferred (an operand without a shape, an op meta cannot run)."""
    unknown = []
    for node in nodes:
        found = None
        try:
            if node.op == "get_attr":
                t = get_param(gm, node)
                found = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None
            elif node.op == "call_function":
                found = _call_shape(node)
        except Exception:  # noqa: BLE001 - no shape is recorded: readers say the shape is unknown
            found = None
        if found is not None:
            node.meta["normc_shape"], node.meta["normc_dtype"] = found
        else:
            unknown.append(node)
    return unknown


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
