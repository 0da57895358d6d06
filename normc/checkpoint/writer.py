"""Sharded safetensors writing (Hugging Face layout) and the side files of a checkpoint directory.

`ShardWriter` takes tensors one at a time and writes a shard as soon as it is full, so a caller
that streams blocks never holds more than one shard of output. Shards are written under
provisional names and renamed to `model-0000i-of-0000N.safetensors` by `finish()` once N is known;
a single shard is `model.safetensors` with no index (as `save_pretrained` writes it).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

DEFAULT_SHARD_BYTES = 5 * 1024**3
SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# files of an HF directory that describe how to feed the model, not its weights
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
NOT_SIDE_FILES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", "tf_model.h5"}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Write (key, tensor) pairs to safetensors shards of at most `max_shard_bytes` in `folder`."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # provisional file name, keys
        self.total_bytes = 0
        self.keys: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.keys:
            raise ValueError(f"key {key!r} written twice")
        self.keys.add(key)
        n = tensor_bytes(tensor)
        if self.pending and self.pending_bytes + n > self.max_shard_bytes:
            self.flush()
        # safetensors refuses views and tensors sharing storage: give it a compact copy only then
        t = tensor.detach()
        if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != n:
            t = t.contiguous().clone()
        self.pending[key] = t.cpu()
        self.pending_bytes += n
        self.total_bytes += n

    def add_all(self, items) -> None:
        for k, t in items:
            self.add(k, t)

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file
        name = f".shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata=self.metadata)
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index; return the file names."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("no tensors to write")
        if n == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / SAFE_NAME)
            return [SAFE_NAME]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_NAME]


def copy_side_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / preprocessor / generation files of an HF directory (not its weights or config)."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.suffix in SIDE_FILE_SUFFIXES and f.name not in NOT_SIDE_FILES \
                and not f.name.startswith(".") and not f.name.endswith(".safetensors"):
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied


def checkpoint_files(folder: str | os.PathLike) -> dict[str, Path]:
    """key -> shard file of a safetensors checkpoint directory (single file or sharded with an index)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    single = folder / SAFE_NAME
    if single.is_file():
        from safetensors import safe_open
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    return {}


def atomic_dir_replace(tmp: Path, target: Path) -> None:
    """Move a finished temporary directory onto `target` (an old directory there is moved aside first,
    then removed: the target is never half written)."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    old = None
    if target.exists():
        if any(target.iterdir()):
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
        else:
            target.rmdir()
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def usual_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: outputs get the umask's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
