"""Norms whose inference form is a frozen per-channel affine (canonical op `fixed_norm`).

`UnifiedNorm` (Yang et al., 2022, "Unified Normalization for Accelerating and Stabilizing
Transformers") at inference computes, over the last (feature) dim,

    y = gamma * x / sqrt(running_var + eps) + beta

where `running_var` is a running *uncentred* second moment E[x^2] (no mean is subtracted).
That is an affine per channel, so it folds exactly into the linear(s) that read it.

The module keeps the folded form ready: two non-persistent buffers

    scale = gamma / sqrt(running_var + eps)        shift = beta

are recomputed whenever the module is switched to eval (`eval()` / `train(False)`), after
`load_state_dict`, by `refresh()`, and lazily before an eval forward whenever the weight,
bias or running statistic changed since the last refresh (in-place edits bump a tensor's
version counter). The eval forward is exactly `normc.ir.ops.fixed_norm(x, scale, shift)`,
so the eager module and its canonical form compute the same thing bit for bit.

How normc sees it:
  * `torch.fx.symbolic_trace` traces through the module (it is not a `torch.nn` leaf);
    `fixed_norm` is registered with `torch.fx.wrap`, so the traced graph holds one
    `call_function(ops.fixed_norm, (x, get_attr scale, get_attr shift), {dim: -1})` node,
    which already is the canonical op.
  * A tracer that keeps the module as a leaf (`call_module`) reaches
    `__normc_canonical__`, which says the same thing: `("fixed_norm", ["scale", "shift"], {"dim": -1})`.
  * `torch.export` decomposes the call into `aten.mul` / `aten.add` on the two buffers.

Training: only a simple, correct training mode is provided: the batch's uncentred second
moment (mean of x^2 over every dim but the last) normalizes the batch and updates the
running buffer with `momentum` (cumulative average when `momentum is None`, as BatchNorm).
UN's full training recipe -- fluctuation smoothing of the statistics over iterations and
adaptive outlier filtration -- is *not* reproduced; this module targets the inference form.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
from torch.nn import Parameter

from normc.ir.ops import fixed_norm

# Traced as one node (target: normc.ir.ops.fixed_norm, the canonical op itself).
torch.fx.wrap("fixed_norm")

__all__ = ["UnifiedNorm", "FrozenAffineNorm", "fixed_norm_scale"]


def _compiling() -> bool:
    """True under torch.compile / dynamo and torch.export, where buffers are not real tensors
    and refreshing them would be recorded as a mutation. (Under fx.symbolic_trace the
    buffers are real tensors: refreshing them there is plain eager work, and is done.)"""
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    return bool(getattr(compiler, "is_compiling", lambda: False)() or getattr(compiler, "is_exporting", lambda: False)())


@torch.no_grad()
def fixed_norm_scale(weight: torch.Tensor | None, stat: torch.Tensor, eps: float,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """`weight / sqrt(stat + eps)` computed in float64, returned in `dtype` (default: stat's)."""
    s = torch.rsqrt(stat.detach().double() + float(eps))
    if weight is not None:
        s = s * weight.detach().double()
    return s.to(dtype or stat.dtype)


class FrozenAffineNorm(nn.Module):
    """Base of norms whose eval form is `x * scale + shift` over the last dim.

    Subclasses name their running statistic (`_stat_name`) and implement `_train_forward`.
    `scale` / `shift` are derived buffers (not saved in the state dict).
    """

    _stat_name = "running_var"

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.affine = bool(affine)
        if affine:
            self.weight = Parameter(torch.ones(self.num_features))
            self.bias = Parameter(torch.zeros(self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer(self._stat_name, torch.ones(self.num_features))
        self.register_buffer("scale", torch.ones(self.num_features), persistent=False)
        if affine:
            self.register_buffer("shift", torch.zeros(self.num_features), persistent=False)
        else:
            self.register_buffer("shift", None, persistent=False)
        self._stamp: tuple | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.refresh()

    # ------------------------------------------------------------------ derived buffers
    def _stat(self) -> torch.Tensor:
        return self._buffers[self._stat_name]

    def _key(self) -> tuple:
        w, b = self._parameters.get("weight"), self._parameters.get("bias")
        s = self._buffers.get(self._stat_name)
        # identity + version counter: in-place edits bump the version, replacements change the id
        # (a dtype/device move converts scale/shift along with everything else)
        return (id(w), w._version if w is not None else 0, id(b), b._version if b is not None else 0,
                id(s), s._version)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute `scale = weight / sqrt(stat + eps)` and `shift = bias` from the current tensors."""
        with torch.inference_mode(False):
            stat = self._stat()
            w, b = self._parameters.get("weight"), self._parameters.get("bias")
            dtype = w.dtype if w is not None else stat.dtype
            scale = fixed_norm_scale(w, stat, self.eps, dtype).to(stat.device)
            _assign(self, "scale", scale)
            if b is not None:
                _assign(self, "shift", b.detach().to(dtype).clone())
        self._stamp = self._key()

    def _ensure_fresh(self) -> None:
        if self._stamp != self._key():
            self.refresh()

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.refresh()
        return self

    # ------------------------------------------------------------------ forward
    def _eval_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the frozen affine is applied to (PowerNorm's group scaling overrides this)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._train_forward(x)
        if not _compiling():
            self._ensure_fresh()
        return fixed_norm(self._eval_input(x), self.scale, self.shift, dim=-1)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _affine(self, z: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            z = z * self.weight.to(z.dtype)
        if self.bias is not None:
            z = z + self.bias.to(z.dtype)
        return z

    # ------------------------------------------------------------------ normc
    def __normc_canonical__(self):
        """The canonical op this module is (for tracers that keep it as a `call_module` leaf)."""
        if self.training:
            return None
        self._ensure_fresh()
        return "fixed_norm", ["scale", "shift" if self.shift is not None else None], {"dim": -1}

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    cur = module._buffers.get(name)
    if cur is not None and cur.shape == value.shape and cur.dtype == value.dtype and cur.device == value.device \
            and not cur.is_inference():
        cur.copy_(value)
    else:
        module._buffers[name] = value


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    module.refresh()


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return list(range(x.dim() - 1))


class UnifiedNorm(FrozenAffineNorm):
    """Unified Normalization over the last dim of `x` ([..., num_features]).

    eval:  y = weight * x / sqrt(running_var + eps) + bias   (computed as x * scale + shift)
    train: running_var is the uncentred second moment E[x^2] over every dim but the last,
           tracked with `momentum` (None: cumulative average); the batch statistic normalizes.
    """

    _stat_name = "running_var"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__(num_features, eps, affine)
        self.momentum = momentum
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        m2 = x.float().pow(2).mean(dim=_reduce_dims(x))
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_var.mul_(1.0 - mom).add_(m2.detach().to(self.running_var.dtype), alpha=mom)
        z = x * torch.rsqrt(m2 + self.eps).to(x.dtype)
        return self._affine(z)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}"
