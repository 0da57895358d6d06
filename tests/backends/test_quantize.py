import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from normc.backends.onnx_backend import export_onnx, onnx_op_counts, ort_session, run_onnx
from normc.backends.quantize import onnx_feed, quantize_int8
from normc.errors import NormcError


class Small(nn.Module):
    """LayerNorm feeding two linears and the residual, an MLP, and an attention-like matmul
    between two activations (which a linears-only quantization must leave alone)."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln(x)
        q = self.q(h)
        att = torch.softmax(q @ h.transpose(-1, -2), dim=-1) @ h
        return self.fc2(torch.nn.functional.gelu(self.fc1(h))) + h + att


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(1, 8, 16, generator=g),), {}) for _ in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    m = Small().eval()
    folder = tmp_path_factory.mktemp("quant")
    path = export_onnx(m, _inputs(1, 0)[0][0], None, folder / "small.onnx")
    return m, path, folder


@pytest.fixture(scope="module")
def quantized(exported):
    m, path, folder = exported
    report = quantize_int8(path, folder / "small_int8.onnx", _inputs(16, 1))
    return m, path, folder, report


def _model_graph(path):
    return onnx.load(str(path)).graph


def test_qdq_model_runs_and_is_close(quantized):
    m, path, folder, report = quantized
    counts = onnx_op_counts(report.path)
    assert counts.get("QuantizeLinear", 0) >= 2 and counts.get("DequantizeLinear", 0) >= 5
    assert report.n_quantize == counts["QuantizeLinear"] and report.n_calibration == 16
    assert report.settings["format"] == "QDQ" and "per-channel" in report.settings["weights"]
    assert sorted(p.name for p in folder.iterdir()) == ["small.onnx", "small_int8.onnx"]  # no temp files
    sess_fp, sess_q = ort_session(path), ort_session(report.path)
    for args, kwargs in _inputs(4, 2):
        ref = m(*args).detach().numpy()
        fp = run_onnx(sess_fp, args, kwargs)[0]
        q = run_onnx(sess_q, args, kwargs)[0]
        assert np.abs(fp - ref).max() < 1e-4
        rel = np.linalg.norm(q - ref) / np.linalg.norm(ref)
        assert 0 < rel < 0.05, rel


def test_qdq_model_itself_is_close_on_any_cpu(quantized):
    """The quantized model's own error (QDQ evaluated in float, no integer kernels) does not
    depend on the CPU; the fused kernels' error does (see normc.backends.cpu_features)."""
    import onnxruntime as ort

    m, path, folder, report = quantized
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(report.path), so, providers=["CPUExecutionProvider"])
    for args, kwargs in _inputs(4, 2):
        ref = m(*args).detach().numpy()
        q = run_onnx(sess, args, kwargs)[0]
        assert 0 < np.linalg.norm(q - ref) / np.linalg.norm(ref) < 0.02


@pytest.mark.parametrize("arch,flags,expected", [
    ("x86_64", {"avx2"}, True),                    # AVX2 only: U8S8 saturates, 7-bit weights
    ("x86_64", {"avx2", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("aarch64", set(), False),
])
def test_reduce_range_follows_the_cpu(monkeypatch, exported, tmp_path, arch, flags, expected):
    from normc.backends import cpu_features as cf
    from normc.backends import quantize as qmod

    fake = cf.CpuFeatures(arch, frozenset(flags), "test")
    monkeypatch.setattr(qmod, "cpu_features", lambda: fake)
    assert cf.default_reduce_range(fake) is expected
    _, path, _ = exported
    report = quantize_int8(path, tmp_path / "q.onnx", _inputs(2, 1))
    assert report.settings["reduce_range"] is expected
    assert report.settings["cpu"] == fake.describe()
    explicit = quantize_int8(path, tmp_path / "q2.onnx", _inputs(2, 1), reduce_range=not expected)
    assert explicit.settings["reduce_range"] is (not expected)


def test_cpu_features_are_read_here():
    from normc.backends.cpu_features import cpu_features

    feats = cpu_features()
    assert feats.arch and feats.source in ("/proc/cpuinfo", "numpy", "none")
    assert feats.u8s8_saturates == (feats.x86 and not feats.vnni)


def _optimized_counts(path, folder):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx_op_counts(folder / "optimized.onnx")


def test_linears_run_as_int8_kernels(quantized, exported, tmp_path):
    """onnxruntime must run every quantized linear as an integer kernel (QGemm), not as
    DequantizeLinear + float MatMul (which is slower than fp32)."""
    *_, report = quantized
    counts = _optimized_counts(report.path, tmp_path)
    assert counts.get("com.microsoft::QGemm", 0) == 3, counts
    # the exported MatMul + Add linears on [1, 8, 16] inputs: rewritten as Reshape-Gemm-Reshape
    _, path, _ = exported
    raw = quantize_int8(path, tmp_path / "raw.onnx", _inputs(4, 1), preprocess=False)
    assert any("Reshape-Gemm-Reshape" in note for note in raw.notes), raw.notes
    assert raw.op_counts.get("Gemm") == 3 and "MatMul" in raw.op_counts  # the attention matmuls stay
    counts = _optimized_counts(raw.path, tmp_path)
    assert counts.get("com.microsoft::QGemm", 0) == 3, counts
    no_gemm = quantize_int8(path, tmp_path / "nogemm.onnx", _inputs(4, 1), preprocess=False, gemm=False)
    assert not no_gemm.op_counts.get("Gemm")


def test_weights_are_int8_per_output_channel(quantized):
    *_, report = quantized
    graph = _model_graph(report.path)
    inits = {i.name: i for i in graph.initializer}
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 2]
    assert len(weight_dqs) == 3  # q, fc1, fc2
    users = {i: n for n in graph.node for i in n.input}
    for dq in weight_dqs:
        w = inits[dq.input[0]]
        scale = numpy_helper.to_array(inits[dq.input[1]])
        # the output-channel axis: 1 for MatMul weights [in, out], 0 for Gemm(transB=1) [out, in]
        default = 1 if users[dq.output[0]].op_type == "MatMul" else 1 - next(
            (a.i for a in users[dq.output[0]].attribute if a.name == "transB"), 0)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), default)
        assert scale.ndim == 1 and scale.shape[0] == w.dims[axis] > 1  # one scale per output channel
        assert np.all(numpy_helper.to_array(inits[dq.input[2]]) == 0)  # symmetric
    act_q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    for q in act_q:  # activations: uint8 with a zero point (asymmetric)
        zp = inits[q.input[2]]
        assert zp.data_type == onnx.TensorProto.UINT8


