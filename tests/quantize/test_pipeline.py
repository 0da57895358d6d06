"""`quantize` as a pipeline step: report, the held-apart gate (simulated and onnxruntime), export."""
from __future__ import annotations

import onnx

from normc.api import load_rules
from normc.pipeline.runner import RunOptions, compile_model
from tests.conftest import loaded_model

from .conftest import sample

PIPE = '''pipeline {{
  calibrate from "random" samples 8
  quantize int8 {{ match linear(gelu(x), w, b?): activations per_token dynamic }}
  verify approx min_cosine {gate} samples 8
  {export}
}}'''


def run(block, gate, export="", write=False):
    program = load_rules(text=PIPE.format(gate=gate, export=export))
    return compile_model(program, loaded_model(block, sample(0)), RunOptions(write=write, allow_outside_writes=True))


def test_gate_passes_reports_and_exports(block, tmp_path):
    out = tmp_path / "q.onnx"
    res = run(block, 0.98, f'export onnx to "{out}"', write=True)
    assert res.passed, res.report["verify"]
    q = res.report["quantize"]
    by = {r["name"]: r for r in q["linears"]}
    assert "dynamic per_token" in by["down"]["scheme"] and "static" in by["up"]["scheme"]
    assert 0 < by["up"]["local_error"] < 0.1
    assert set(by["up"]["range"]) >= {"min", "max", "top_positions", "position_ratio", "top_channels"}
    v = q["verify"][0]
    assert v["inputs"].startswith("8 random inputs")
    for kind in ("simulated", "onnxruntime"):
        assert 0.98 < v[kind]["min_cosine"] <= v[kind]["mean_cosine"] <= 1
    assert abs(v["simulated"]["mean_cosine"] - v["onnxruntime"]["mean_cosine"]) < 1e-4
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "MatMulInteger"} <= ops  # static QDQ and the per-token subgraph


def test_gate_below_threshold_fails_and_writes_nothing(block, tmp_path):
    out = tmp_path / "q.onnx"
    res = run(block, 0.9999999, f'export onnx to "{out}"', write=True)
    assert not res.passed
    assert "below the gate approx min_cosine 0.9999999" in res.report["verify"]["failure"]
    assert not out.exists()
