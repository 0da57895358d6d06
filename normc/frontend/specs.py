"""What a loaded model is: the module, example inputs, and how to draw more inputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Seed used whenever example inputs are drawn from declared input specs.
EXAMPLE_SEED = 0


@dataclass
class InputSpec:
    """How to draw fresh verification inputs for one forward argument.

    Floating dtypes: standard normal values, or uniform in ``[low, high)`` when both
    bounds are given. Integer and bool dtypes: uniform integers in ``[low, high)``
    (``low`` defaults to 0; ``high`` is required).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if self.is_floating:
            if self.low is not None and self.high is not None:
                u = torch.rand(self.shape, generator=generator, dtype=torch.float32)
                return (u * (self.high - self.low) + self.low).to(self.dtype)
            return torch.randn(self.shape, generator=generator, dtype=torch.float32).to(self.dtype)
        low = 0 if self.low is None else int(self.low)
        if self.high is None:
            if self.dtype == torch.bool:
                high = 2
            else:
                from normc.errors import NormcError

                raise NormcError(
                    f"input `{self.name}` has integer dtype {self.dtype} but no upper bound",
                    hint=f"give the value range of `{self.name}`, e.g. `in [0, vocab_size)`",
                )
        else:
            high = int(self.high)
        return torch.randint(low, high, self.shape, generator=generator, dtype=torch.int64).to(self.dtype)

    @classmethod
    def from_example(cls, name: str, t: torch.Tensor) -> "InputSpec":
        """A spec that draws tensors like ``t``: same shape and dtype; integers stay in the
        range observed in ``t`` (so token ids never exceed the vocabulary)."""
        if t.dtype.is_floating_point or t.dtype.is_complex:
            return cls(name, tuple(t.shape), t.dtype)
        if t.numel() == 0:
            return cls(name, tuple(t.shape), t.dtype, 0, 1)
        lo = int(t.min().item())
        hi = int(t.max().item()) + 1
        return cls(name, tuple(t.shape), t.dtype, lo, hi)


@dataclass
class LoadedModel:
    """A model ready to trace.

    ``module`` is always in ``eval()`` mode: normc is an inference compiler, and norm
    folding needs frozen statistics.

    ``input_specs`` has one spec per positional example argument, in order, followed by
    one per keyword example input (named after the keyword); use :meth:`sample_inputs`
    to draw a fresh ``(args, kwargs)`` pair with the same structure.
    """

    module: torch.nn.Module
    example_args: tuple
    example_kwargs: dict
    input_specs: list[InputSpec]
    source: str
    is_hf: bool
    # Set when the model came from a torch.export ``.pt2`` file: tracing reuses it.
    exported_program: Any = None
    notes: list[str] = field(default_factory=list)
    # Set when the model came from a Hugging Face directory (normc.frontend.hf): the directory,
    # its transformers config (a PretrainedConfig, as loaded: float32, use_cache=False) and the
    # tokenizer / preprocessor / generation files in it that a rebuilt directory should copy.
    hf_dir: Path | None = None
    hf_config: Any = None
    hf_files: list[Path] = field(default_factory=list)

    def sample_inputs(self, generator: torch.Generator) -> tuple[tuple, dict]:
        n = len(self.example_args)
        args = tuple(s.sample(generator) for s in self.input_specs[:n])
        kwargs = {s.name: s.sample(generator) for s in self.input_specs[n:]}
        return args, kwargs

    def run(self, args: tuple | None = None, kwargs: dict | None = None):
        """Run the eager module (no grad) on the example inputs or the given ones."""
        args = self.example_args if args is None else args
        kwargs = self.example_kwargs if kwargs is None else kwargs
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def eval(self) -> "LoadedModel":
        set_eval(self.module)
        return self


def set_eval(module: torch.nn.Module) -> None:
    """``module.eval()``, tolerating modules that refuse it (``ExportedProgram.module()``
    raises NotImplementedError from ``eval()``; its graph already fixed the mode)."""
    try:
        module.eval()
    except NotImplementedError:
        pass


def specs_from_examples(
    args: tuple, kwargs: dict, arg_names: list[str] | None = None
) -> list[InputSpec]:
    specs = []
    for i, a in enumerate(args):
        name = arg_names[i] if arg_names and i < len(arg_names) else f"arg{i}"
        specs.append(InputSpec.from_example(name, a))
    for k, v in kwargs.items():
        specs.append(InputSpec.from_example(k, v))
    return specs


def sample_examples(specs: list[InputSpec], seed: int = EXAMPLE_SEED) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(s.sample(g) for s in specs)


def forward_arg_names(module: torch.nn.Module) -> list[str]:
    """Names of the positional parameters of ``module.forward`` (best effort)."""
    import inspect

    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    return names
