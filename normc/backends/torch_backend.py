"""Torch outputs: an exported program (.pt2) and a state dict (.safetensors or torch.save)."""
from __future__ import annotations

import copy

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from normc.atomic import atomic_path
from normc.errors import NormcError


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS_LINE = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:\s*(.*)$")
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first informative line of an exception, for an error message meant for people.

    Understands the ONNX exporter's long reports: the line under "## Exception summary"
    is the real cause; "The following call raised this error" names the user's line.
    """
    text = _ANSI.sub("", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    kind = type(exc).__name__
    line = lines[0] if lines else ""
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        if rest:
            m = _CLASS_LINE.match(rest[0])
            kind, line = (m.group(1), m.group(2)) if m else (kind, rest[0])
    where = ""
    if "The following call raised this error:" in lines:
        rest = lines[lines.index("The following call raised this error:") + 1:]
        m = _USER_FRAME.search(rest[0]) if rest else None
        if m:
            where = f" (at {m.group(1)}:{m.group(2)})"
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{kind}: {line}{where}" if line else kind


def export_program(module: nn.Module, example_args: tuple, example_kwargs: dict | None = None):
    """``torch.export.export(strict=False)`` with failures as NormcError."""
    try:
        return torch.export.export(module, tuple(example_args), kwargs=dict(example_kwargs or {}), strict=False)
    except NormcError:
        raise
    except Exception as exc:  # torch raises many kinds here; the user needs one line
        raise NormcError(
            f"torch.export failed: {one_line(exc)}",
            hint="check that the example inputs match the model's forward signature; "
            "data-dependent Python control flow cannot be exported",
        ) from exc


def _plain_spec(spec):
    """The same tree with dict subclasses (Hugging Face ModelOutput) as plain dicts: the archive then
    loads with torch alone, without the library that defined the output class."""
    if spec.is_leaf():
        return spec
    children = [_plain_spec(c) for c in spec.children_specs]
    kind, context = spec.type, spec.context
    if isinstance(kind, type) and issubclass(kind, dict) and kind is not dict and isinstance(context, (list, tuple)):
        kind, context = dict, list(context)
    return pytree.TreeSpec(kind, context, children)


def plain_outputs(module: nn.Module) -> nn.Module:
    """A copy of a graph module (from torch.export) whose outputs are plain containers; other modules as they are."""
    codegen = getattr(getattr(module, "graph", None), "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return module
    plain = _plain_spec(info.out_spec)
    if plain == info.out_spec:
        return module
    module = copy.deepcopy(module)
    module.graph._codegen.pytree_info = info._replace(out_spec=plain)
    module.recompile()
    return module


def save_pt2(module: nn.Module, example_args: tuple, example_kwargs: dict | None, path: str | os.PathLike) -> Path:
    """Export ``module`` with ``torch.export`` and save the program to ``path`` atomically.

    Hugging Face output classes become plain dicts (same keys), so loading needs torch only."""
    path = Path(path)
    ep = export_program(plain_outputs(module), example_args, example_kwargs)
    with atomic_path(path) as tmp:
        # a file object: torch.export.save warns on names that do not end in .pt2
        with open(tmp, "wb") as f:
            torch.export.save(ep, f)
    return path


def load_pt2(path: str | os.PathLike) -> nn.Module:
    """Load a .pt2 file written by :func:`save_pt2` as a callable module."""
    path = Path(path)
    if not path.is_file():
        raise NormcError(f"no such file: {path}", hint="give the path of a .pt2 file written by `normc export torch`")
    try:
        with open(path, "rb") as f:
            return torch.export.load(f).module()
    except Exception as exc:
        raise NormcError(f"cannot load {path} as a torch.export program: {one_line(exc)}",
                         hint="the file must be written by torch.export.save (normc export torch)") from exc


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except Exception:  # tensors without storage (meta, fake)
        return (t.device.type, id(t))


def plain_state_dict(module: nn.Module | dict) -> dict[str, torch.Tensor]:
    """A detached state dict where no two tensors share memory and all are contiguous.

    Aliased entries (tied weights, views of one buffer) are cloned so that every key is
    written and the file loads with ``safetensors.torch.load_file`` into any consumer.
    """
    sd = module if isinstance(module, dict) else module.state_dict()
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue  # extra state objects cannot go into safetensors
        t = t.detach()
        key = _storage_key(t)
        if key in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(key)
        out[name] = t
    return out


def save_state_dict(module: nn.Module | dict, path: str | os.PathLike) -> Path:
    """Write the module's weights: ``.safetensors`` by extension, otherwise ``torch.save``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = plain_state_dict(module)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    else:
        sd: Any = module if isinstance(module, dict) else module.state_dict()
        with atomic_path(path) as tmp:
            torch.save(sd, tmp)
    return path
