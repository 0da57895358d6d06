"""Issue 12's acceptance, on the Hugging Face classes it names (tiny configs, random weights).

Falcon (both decoder layouts), BLOOM, DINOv2, OLMo: every LayerNorm becomes an RMSNorm through
examples/prenorm_to_rmsnorm.nc; Gemma (an RMSNorm model): every norm's gain folds. Each verifies in
fp32 against the original, and every rewritten site (Pre-RMSNorm: every block) verifies in float64 at
1e-10 (`verify dtype f64`: each site's original and replacement evaluated in float64 on the values of
the fp32 run, so OLMo's and Gemma's float32 casts inside their norms do not matter); the converted
graph exported to ONNX runs in onnxruntime and agrees with the original model.
"""
from __future__ import annotations

import pytest
import torch

from normc.api import load_rules
from normc.backends.onnx_backend import check_onnx, export_onnx, onnx_op_counts
from normc.ir.graph import op_counts
from normc.pipeline import RunOptions, compile_model

from .test_matrix import EXAMPLES, loaded

pytestmark = pytest.mark.slow

# name -> (every norm converted: LayerNorms that become RMSNorms, or None for a gain fold), per-site float64 check
MODELS = {"falcon": (3, True), "falcon-new": (5, True), "bloom": (6, True), "dinov2": (5, True),
          "olmo": (5, True), "gemma": (None, True)}
# torch.onnx's opset-23 Attention translation asserts as many key/value heads as query heads; Falcon's
# multi-query attention (one kv head, broadcast) fails there, before and after conversion alike. At
# opset 18 the RMSNorms are written out (Pow, ReduceMean, Sqrt, Reciprocal) and the model exports.
OPSET = {"falcon": 18}


def _program(f64: bool):
    """The example as written, or without its float64 check."""
    text = (EXAMPLES / "prenorm_to_rmsnorm.nc").read_text()
    if not f64:
        text = "\n".join(line for line in text.splitlines() if "dtype f64" not in line)
    return load_rules(text=text)


@pytest.fixture(scope="module")
def converted():
    cache = {}

    def get(name):
        if name not in cache:
            n_ln, f64 = MODELS[name]
            cache[name] = compile_model(_program(f64), loaded(name), RunOptions(write=False, verify_inputs=2))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_every_norm_converts_and_verifies(converted, name):
    n_ln, f64 = MODELS[name]
    result = converted(name)
    report = result.report
    assert result.passed, report["verify"]["failure"]
    before, after = report["graph"]["before"]["op_counts"], report["graph"]["after"]["op_counts"]
    rules = {r["name"]: r for r in report["rules"]}
    if n_ln is not None:
        assert before.get("layer_norm") == n_ln and "layer_norm" not in after and after.get("rms_norm") == n_ln
        assert rules["std.prenorm_to_rmsnorm"]["applied"] >= 1 and not rules["std.prenorm_to_rmsnorm"]["skipped"]
    else:  # an RMSNorm model: every norm's gain went into the linears reading it
        n = before["rms_norm"]
        assert rules["std.fold_rms_norm_affine"]["applied"] == n and not rules["std.fold_rms_norm_affine"]["skipped"]
        gm = result.graph_module
        assert all(len(node.args) < 2 or node.args[1] is None for node in gm.graph.nodes
                   if node.op == "call_function" and getattr(node.target, "__name__", "") == "rms_norm")
    verifies = [s["verify"] for s in report["steps"] if s["step"] == "verify"]
    assert verifies[0]["max_rel_err"] <= 1e-4
    if f64:
        f64 = verifies[1]
        assert f64["mode"] == "per-site float64" and f64["passed"], f64
        sites = f64["sites"]
        assert f64["sites_checked"] == len(sites) >= 1 and all(s["max_rel_err"] <= 1e-12 for s in sites), sites
        assert {s["rule"] for s in sites} >= {r for r in rules if rules[r]["applied"] and rules[r]["kind"] == "exact"}
        assert not report["warnings"], report["warnings"]


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_agrees_with_onnxruntime(converted, name, tmp_path):
    result = converted(name)
    lm = result.loaded
    gm = result.graph_module
    opset = OPSET.get(name, 23 if "rms_norm" in op_counts(gm) else 18)
    path = export_onnx(gm, tuple(lm.example_args), dict(lm.example_kwargs), tmp_path / f"{name}.onnx", opset=opset)
    counts = onnx_op_counts(path)
    assert "LayerNormalization" not in counts, counts
    if opset == 23:  # (two affine-free RMSNorms of one value, Falcon's ln_attn / ln_mlp, export as one)
        assert 1 <= counts.get("RMSNormalization", 0) <= op_counts(gm)["rms_norm"], counts
    g = torch.Generator().manual_seed(7)
    inputs = [(tuple(lm.example_args), dict(lm.example_kwargs))] + [lm.sample_inputs(g) for _ in range(2)]
    check = check_onnx(path, result.reference, inputs)
    assert check.passed, check.summary()