def _assert_only_linears_read_dequantized(path):
    graph = _model_graph(path)
    inits = {i.name for i in graph.initializer}
    dq_out = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dq_inputs = [i for i in node.input if i in dq_out]
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.op_type in ("MatMul", "Gemm") and weight in dq_out and dq_out[weight].input[0] in inits:
            assert node.input[0] in dq_out  # a linear: quantized input and weight
            continue
        # everything else (attention matmuls, residual adds, softmax) reads float tensors
        assert not dq_inputs, f"{node.op_type} {node.name} reads a dequantized tensor"


def test_only_linears_are_quantized_and_residuals_stay_float(quantized, exported, tmp_path):
    *_, report = quantized
    _assert_only_linears_read_dequantized(report.path)
    # without pre-processing or the Gemm rewrite the norm output feeds the linears and the
    # residual add directly: ORT rewires both to the dequantized tensor, normc gives the add
    # the float tensor back
    _, path, _ = exported
    raw = quantize_int8(path, tmp_path / "raw.onnx", _inputs(8, 1), preprocess=False, gemm=False)
    assert any("residual" in note for note in raw.notes), raw.notes
    _assert_only_linears_read_dequantized(raw.path)


def test_all_ops_when_not_linears_only(exported, tmp_path):
    _, path, _ = exported
    rep = quantize_int8(path, tmp_path / "all.onnx", _inputs(4, 1), linears_only=False, preprocess=False)
    assert rep.n_quantize > 0
    sess = ort_session(rep.path)
    assert run_onnx(sess, *_inputs(1, 3)[0])[0].shape == (1, 8, 16)


def test_symmetric_int8_activations(exported, tmp_path):
    _, path, _ = exported
    rep = quantize_int8(path, tmp_path / "s8.onnx", _inputs(4, 1), activation_type="int8", per_channel=False)
    graph = _model_graph(rep.path)
    inits = {i.name: i for i in graph.initializer}
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(inits[q.input[2]]) == 0
    assert "per-tensor" in rep.settings["weights"]
    run_onnx(ort_session(rep.path), *_inputs(1, 3)[0])


def test_errors_leave_no_output(exported, tmp_path):
    _, path, _ = exported
    out = tmp_path / "never.onnx"
    with pytest.raises(NormcError, match="calibration inputs"):
        quantize_int8(path, out, [])
    with pytest.raises(NormcError, match="does not exist"):
        quantize_int8(tmp_path / "missing.onnx", out, _inputs(1, 0))
    with pytest.raises(NormcError, match="activation type"):
        quantize_int8(path, out, _inputs(1, 0), activation_type="fp8")
    with pytest.raises(NormcError):
        quantize_int8(path, out, [((torch.randn(1, 8, 16), torch.randn(1, 8, 16)), {})])  # one input too many
    with pytest.raises(NormcError):
        quantize_int8(path, out, [((torch.randn(1, 9, 17),), {})], preprocess=False)  # wrong shape
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_onnx_feed_maps_like_run_onnx():
    a, b, c = torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 2.0)
    feed = onnx_feed(["input_ids", "attention_mask", "extra"], (a, c), {"attention_mask": b})
    assert list(feed) == ["attention_mask", "input_ids", "extra"]
    assert np.array_equal(feed["attention_mask"], b.numpy()) and np.array_equal(feed["input_ids"], a.numpy())
    assert np.array_equal(feed["extra"], c.numpy())
    with pytest.raises(NormcError, match="takes 2 input"):
        onnx_feed(["x", "y"], (a,), {})
