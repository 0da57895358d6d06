"""Fused norm + activation over the last dim, as a Triton kernel (CUDA).

One program per row (token): the row is loaded once into registers, reduced in float32
(mean/variance for LayerNorm, mean square for RMSNorm), normalized, scaled and shifted,
passed through the activation and stored once, in the output dtype (fp16, bf16 or fp32).
So the fused op reads x once and writes y once, where the unfused pair reads x, writes the
normalized tensor, reads it back and writes y.

Kinds: LayerNorm + GELU (erf or tanh approximation) and RMSNorm + SiLU are the targets; the
same kernel (compile-time flags) also runs any pairing of {layer_norm, rms_norm} with
{gelu, silu, relu, identity}. Sigmoid/tanh activations are left to the unfused pair.

Importing this module never needs Triton: without it (or without CUDA) `is_available()` is
False and `norm_act_triton` raises. `bench_bandwidth` measures achieved GB/s of the fused
kernel (or, for comparison, of the unfused torch pair / the eager reference, also on CPU).
"""
from __future__ import annotations

import statistics
import time

import torch

from normc.kernels.norm_act import check_args, norm_act_reference, norm_act_unfused

try:  # pragma: no cover - exercised only where triton is installed
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

__all__ = ["is_available", "supports", "norm_act_triton", "bench_bandwidth", "ACT_CODES", "MAX_FUSED_BYTES"]

# activation -> kernel constant (gelu with approximate="tanh" is 2)
ACT_CODES = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# a row must fit one program's registers/shared memory: 64 KiB of input per row (tutorial limit)
MAX_FUSED_BYTES = 65536


def is_available() -> bool:
    """Triton importable and a CUDA device present."""
    return triton is not None and torch.cuda.is_available()


def supports(x: torch.Tensor, weight=None, bias=None, norm: str = "layer_norm", activation: str = "gelu") -> bool:
    """Whether `norm_act_triton` can run this call (else use the unfused pair)."""
    if not is_available() or not x.is_cuda or x.dtype not in _DTYPES or x.dim() == 0:
        return False
    if norm not in ("layer_norm", "rms_norm") or activation not in ("gelu", "silu", "relu", "identity"):
        return False
    n = x.shape[-1]
    if n == 0 or _next_pow2(n) * x.element_size() > MAX_FUSED_BYTES:
        return False
    return all(t is None or (t.is_cuda and t.device == x.device and t.dim() == 1 and t.shape[0] == n)
               for t in (weight, bias))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:  # pragma: no cover - needs triton

    @triton.jit
    def _norm_act_fwd(
        X, Y, W, B,                    # pointers: input rows, output rows, weight [N], bias [N]
        stride_x, stride_y,            # row strides (elements); the last dim is contiguous
        N, eps,                        # row length, epsilon
        IS_RMS: tl.constexpr,          # 0: LayerNorm, 1: RMSNorm
        ACT: tl.constexpr,             # ACT_CODES
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_N: tl.constexpr,         # next power of two >= N
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            ms = tl.sum(x * x, axis=0) / N
            y = x * tl.rsqrt(ms + eps)
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
            y = xc * tl.rsqrt(var + eps)
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * w
        if HAS_B:
            b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            y = y + b
        if ACT == 1:    # GELU, erf form
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        elif ACT == 2:  # GELU, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y * tl.sigmoid(2.0 * u)  # = 0.5 y (1 + tanh(u))
        elif ACT == 3:  # SiLU
            y = y * tl.sigmoid(y)
        elif ACT == 4:  # ReLU
            y = tl.maximum(y, 0.0)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def norm_act_triton(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                    norm: str = "layer_norm", activation: str = "gelu", eps: float = 1e-5,
                    approximate: str = "none") -> torch.Tensor:
    """Fused norm + activation over the last dim of a CUDA tensor (forward only, no autograd)."""
    check_args(x, weight, bias, norm, activation, approximate)
    if not is_available():
        raise RuntimeError("norm_act_triton needs Triton and a CUDA device "
                           "(use normc.kernels.norm_act, which falls back to the unfused pair)")
    if not supports(x, weight, bias, norm, activation):
        raise ValueError(f"norm_act_triton does not support this call: norm={norm}, activation={activation}, "
                         f"dtype={x.dtype}, device={x.device}, last dim={x.shape[-1] if x.dim() else None}")
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y.reshape(shape)
    w = weight.contiguous() if weight is not None else x2  # dummy pointer when absent (never read)
    b = bias.contiguous() if bias is not None else x2
    code = ACT_CODES["gelu_tanh" if (activation == "gelu" and approximate == "tanh") else activation]
    block = _next_pow2(n)
    num_warps = min(max(block // 256, 1), 16)
    with torch.cuda.device(x.device):
        _norm_act_fwd[(x2.shape[0],)](
            x2, y, w, b, x2.stride(0), y.stride(0), n, float(eps),
            IS_RMS=1 if norm == "rms_norm" else 0, ACT=code, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=block, num_warps=num_warps,
        )
    return y.reshape(shape)


# --------------------------------------------------------------------------- bandwidth
def _median_seconds(fn, reps: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_bandwidth(rows: int, cols: int, dtype: torch.dtype = torch.float16, *, norm: str = "layer_norm",
                    activation: str = "gelu", impl: str = "auto", device: str | torch.device | None = None,
                    reps: int = 50, warmup: int = 5, seed: int = 0) -> float:
    """Achieved bandwidth in GB/s of one norm+activation call on a [rows, cols] tensor.

    Bytes counted are the fused op's minimum traffic: read x, write y (rows*cols each) and read
    weight and bias (cols each), all in `dtype`; time is the median over `reps` calls after
    `warmup`. `impl`: "triton" (the fused kernel; CUDA), "torch" (the unfused pair),
    "reference" (the eager fp32 reference) or "auto" (triton when available, else torch).
    For the unfused implementations the figure is an *effective* bandwidth (the same bytes
    over their time), so the numbers compare directly.
    """
    if impl == "auto":
        impl = "triton" if is_available() else "torch"
    if impl not in ("triton", "torch", "reference"):
        raise ValueError(f"impl must be auto, triton, torch or reference, got {impl!r}")
    if device is None:
        device = "cuda" if (impl == "triton" or torch.cuda.is_available()) else "cpu"
    device = torch.device(device)
    if impl == "triton" and not is_available():
        raise RuntimeError("bench_bandwidth(impl='triton') needs Triton and a CUDA device")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype)
    w = (torch.rand(cols, generator=g) + 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(cols, generator=g) * 0.1).to(device=device, dtype=dtype)
    bias = b if norm == "layer_norm" else None
    if impl == "triton":
        def fn():
            return norm_act_triton(x, w, bias, norm=norm, activation=activation)
    elif impl == "torch":
        def fn():
            return norm_act_unfused(x, w, bias, norm, activation)
    else:
        def fn():
            return norm_act_reference(x, w, bias, norm, activation)
    with torch.no_grad():
        seconds = _median_seconds(fn, reps, warmup, device.type == "cuda")
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = (2 * rows * cols + (2 if bias is not None else 1) * cols) * elem
    return nbytes / seconds / 1e9
