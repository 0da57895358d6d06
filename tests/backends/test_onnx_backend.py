import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normc.backends.onnx_backend import check_onnx, export_onnx, onnx_op_counts, ort_session, run_onnx
from normc.errors import NormcError
from normc.verify import Tolerance

from .test_torch_backend import DataDependent, hand_built_graph_module, small_cnn


def inputs(*shape, n=2):
    return [((torch.randn(*shape),), {}) for _ in range(n)]


# ----------------------------------------------------------------------------- CNN
@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    m = small_cnn()
    path = export_onnx(m, (torch.randn(2, 3, 8, 8),), None, tmp_path_factory.mktemp("cnn") / "cnn.onnx")
    return m, path


def test_export_and_check_small_cnn(cnn_onnx):
    m, path = cnn_onnx
    assert [p.name for p in path.parent.iterdir()] == ["cnn.onnx"]  # no temp or side files
    res = check_onnx(path, m, inputs(2, 3, 8, 8))
    assert res.passed, res.summary()
    assert res.n_inputs == 2 and res.max_rel_err < 1e-5 and res.min_cosine > 0.999999
    counts = onnx_op_counts(path)
    assert counts.get("Conv") == 1 and counts.get("Relu") == 1
    assert counts.get("Gemm", 0) + counts.get("MatMul", 0) >= 1


def test_session_has_spinning_off_and_named_inputs(cnn_onnx):
    _, path = cnn_onnx
    sess = ort_session(path, threads=1)
    opts = sess.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 1
    assert [i.name for i in sess.get_inputs()] == ["x"]  # named after forward's argument
    (out,) = run_onnx(sess, (torch.randn(2, 3, 8, 8),), {})
    assert out.shape == (2, 5)
    with pytest.raises(NormcError, match="takes 1 input"):
        run_onnx(sess, (torch.randn(2, 3, 8, 8), torch.randn(1)), {})


def test_hand_built_graph_module_exports(tmp_path):
    gm = hand_built_graph_module()
    path = export_onnx(gm, (torch.randn(1, 3, 6, 6),), {}, tmp_path / "gm.onnx")
    res = check_onnx(path, gm, inputs(1, 3, 6, 6, n=1))
    assert res.passed, res.summary()


# ----------------------------------------------------------------------------- norms
class LNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16, eps=1e-6)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.ln(x))


class RMSBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        return F.rms_norm(x, (16,), self.weight, 1e-6)


def test_layer_norm_exports_as_layer_normalization(tmp_path):
    torch.manual_seed(0)
    m = LNBlock().eval()
    path = export_onnx(m, (torch.randn(2, 4, 16),), None, tmp_path / "ln.onnx", opset=18)
    counts = onnx_op_counts(path)
    assert counts.get("LayerNormalization") == 1
    assert "ReduceMean" not in counts  # not decomposed
    assert check_onnx(path, m, inputs(2, 4, 16)).passed


def test_rms_norm_opset23_is_rms_normalization(tmp_path):
    m = RMSBlock().eval()
    path = export_onnx(m, (torch.randn(2, 4, 16),), None, tmp_path / "rms23.onnx", opset=23)
    assert onnx_op_counts(path) == {"RMSNormalization": 1}
    res = check_onnx(path, m, inputs(2, 4, 16))
    assert res.passed, res.summary()


def test_rms_norm_opset18_is_decomposed(tmp_path):
    m = RMSBlock().eval()
    path = export_onnx(m, (torch.randn(2, 4, 16),), None, tmp_path / "rms18.onnx", opset=18)
    counts = onnx_op_counts(path)
    assert "RMSNormalization" not in counts
    # x * 1/sqrt(mean(x^2) + eps) * w
    assert counts.get("ReduceMean") == 1 and counts.get("Pow") == 1 and counts.get("Sqrt") == 1
    res = check_onnx(path, m, inputs(2, 4, 16))
    assert res.passed, res.summary()


# ----------------------------------------------------------------------------- inputs / outputs
class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, bias=None, ids=None):
        y = self.fc(x)
        if mask is not None:
            y = y * mask
        if bias is not None:
            y = y + bias
        return {"y": y, "aux": (y.sum(-1), ids * 2)}


def test_kwargs_none_args_and_nested_outputs(tmp_path):
    m = KwModel().eval()
    kw = {"ids": torch.tensor([1, 2]), "bias": torch.randn(4)}  # mask=None is dropped
    path = export_onnx(m, (torch.randn(2, 4),), kw, tmp_path / "kw.onnx")
    sess = ort_session(path)
    assert sorted(i.name for i in sess.get_inputs()) == ["bias", "ids", "x"]
    # kwargs given in another order still land on the right graph inputs
    kw2 = {"bias": torch.randn(4), "ids": torch.tensor([5, 7])}
    res = check_onnx(path, m, [((torch.randn(2, 4),), kw2)], session=sess)
    assert res.passed, res.summary()
    assert [o.name for o in res.outputs] == ["y", "aux[0]", "aux[1]"]
    assert res.outputs[2].dtype == "int64" and res.outputs[2].max_abs == 0.0


def test_check_onnx_detects_a_different_model(cnn_onnx):
    m, path = cnn_onnx
    other = small_cnn()
    with torch.no_grad():
        other.fc.bias += 0.1
    res = check_onnx(path, other, inputs(2, 3, 8, 8, n=1), Tolerance(max_rel=1e-4))
    assert not res.passed and res.max_abs_err == pytest.approx(0.1, rel=1e-3)


# ----------------------------------------------------------------------------- failures
@torch.library.custom_op("normc_test::triple", mutates_args=())
def triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@triple.register_fake
def _(x):
    return torch.empty_like(x)


class NoOnnxOp(nn.Module):
    def forward(self, x):
        return triple(x) + 1


@pytest.mark.parametrize("model, stage", [(DataDependent(), "GuardOnDataDependent"), (NoOnnxOp(), "No ONNX function")])
def test_failed_export_is_normc_error_and_writes_nothing(tmp_path, model, stage):
    target = tmp_path / "out" / "bad.onnx"
    with pytest.raises(NormcError, match=stage) as info:
        export_onnx(model, (torch.randn(3),), None, target)
    assert "\n" not in info.value.message  # one line
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_op_counts_inline_local_functions():
    import onnx
    from onnx import helper

    fn = helper.make_function(
        "local", "AddRelu", ["a", "b"], ["c"],
        [helper.make_node("Add", ["a", "b"], ["t"]), helper.make_node("Relu", ["t"], ["c"])],
        opset_imports=[helper.make_opsetid("", 18)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddRelu", ["x", "x"], ["y"], domain="local"),
         helper.make_node("AddRelu", ["y", "x"], ["z"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    assert onnx_op_counts(model) == {"Add": 2, "Relu": 2}


def test_external_data_written_beside_model(tmp_path):
    m = LNBlock().eval()
    path = export_onnx(m, (torch.randn(2, 16),), None, tmp_path / "ln.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ln.onnx", "ln.onnx.data"]
    assert check_onnx(path, m, inputs(2, 16, n=1)).passed
