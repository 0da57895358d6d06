"""The model of a checkpoint directory without its weights, cut into units that fit in memory.

* `build_meta`: the architecture from config.json on the meta device (no weight allocated);
  non-persistent buffers (rotary tables) are computed on the CPU as `from_pretrained` does.
* `find_blocks`: the repeated blocks (`model.layers.{i}`, `h.{i}`, `encoder.layer.{i}`,
  `decoder.layers.{i}`): the longest ModuleList of same-typed children whose parameters are in
  the checkpoint.
* `LazyCheckpoint`: tensors read on demand from the safetensors shards (memory-mapped).
* `Skeleton`: the model with every block replaced by a stub; run on the token ids it yields the
  hidden states entering block 0 and each block's keyword arguments (masks, rotary tables); run
  with the final hidden states it computes the head (final norm + lm_head) as its own unit.
* `BlockUnit`: one block as a module of (hidden, *tensor kwargs) -> hidden, for the rules engine.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..checkpoint.writer import checkpoint_files
from ..errors import NormcError

BLOCK_PATTERNS = (r"(^|\.)layers$", r"(^|\.)h$", r"(^|\.)layer$", r"(^|\.)blocks$")


class LazyCheckpoint:
    """key -> tensor, read from the shard holding it when asked (safe_open memory-maps the file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.where = checkpoint_files(self.folder)
        if not self.where:
            raise NormcError(f"`{folder}` holds no safetensors checkpoint",
                             "give a directory with model.safetensors or model.safetensors.index.json")
        self._open: dict[Path, object] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def _file(self, path: Path):
        from safetensors import safe_open
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path]

    def close(self) -> None:
        """Unmap the shards: pages read so far stay in this process's RSS while a shard is open."""
        for f in self._open.values():
            exit_ = getattr(f, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._open.clear()

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self._file(self.where[key]).get_tensor(key)

    def slice_info(self, key: str):
        sl = self._file(self.where[key]).get_slice(key)
        return tuple(sl.get_shape()), sl.get_dtype()

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.where.values()))

    def dtype(self) -> torch.dtype:
        """The floating dtype most of the checkpoint's bytes are in."""
        from safetensors.torch import _getdtype  # the mapping safetensors itself uses
        counts: dict[str, int] = {}
        for k in self.keys():
            shape, dt = self.slice_info(k)
            n = 1
            for s in shape:
                n *= s
            counts[dt] = counts.get(dt, 0) + n
        floats = {d: c for d, c in counts.items() if d in ("F64", "F32", "F16", "BF16")}
        return _getdtype(max(floats, key=floats.get)) if floats else torch.float32


def read_config(folder: str | Path):
    from transformers import AutoConfig
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise NormcError(f"`{folder}` has no config.json", "streaming needs a Hugging Face checkpoint directory")
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def model_class(config):
    import transformers
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise NormcError("config.json names no architecture transformers has",
                     "set `architectures` in config.json (e.g. [\"LlamaForCausalLM\"])")


def build_meta(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device; non-persistent buffers real (CPU)."""
    cls = model_class(config)
    config._attn_implementation = "sdpa"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    for mod in model.modules():
        names = [n for n, b in mod.named_buffers(recurse=False)
                 if b is not None and b.is_meta and n in mod._non_persistent_buffers_set]
        if not names:
            continue
        for n in names:
            mod._buffers[n] = torch.empty_like(mod._buffers[n], device="cpu")
        model._init_weights(mod)  # what from_pretrained does: recompute rotary tables etc.
    return model


@dataclass
class Blocks:
    path: str               # "model.layers"
    modules: nn.ModuleList

    def prefix(self, i: int) -> str:
        return f"{self.path}.{i}."


def find_blocks(model: nn.Module, keys: list[str]) -> Blocks:
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if not any(re.search(p, name) for p in BLOCK_PATTERNS):
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(k.startswith(f"{name}.0.") for k in keys):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise NormcError(f"no repeated blocks found in {type(model).__name__}",
                         "streaming needs a ModuleList of blocks (model.layers.{i}, h.{i}, encoder.layer.{i})")
    return Blocks(*best)


class _Stub(nn.Module):
    """Stands where block i was: records the keyword arguments it is called with and passes its
    input through (or, for the last block, returns the hidden states given to the skeleton)."""

    def __init__(self, index: int, last: bool):
        super().__init__()
        self.index, self.last = index, last
        self.record: dict | None = None
        self.final = None

    def forward(self, hidden, *args, **kwargs):
        if self.record is not None:
            self.record[self.index] = (hidden, args, kwargs)
        if self.last and self.final is not None:
            return self.final
        return hidden


class Skeleton(nn.Module):
    """The model with stubs for blocks: forward(ids, final_hidden) -> the model's first output."""

    def __init__(self, model: nn.Module, blocks: Blocks, input_name: str = "input_ids"):
        super().__init__()
        self.m = model
        self.input_name = input_name
        self.stubs = [_Stub(i, i == len(blocks.modules) - 1) for i in range(len(blocks.modules))]
        parent = model.get_submodule(blocks.path)
        self.real = list(parent)
        for i, s in enumerate(self.stubs):
            parent[i] = s

    def forward(self, ids, final_hidden):
        self.stubs[-1].final = final_hidden
        try:
            out = self.m(**{self.input_name: ids})
        finally:
            self.stubs[-1].final = None
        return out[0] if not isinstance(out, torch.Tensor) else out

    @torch.no_grad()
    def block_inputs(self, ids) -> dict[int, tuple]:
        """(hidden entering block 0, per block (args, kwargs)) for one input."""
        rec: dict[int, tuple] = {}
        for s in self.stubs:
            s.record = rec
        try:
            self.m(**{self.input_name: ids})
        finally:
            for s in self.stubs:
                s.record = None
        return rec


class BlockUnit(nn.Module):
    """One block as (hidden, *tensors) -> hidden: the block's keyword arguments' tensors become inputs
    (they differ per input: masks, rotary tables), the rest stays fixed."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.block = block
        leaves, self.spec = tree_flatten((args, kwargs))
        self.tensor_at = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.fixed = [None if isinstance(x, torch.Tensor) else x for x in leaves]

    def flat_inputs(self, args: tuple, kwargs: dict) -> tuple:
        leaves, spec = tree_flatten((args, kwargs))
        if spec != self.spec:
            raise NormcError("the blocks' arguments change structure between inputs",
                             "give calibration inputs of one shape")
        return tuple(leaves[i] for i in self.tensor_at)

    def forward(self, hidden, *tensors):
        leaves = list(self.fixed)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        out = self.block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def load_unit(module: nn.Module, ckpt: LazyCheckpoint, prefix: str) -> list[str]:
    """Give `module`'s parameters and persistent buffers their checkpoint values (keys `prefix` + name)."""
    state = {}
    names = list(module.state_dict(keep_vars=True))
    for n in names:
        key = prefix + n
        if key not in ckpt.where:
            raise NormcError(f"the checkpoint has no `{key}`", "the directory's weights do not match its config.json")
        state[n] = ckpt.get(key)
    module.load_state_dict(state, strict=True, assign=True)
    ckpt.close()
    return [prefix + n for n in names]


def unload_unit(module: nn.Module) -> None:
    """Back to meta: the unit's memory is freed."""
    module.to_empty(device="meta")


def unit_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict(keep_vars=True).values())


def config_summary(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
