"""normc.kernels: the eager norm+activation reference (the fused kernels' spec) against the
unfused pair, and the Triton kernel against the reference (GPU only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normc.ir import ops
from normc.kernels import (bench_bandwidth, is_available, norm_act, norm_act_reference, norm_act_triton,
                           norm_act_unfused, supports)

PAIRS = [("layer_norm", "gelu", "none"), ("layer_norm", "gelu", "tanh"), ("rms_norm", "silu", "none"),
         ("layer_norm", "relu", "none"), ("rms_norm", "gelu", "none"), ("layer_norm", "identity", "none"),
         ("rms_norm", "sigmoid", "none"), ("layer_norm", "tanh", "none")]


def _inputs(rows, cols, dtype=torch.float32, device="cpu", seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    w = (torch.rand(cols, generator=g) + 0.5).to(device=device, dtype=dtype) if affine else None
    b = (torch.randn(cols, generator=g) * 0.1).to(device=device, dtype=dtype) if affine else None
    return x, w, b


def _assert_close_rel(got, ref, rel):
    scale = ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max abs err {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("norm,act,approx", PAIRS)
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (1, 1000)])
def test_reference_equals_unfused_fp32(norm, act, approx, shape):
    x, w, b = _inputs(int(torch.tensor(shape[:-1]).prod()), shape[-1], seed=sum(shape))
    x = x.reshape(shape)
    b = b if norm == "layer_norm" else None
    ref = norm_act_reference(x, w, b, norm, act, 1e-5, approximate=approx)
    unf = norm_act_unfused(x, w, b, norm, act, 1e-5, approximate=approx)
    assert ref.dtype == x.dtype and ref.shape == x.shape
    _assert_close_rel(ref, unf, 1e-6)
    torch.testing.assert_close(ref, unf, rtol=1e-5, atol=1e-6)


def test_reference_matches_canonical_norm_act_op():
    x, w, b = _inputs(9, 48)
    torch.testing.assert_close(norm_act_reference(x, w, b, "layer_norm", "gelu"),
                               ops.norm_act(x, w, b, norm="layer_norm", activation="gelu", eps=1e-5),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm_act_reference(x, w, None, "rms_norm", "silu", 1e-6),
                               ops.norm_act(x, w, norm="rms_norm", activation="silu", eps=1e-6),
                               rtol=1e-5, atol=1e-6)


def test_reference_without_affine_and_rms_bias():
    x, _, _ = _inputs(4, 32, affine=False)
    torch.testing.assert_close(norm_act_reference(x, None, None, "layer_norm", "gelu"),
                               F.gelu(F.layer_norm(x, (32,))), rtol=1e-5, atol=1e-6)
    x, w, b = _inputs(4, 32)
    torch.testing.assert_close(norm_act_reference(x, w, b, "rms_norm", "silu"),
                               F.silu(F.rms_norm(x, (32,), w, 1e-5) + b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_rounds_once(dtype):
    x, w, b = _inputs(16, 128, dtype=dtype)
    ref = norm_act_reference(x, w, b, "layer_norm", "gelu")
    exact = norm_act_reference(x.float(), w.float(), b.float(), "layer_norm", "gelu")
    assert ref.dtype == dtype
    assert torch.equal(ref, exact.to(dtype))  # fp32 math, one rounding at the end
    unf = norm_act_unfused(x, w, b, "layer_norm", "gelu")  # rounds twice: close, not equal
    torch.testing.assert_close(ref.float(), unf.float(), rtol=2e-2, atol=2e-2)


def test_bad_arguments():
    x, w, b = _inputs(2, 8)
    with pytest.raises(ValueError):
        norm_act_reference(x, w, b, "batch_norm", "gelu")
    with pytest.raises(ValueError):
        norm_act_reference(x, w, b, "layer_norm", "swish")
    with pytest.raises(ValueError):
        norm_act_reference(x, w[:4], b, "layer_norm", "gelu")


def test_dispatch_falls_back_to_unfused_on_cpu():
    x, w, b = _inputs(5, 64)
    assert not supports(x, w, b, "layer_norm", "gelu")  # CPU tensor: never the Triton kernel
    assert torch.equal(norm_act(x, w, b, "layer_norm", "gelu"), norm_act_unfused(x, w, b, "layer_norm", "gelu"))


def test_triton_unavailable_is_an_error_not_a_crash():
    if is_available():
        pytest.skip("Triton and CUDA present")
    x, w, b = _inputs(2, 8)
    with pytest.raises(RuntimeError):
        norm_act_triton(x, w, b)
    with pytest.raises(RuntimeError):
        bench_bandwidth(8, 8, torch.float32, impl="triton")


def test_bench_bandwidth_cpu_reports_gbps():
    gbps = bench_bandwidth(64, 256, torch.float32, impl="torch", device="cpu", reps=3, warmup=1)
    assert gbps > 0 and gbps == gbps
    gbps = bench_bandwidth(64, 256, torch.float32, norm="rms_norm", activation="silu", impl="reference",
                           device="cpu", reps=3, warmup=1)
    assert gbps > 0


# ------------------------------------------------------------------ GPU
needs_triton = pytest.mark.skipif(not is_available(), reason="needs Triton and a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,act,approx", [("layer_norm", "gelu", "none"), ("layer_norm", "gelu", "tanh"),
                                             ("rms_norm", "silu", "none"), ("layer_norm", "relu", "none"),
                                             ("rms_norm", "identity", "none")])
@pytest.mark.parametrize("cols", [64, 768, 1000, 4096])
def test_triton_matches_reference(dtype, norm, act, approx, cols):
    x, w, b = _inputs(37, cols, dtype=dtype, device="cuda", seed=cols)
    b = b if norm == "layer_norm" else None
    got = norm_act_triton(x, w, b, norm=norm, activation=act, approximate=approx)
    ref = norm_act_reference(x, w, b, norm, act, approximate=approx)
    assert got.dtype == dtype and got.shape == x.shape
    _assert_close_rel(got.float(), ref.float(), TOL[dtype])


@pytest.mark.gpu
@needs_triton
def test_triton_shapes_strides_and_no_affine():
    x, w, b = _inputs(2 * 3 * 5, 256, device="cuda")
    x3 = x.reshape(2, 3, 5, 256)
    torch.testing.assert_close(norm_act_triton(x3, w, b), norm_act_reference(x3, w, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(8, 512, device="cuda")[:, :256]  # rows not contiguous with each other
    torch.testing.assert_close(norm_act_triton(strided, None, None, norm="rms_norm", activation="silu"),
                               norm_act_reference(strided, None, None, "rms_norm", "silu"), rtol=1e-5, atol=1e-5)
    empty = torch.empty(0, 64, device="cuda")
    assert norm_act_triton(empty).shape == (0, 64)
    assert supports(x, w, b) and not supports(x, w, b, activation="tanh")


@pytest.mark.gpu
@needs_triton
def test_triton_bandwidth():
    gbps = bench_bandwidth(4096, 4096, torch.float16, impl="triton", reps=10)
    assert gbps > 0
