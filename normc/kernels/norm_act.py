"""Norm + activation as one op: the eager reference (the spec every fused kernel must meet),
the unfused pair it replaces, and a dispatcher that picks a fused kernel where one exists.

Semantics (over the last dim, N = x.shape[-1]; one row = one token):

    layer_norm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b     (biased variance)
    rms_norm:   y = x / sqrt(mean(x^2) + eps) * w (+ b when given)
    then        act(y),  act in {gelu (erf or tanh approximation), silu, relu, sigmoid, tanh, identity}

The reference computes everything in float32 (float64 for float64 inputs) and rounds once,
to the input dtype, at the end -- as the Triton kernel does (fp32 accumulation, fp16/bf16/fp32
I/O). The unfused pair (`F.layer_norm` then `F.gelu`, in the input dtype) rounds twice, so in
fp16/bf16 the two may differ by an ulp; in fp32 they agree to ~1e-6 relative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("layer_norm", "rms_norm")
ACTIVATIONS = ("gelu", "silu", "relu", "sigmoid", "tanh", "identity")

__all__ = ["NORMS", "ACTIVATIONS", "norm_act_reference", "norm_act_unfused", "norm_act", "check_args"]


def check_args(x: torch.Tensor, weight, bias, norm: str, activation: str, approximate: str = "none") -> None:
    if norm not in NORMS:
        raise ValueError(f"norm_act: norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"norm_act: approximate must be 'none' or 'tanh', got {approximate!r}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"norm_act: {name} must have shape ({n},), got {tuple(t.shape)}")


def _act(y: torch.Tensor, activation: str, approximate: str) -> torch.Tensor:
    if activation == "gelu":
        if approximate == "tanh":
            return 0.5 * y * (1.0 + torch.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
        return 0.5 * y * (1.0 + torch.erf(y * 0.7071067811865476))
    if activation == "silu":
        return y * torch.sigmoid(y)
    if activation == "relu":
        return torch.clamp_min(y, 0.0)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "tanh":
        return torch.tanh(y)
    return y


def norm_act_reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       norm: str = "layer_norm", activation: str = "gelu", eps: float = 1e-5, *,
                       approximate: str = "none") -> torch.Tensor:
    """Eager reference of the fused op: float32 math, one rounding to ``x.dtype`` at the end."""
    check_args(x, weight, bias, norm, activation, approximate)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    if norm == "layer_norm":
        mean = xf.mean(dim=-1, keepdim=True)
        xc = xf - mean
        var = (xc * xc).mean(dim=-1, keepdim=True)
        y = xc * torch.rsqrt(var + eps)
    else:
        ms = (xf * xf).mean(dim=-1, keepdim=True)
        y = xf * torch.rsqrt(ms + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return _act(y, activation, approximate).to(x.dtype)


def norm_act_unfused(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     norm: str = "layer_norm", activation: str = "gelu", eps: float = 1e-5, *,
                     approximate: str = "none") -> torch.Tensor:
    """The pair the fused op replaces: torch's own norm kernel, then torch's activation."""
    check_args(x, weight, bias, norm, activation, approximate)
    n = (x.shape[-1],)
    if norm == "layer_norm":
        y = F.layer_norm(x, n, weight, bias, eps)
    else:
        y = F.rms_norm(x, n, weight, eps)
        if bias is not None:
            y = y + bias
    if activation == "gelu":
        return F.gelu(y, approximate=approximate)
    if activation == "silu":
        return F.silu(y)
    if activation == "relu":
        return F.relu(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "tanh":
        return torch.tanh(y)
    return y


def norm_act(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             norm: str = "layer_norm", activation: str = "gelu", eps: float = 1e-5, *,
             approximate: str = "none") -> torch.Tensor:
    """The fused Triton kernel on CUDA tensors where it applies (no autograd), else the unfused pair."""
    from normc.kernels.norm_act_triton import norm_act_triton, supports

    if supports(x, weight, bias, norm, activation) and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return norm_act_triton(x, weight, bias, norm=norm, activation=activation, eps=eps, approximate=approximate)
    return norm_act_unfused(x, weight, bias, norm, activation, eps, approximate=approximate)
