"""PowerNorm (Shen et al., 2020, "PowerNorm: Rethinking Batch Normalization in Transformers").

Inference over the last (feature) dim:

    y = weight * x' / sqrt(running_phi + eps) + bias

where `running_phi` is a running quadratic mean (uncentred second moment) per channel and
`x'` is the input, or -- with `group_num` set -- the input after the reference code's
*group scaling* (`GroupScaling1D`): every token's channels are split into `group_num`
groups and each group is divided by its own RMS, `x' = x / sqrt(mean_group(x^2) + group_eps)`.

Folding: the frozen part (`x' * scale + shift`) is a per-channel affine and folds into the
next linear. The group scaling depends on the data (per token) and cannot fold. So:

  * `group_num=None` (default): the module *is* `fixed_norm(x, scale, shift)`;
    `__normc_canonical__` says so and the traced graph holds that one canonical node.
  * `group_num=k`: `__normc_canonical__` returns None (a leaf-kept module stays opaque,
    nothing folds through it). Traced through with `symbolic_trace`, the graph holds the
    group-scaling ops followed by a canonical `fixed_norm` node, whose affine can still fold
    forward into the linears that read it. Note that the reference implementation applies
    `GroupScaling1D` even with its default `group_num=1` (a per-token RMS over all channels);
    pass `group_num=1` to reproduce that.

Training mode is a simplified, correct version of the reference: during the first
`warmup_iters` steps the batch quadratic mean normalizes and `running_phi` is their
cumulative average; afterwards `running_phi` normalizes and is updated as an EMA with
`alpha_fwd`. The approximate backward of the paper (`alpha_bkw`, `ema_gz`) is not reproduced
(plain autograd is used); `alpha_bkw` is kept for checkpoint/config compatibility only.
Reference checkpoints store `running_phi` as [1, C, 1, 1] and carry `ema_gz`: both load.
"""
from __future__ import annotations

import torch

from normc.nn.unified_norm import FrozenAffineNorm, _reduce_dims

__all__ = ["PowerNorm", "group_scaling"]


def group_scaling(x: torch.Tensor, group_num: int, eps: float = 1e-5, channels: int | None = None) -> torch.Tensor:
    """The reference `GroupScaling1D`: divide each group of channels by its per-token RMS.

    `channels`: the size of the last dim when known statically (needed under fx tracing)."""
    c = int(x.shape[-1]) if channels is None else int(channels)
    if c % group_num:
        raise ValueError(f"group scaling: {c} channels do not split into {group_num} groups")
    xs = x.unflatten(-1, (group_num, c // group_num))
    m2 = xs.pow(2).mean(dim=-1, keepdim=True)
    return (xs / torch.sqrt(m2 + eps)).flatten(-2)


class PowerNorm(FrozenAffineNorm):
    """PowerNorm over the last dim of `x` ([..., num_features]); see the module docstring."""

    _stat_name = "running_phi"

    def __init__(self, num_features: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 affine: bool = True, warmup_iters: int = 10000, group_num: int | None = None,
                 group_eps: float = 1e-5):
        if group_num is not None and (group_num < 1 or num_features % group_num):
            raise ValueError(f"PowerNorm: group_num={group_num} must divide num_features={num_features}")
        super().__init__(num_features, eps, affine)
        self.alpha_fwd = float(alpha_fwd)
        self.alpha_bkw = float(alpha_bkw)
        self.warmup_iters = int(warmup_iters)
        self.group_num = group_num
        self.group_eps = float(group_eps)
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long))

    def _eval_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_num is None:
            return x
        return group_scaling(x, self.group_num, self.group_eps, self.num_features)

    def _train_forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._eval_input(x)
        sample = x if pad_mask is None else x[~pad_mask]
        var = sample.float().pow(2).mean(dim=_reduce_dims(sample))
        with torch.no_grad():
            self.iters.add_(1)
            it = int(self.iters.item())
            phi = self.running_phi
            if it <= self.warmup_iters:
                phi.mul_((it - 1) / it).add_(var.detach().to(phi.dtype) / it)
                denom = var
            else:
                denom = phi.float().clone()
                phi.mul_(self.alpha_fwd).add_(var.detach().to(phi.dtype), alpha=1.0 - self.alpha_fwd)
        z = x * torch.rsqrt(denom + self.eps).to(x.dtype)
        return self._affine(z)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`pad_mask` (training only): True where a token is padding (left out of the statistics)."""
        if self.training:
            return self._train_forward(x, pad_mask)
        return super().forward(x)

    def __normc_canonical__(self):
        if self.group_num is not None:
            return None  # data-dependent group scaling: not a fixed affine
        return super().__normc_canonical__()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "running_phi"
        if key in state_dict and state_dict[key].dim() != 1:  # reference layout [1, C, 1, 1]
            state_dict[key] = state_dict[key].reshape(-1)
        state_dict.pop(prefix + "ema_gz", None)  # the reference's backward statistic: not used here
        it = state_dict.get(prefix + "iters")
        if it is not None and it.dim() == 0:
            state_dict[prefix + "iters"] = it.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        r = super().extra_repr() + f", alpha_fwd={self.alpha_fwd}, warmup_iters={self.warmup_iters}"
        return r + (f", group_num={self.group_num}" if self.group_num is not None else "")
