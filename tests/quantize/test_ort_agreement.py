"""The simulation computes what onnxruntime computes, scheme by scheme (the same plan lowered to both)."""
from __future__ import annotations

import pytest
import torch

from normc.backends.onnx_backend import ort_session, run_onnx
from normc.quantize.run import quantize_graph, write_onnx_int8

from .conftest import CALIB, HELD, sample, step_of

SCHEMES = {
    "static uint8 asymmetric (default)": "",
    "static int8 symmetric": "default: activations int8 symmetric",
    "static uint8 symmetric": "default: activations symmetric",
    "first token own range": 'on "down": first_tokens 1',
    "per-token dynamic uint8": 'on "down": activations per_token dynamic',
    "per-tensor dynamic uint8": 'on "down": activations per_tensor dynamic',
    "weight-only (W8A16)": 'on "down": activations fp32',
    "keep fp32": "match linear(gelu(x), w, b?): keep fp32",
    "per-tensor weights": "default: weights per_tensor",
    "full-range weights": "default: weights full_range",
}


FAST = {"static uint8 asymmetric (default)", "first token own range", "per-token dynamic uint8", "weight-only (W8A16)"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in SCHEMES])
def test_simulation_equals_onnxruntime(name, block, block_graph, tmp_path):
    q = quantize_graph(block_graph, step_of(SCHEMES[name]), CALIB)
    out = tmp_path / "int8.onnx"
    write_onnx_int8(q, (sample(0),), {}, out, CALIB)
    sess = ort_session(out)
    worst = 0.0
    for (x,), _ in HELD:
        got = torch.from_numpy(run_onnx(sess, (x,), {})[0])
        with torch.no_grad():
            sim, ref = q.sim.graph_module(x), block(x)
        # the quantization error itself is ~1e-2; simulation and onnxruntime agree far below it
        assert float((sim - ref).abs().max() / ref.abs().max()) > 1e-4 or name == "keep fp32"
        worst = max(worst, float((got - sim).abs().max() / sim.abs().max()))
    if name == "full-range weights" and q.plan.cpu.u8s8_saturates:
        pytest.skip("full-range weights saturate onnxruntime's U8S8 kernels on this CPU (not simulated)")
    assert worst < 1e-5, f"{name}: simulation vs onnxruntime {worst:.2e}"
