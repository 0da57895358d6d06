"""Verification inputs: sampled from declared input specs, or cast for float64 runs."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

Inputs = list[tuple[tuple, dict]]


def sample_inputs(specs: Sequence[Any] | Mapping[str, Any], n: int, seed: int = 0) -> Inputs:
    """``n`` deterministic input sets from specs that have ``.sample(generator) -> Tensor``.

    A sequence of specs gives positional arguments in that order; a mapping
    ``{name: spec}`` gives keyword arguments. One CPU generator seeded with ``seed``
    draws every sample in turn, so the same (specs, n, seed) always gives the same
    tensors and the first k of n samples equal the k samples of a shorter run.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    out: Inputs = []
    for _ in range(n):
        if isinstance(specs, Mapping):
            out.append(((), {name: spec.sample(gen) for name, spec in specs.items()}))
        else:
            out.append((tuple(spec.sample(gen) for spec in specs), {}))
    return out


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Cast every floating tensor (at any depth) to ``dtype``; integer/bool tensors stay."""

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(dtype)
        return x

    return [(pytree.tree_map(cast, tuple(args)), pytree.tree_map(cast, dict(kwargs or {})))
            for args, kwargs in inputs]
