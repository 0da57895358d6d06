"""`-o OUTDIR/`: the rewritten model as a checkpoint directory in the original layout.

config.json + model.safetensors (sharded above a size, with the index), original keys, tokenizer /
preprocessor files copied from the input directory. Written into a temporary directory beside
OUTDIR, reloaded from there (`from_pretrained` for Hugging Face models) and compared with the
verified graph; only then renamed onto OUTDIR. Refused before anything is written when a change
has no place in the layout (see layout.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NormcError, VerificationFailed
from .layout import LayoutPlan, plan_layout
from .writer import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    atomic_dir_replace,
    checkpoint_files,
    copy_side_files,
    usual_permissions,
)


class LayoutRefused(NormcError):
    pass


@dataclass
class CheckpointWritten:
    path: str
    files: list[str] = field(default_factory=list)
    keys: int = 0
    changed_keys: int = 0
    identities: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    reload_check: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def refuse_if_no_place(plan: LayoutPlan, module: torch.nn.Module) -> None:
    if plan.ok:
        return
    shown = "; ".join(plan.problems[:6]) + (f"; and {len(plan.problems) - 6} more" if len(plan.problems) > 6 else "")
    raise LayoutRefused(
        f"cannot write a checkpoint in {type(module).__name__}'s layout: {len(plan.problems)} change(s) have no "
        f"place in it: {shown}",
        "write a .pt2 / .onnx / .safetensors file instead, or use rules that only change weights")


def keys_to_write(module: torch.nn.Module, plan: LayoutPlan, source_dir) -> list[str]:
    state = module.state_dict(keep_vars=True)
    source_keys = list(checkpoint_files(source_dir)) if source_dir else []
    if source_keys and all(k in state for k in source_keys):
        keys = [k for k in state if k in set(source_keys)]   # the input checkpoint's keys, in module order
    else:
        seen, keys = set(), []
        for k, t in state.items():  # tied tensors once (as save_pretrained does), unless they untie
            ident = (t.data_ptr(), tuple(t.shape), t.dtype)
            if ident in seen and k not in plan.untied:
                continue
            seen.add(ident)
            keys.append(k)
    keys += [k for k in plan.untied if k not in keys]
    return keys


def write_hf_dir(module: torch.nn.Module, before, after, target, *, source_dir=None, verify_inputs=(),
                 tolerance=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, say=None) -> CheckpointWritten:
    """Plan, write (temporary dir), reload and compare with `after`, then rename onto `target`."""
    say = say or (lambda m: None)
    target = Path(target)
    plan = plan_layout(before, after, module)
    refuse_if_no_place(plan, module)
    if target.exists() and not target.is_dir():
        raise NormcError(f"`{target}` exists and is not a directory", "give a new directory name ending in /")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        state = module.state_dict(keep_vars=True)
        keys = keys_to_write(module, plan, source_dir)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            write_config(config, source_dir, tmp, untie=bool(plan.untied))
        writer = ShardWriter(tmp, max_shard_bytes)
        for k in keys:
            writer.add(k, plan.updates.get(k, state[k]).detach())
        files = writer.finish()
        copied = copy_side_files(source_dir, tmp)
        say(f"reloading {target} to check it")
        check = reload_and_compare(module, tmp, after, verify_inputs, tolerance)
        if not check.passed:
            raise VerificationFailed(f"the checkpoint written for `{target}` does not reproduce the verified graph: "
                                     f"{check.summary()}", "report this with the model; write a .pt2 meanwhile")
        usual_permissions(tmp)
        atomic_dir_replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CheckpointWritten(str(target), ["config.json"] * (config is not None) + files + copied, len(keys),
                             len(plan.updates), plan.identities, plan.untied, check.to_dict())


def write_config(config, source_dir, folder: Path, untie: bool) -> None:
    src = Path(source_dir) / "config.json" if source_dir else None
    if src is not None and src.is_file():
        d = json.loads(src.read_text())     # the user's config as they wrote it (use_cache etc. untouched)
        if untie:
            d["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        return
    config = copy.deepcopy(config)
    if untie:
        config.tie_word_embeddings = False
    config.to_json_file(str(folder / "config.json"))


def reload_and_compare(module, folder: Path, after, inputs, tolerance):
    """Load the written directory the way a user would and compare it with the rewritten graph."""
    from ..verify import Tolerance, verify_models
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    tol = tolerance or Tolerance.default_for(dtype)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(module, PreTrainedModel):
        cfg = type(module.config).from_pretrained(str(folder))
        for attr in ("use_cache", "_attn_implementation"):
            if hasattr(module.config, attr):
                with contextlib.suppress(AttributeError, TypeError):  # read-only: keep the written one
                    setattr(cfg, attr, getattr(module.config, attr))
        reloaded, info = type(module).from_pretrained(str(folder), config=cfg, dtype=dtype, output_loading_info=True)
        reloaded.eval()
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise VerificationFailed(f"`from_pretrained` on the written checkpoint reports {bad}",
                                     "report this with the model")
        ref = reloaded
    else:
        from safetensors.torch import load_file
        loaded = {}
        for f in sorted(set(checkpoint_files(folder).values())):
            loaded.update(load_file(str(f)))
        merged = dict(module.state_dict(keep_vars=True))
        merged.update(loaded)

        def ref(*args, **kwargs):
            return torch.func.functional_call(module, merged, args, kwargs)
    with torch.no_grad():
        return verify_models(ref, after, list(inputs), tol)
