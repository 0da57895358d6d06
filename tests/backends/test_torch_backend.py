import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from normc.backends.torch_backend import load_pt2, save_pt2, save_state_dict
from normc.errors import NormcError
from normc.verify import verify_models


# module-level helpers, as the canonicalizer emits them: plain functions called by fx nodes
def batch_norm(x, mean, var, weight=None, bias=None, *, eps=1e-5):
    return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def linear(x, w, b=None):
    return F.linear(x, w, b)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


def small_cnn():
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial running stats
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def hand_built_graph_module() -> fx.GraphModule:
    """conv2d -> batch_norm -> relu -> mean -> linear, params reached through get_attr."""
    torch.manual_seed(1)
    root = nn.Module()
    root.register_parameter("conv_w", nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2))
    root.register_parameter("conv_b", nn.Parameter(torch.randn(4) * 0.1))
    root.register_buffer("bn_mean", torch.randn(4) * 0.1)
    root.register_buffer("bn_var", torch.rand(4) + 0.5)
    root.register_parameter("bn_w", nn.Parameter(torch.rand(4) + 0.5))
    root.register_parameter("bn_b", nn.Parameter(torch.randn(4) * 0.1))
    root.register_parameter("fc_w", nn.Parameter(torch.randn(2, 4) * 0.3))

    g = fx.Graph()
    x = g.placeholder("x")
    cw, cb = g.get_attr("conv_w"), g.get_attr("conv_b")
    y = g.call_function(conv2d, (x, cw, cb), {"padding": 1})
    params = [g.get_attr(n) for n in ("bn_mean", "bn_var", "bn_w", "bn_b")]
    y = g.call_function(batch_norm, (y, *params), {"eps": 1e-3})
    y = g.call_function(torch.relu, (y,))
    y = g.call_method("mean", (y,), {"dim": (2, 3)})
    y = g.call_function(linear, (y, g.get_attr("fc_w")))
    y = g.call_function(operator.mul, (y, 2.0))
    g.output(y)
    gm = fx.GraphModule(root, g)
    gm.graph.lint()
    return gm.eval()


def test_pt2_round_trip_small_cnn(tmp_path):
    m = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    path = save_pt2(m, (x,), None, tmp_path / "cnn.pt2")
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no temp file left
    loaded = load_pt2(path)
    res = verify_models(m, loaded, [((torch.randn(2, 3, 8, 8),), {}) for _ in range(2)])
    assert res.passed, res.summary()
    assert res.max_abs_err == 0.0


def test_pt2_round_trip_hand_built_graph_module(tmp_path):
    gm = hand_built_graph_module()
    x = torch.randn(1, 3, 6, 6)
    ref = 2.0 * F.linear(
        torch.relu(F.batch_norm(F.conv2d(x, gm.conv_w, gm.conv_b, padding=1), gm.bn_mean, gm.bn_var,
                                gm.bn_w, gm.bn_b, eps=1e-3)).mean(dim=(2, 3)), gm.fc_w)
    torch.testing.assert_close(gm(x), ref)
    path = save_pt2(gm, (x,), {}, tmp_path / "gm.pt2")
    loaded = load_pt2(path)
    res = verify_models(gm, loaded, [((x,), {})])
    assert res.passed, res.summary()


def test_pt2_with_kwargs(tmp_path):
    class M(nn.Module):
        def forward(self, x, *, scale):
            return x * scale

    path = save_pt2(M(), (torch.ones(2),), {"scale": torch.full((2,), 3.0)}, tmp_path / "k.pt2")
    out = load_pt2(path)(torch.ones(2), scale=torch.full((2,), 2.0))
    assert torch.equal(out, torch.full((2,), 2.0))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: torch.export refuses it
            return x + 1
        return x - 1


def test_pt2_export_failure_is_normc_error_and_writes_nothing(tmp_path):
    target = tmp_path / "bad.pt2"
    with pytest.raises(NormcError, match="torch.export failed"):
        save_pt2(DataDependent(), (torch.randn(3),), None, target)
    assert list(tmp_path.iterdir()) == []


def test_load_pt2_missing_and_garbage(tmp_path):
    with pytest.raises(NormcError, match="no such file"):
        load_pt2(tmp_path / "nope.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(NormcError, match="cannot load"):
        load_pt2(junk)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: two names, one storage
        self.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous


def test_save_state_dict_safetensors_keeps_aliased_keys(tmp_path):
    from safetensors.torch import load_file

    m = Tied()
    path = save_state_dict(m, tmp_path / "w.safetensors")
    sd = load_file(str(path))
    assert set(sd) == {"emb.weight", "head.weight", "t"}
    assert torch.equal(sd["emb.weight"], sd["head.weight"])
    assert torch.equal(sd["t"], m.t)
    assert list(tmp_path.iterdir()) == [path]
    assert m.head.weight is m.emb.weight  # the module itself is untouched


def test_save_state_dict_torch_save(tmp_path):
    m = small_cnn()
    path = save_state_dict(m, tmp_path / "w.pt")
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(m.state_dict())
    assert torch.equal(sd["bn.running_var"], m.bn.running_var)
