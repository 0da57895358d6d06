import pathlib
import pickle
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file, save_model

from normc.errors import NormcError
from normc.frontend import InputSpec, load_model, trace_model
from normc.frontend.trace import compare_outputs

FACTORY = textwrap.dedent(
    """
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def with_inputs():
        torch.manual_seed(0)
        return Net(), torch.randn(1, 3, 8, 8)

    def tuple_inputs():
        torch.manual_seed(0)
        return Net(), (torch.randn(1, 3, 8, 8),)

    def kw_inputs():
        torch.manual_seed(0)
        return Net(), {"x": torch.randn(1, 3, 8, 8)}

    def module_only():
        torch.manual_seed(0)
        return Net()

    def not_a_model():
        return 42

    def raises():
        raise ValueError("bad config")
    """
)


@pytest.fixture
def factory(tmp_path):
    p = tmp_path / "mymodel.py"
    p.write_text(FACTORY)
    return p


def net_from(factory):
    return load_model(f"{factory}:module_only", example_args=(torch.randn(1, 3, 8, 8),)).module


# ------------------------------------------------------------------ InputSpec


def test_input_spec_sampling():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    f = InputSpec("x", (2, 3), torch.float32)
    assert torch.equal(f.sample(g1), f.sample(g2))
    i = InputSpec("input_ids", (1, 100), torch.int64, 0, 7)
    t = i.sample(g1)
    assert t.dtype == torch.int64 and t.shape == (1, 100) and t.min() >= 0 and t.max() < 7
    with pytest.raises(NormcError):
        InputSpec("ids", (1, 4), torch.int64).sample(g1)


# ------------------------------------------------------------------ factories


@pytest.mark.parametrize("fn", ["with_inputs", "tuple_inputs"])
def test_factory_file_with_inputs(factory, fn):
    m = load_model(f"{factory}:{fn}")
    assert isinstance(m.module, nn.Module) and not m.module.training
    assert m.example_args[0].shape == (1, 3, 8, 8)
    assert m.example_kwargs == {}
    assert [s.name for s in m.input_specs] == ["x"]
    assert m.is_hf is False
    assert m.source == f"{factory}:{fn}"
    res = trace_model(m)
    assert res.method == "symbolic_trace"


def test_factory_kwargs_inputs(factory):
    m = load_model(f"{factory}:kw_inputs")
    assert m.example_args == () and set(m.example_kwargs) == {"x"}
    args, kwargs = m.sample_inputs(torch.Generator().manual_seed(1))
    assert args == () and kwargs["x"].shape == (1, 3, 8, 8)
    res = trace_model(m)
    with torch.no_grad():
        assert compare_outputs(m.run(), res.graph_module(**m.example_kwargs))[0]


def test_factory_module_only_needs_inputs(factory):
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:module_only")
    assert "example inputs" in e.value.message
    assert "input" in e.value.hint and "(module, example_inputs)" in e.value.hint
    m = load_model(f"{factory}:module_only", example_args=(torch.randn(1, 3, 8, 8),))
    assert m.input_specs[0].name == "x"
    spec = InputSpec("x", (2, 3, 8, 8), torch.float32)
    m1 = load_model(f"{factory}:module_only", input_specs=[spec])
    m2 = load_model(f"{factory}:module_only", input_specs=[spec])
    assert m1.example_args[0].shape == (2, 3, 8, 8)
    assert torch.equal(m1.example_args[0], m2.example_args[0])  # fixed seed
    assert m1.input_specs == [spec]


def test_factory_module_form(tmp_path, monkeypatch, factory):
    pkg = tmp_path / "normc_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("normc_test_pkg.models:with_inputs")
    assert m.example_args[0].shape == (1, 3, 8, 8)
    with pytest.raises(NormcError) as e:
        load_model("normc_no_such_pkg.models:build")
    assert "normc_no_such_pkg.models" in e.value.message


def test_factory_errors(factory, tmp_path):
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:with_inputz")
    assert "with_inputz" in e.value.message and "with_inputs" in e.value.hint
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:not_a_model")
    assert "int" in e.value.message
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:raises")
    assert "bad config" in e.value.message
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nimport no_such_module_xyz\n")
    with pytest.raises(NormcError) as e:
        load_model(f"{broken}:build")
    assert "broken.py" in e.value.message and "no_such_module_xyz" in e.value.message
    assert "\n" not in e.value.message
    with pytest.raises(NormcError) as e:
        load_model(f"{tmp_path / 'missing.py'}:build")
    assert "does not exist" in e.value.message
    with pytest.raises(NormcError) as e:
        load_model(str(factory))
    assert ":FUNCTION" in e.value.hint


def test_unknown_forms(tmp_path):
    for src in ["", "resnet", "model.onnx", "a b c"]:
        with pytest.raises(NormcError) as e:
            load_model(src)
        assert e.value.hint
    with pytest.raises(NormcError) as e:
        load_model("nothing_here.pt")
    assert "does not exist" in e.value.message
    with pytest.raises(NormcError) as e:
        load_model("what_is_this")
    assert "zoo:NAME" in e.value.hint


# ------------------------------------------------------------------ weights


def test_weights_safetensors_and_state_dict(factory, tmp_path):
    src = net_from(factory)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
        src.bn.running_var.fill_(3.0)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    sd = tmp_path / "w.pt"
    torch.save(src.state_dict(), sd)
    for w in (st, sd):
        m = load_model(f"{factory}:with_inputs", weights=str(w))
        for k, v in src.state_dict().items():
            assert torch.equal(m.module.state_dict()[k], v), (w, k)


def test_weights_checkpoint_wrapper(factory, tmp_path):
    src = net_from(factory)
    ck = tmp_path / "ckpt.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, ck)
    m = load_model(f"{factory}:with_inputs", weights=str(ck))
    assert torch.equal(m.module.conv.weight, src.conv.weight)


def test_weights_mismatch(factory, tmp_path):
    sd = net_from(factory).state_dict()
    bad = dict(sd)
    bad.pop("conv.weight")
    bad["extra.weight"] = torch.zeros(2)
    p = tmp_path / "bad.safetensors"
    save_file(bad, str(p))
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:with_inputs", weights=str(p))
    assert "conv.weight" in e.value.message and "extra.weight" in e.value.message
    wrong = dict(sd)
    wrong["fc.weight"] = torch.zeros(3, 4)
    p2 = tmp_path / "shape.pt"
    torch.save(wrong, p2)
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:with_inputs", weights=str(p2))
    assert "fc.weight" in e.value.message
    dp = {f"module.{k}": v for k, v in sd.items()}
    p3 = tmp_path / "dp.pt"
    torch.save(dp, p3)
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:with_inputs", weights=str(p3))
    assert "module." in e.value.hint
    with pytest.raises(NormcError):
        load_model(f"{factory}:with_inputs", weights=str(tmp_path / "none.safetensors"))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_weights_tied_saved_once(tmp_path):
    src = Tied()
    p = tmp_path / "tied.safetensors"
    save_model(src, str(p))  # stores the shared tensor under one name only
    dst = Tied()
    from normc.frontend import load_weights

    load_weights(dst, str(p))
    assert torch.equal(dst.head.weight, src.head.weight)
    assert dst.head.weight is dst.emb.weight


def test_weights_refuse_pickled_code(factory, tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil_weights.pt"
    with open(p, "wb") as f:
        pickle.dump(Evil(str(marker)), f)
    with pytest.raises(NormcError) as e:
        load_model(f"{factory}:with_inputs", weights=str(p))
    assert "run code" in e.value.message
    assert not marker.exists()


# ------------------------------------------------------------------ .pt2


def test_pt2_round_trip(factory, tmp_path):
    m = load_model(f"{factory}:with_inputs")
    ep = torch.export.export(m.module, m.example_args)
    path = tmp_path / "net.pt2"
    torch.export.save(ep, str(path))
    loaded = load_model(str(path))
    assert loaded.example_args[0].shape == (1, 3, 8, 8)
    assert [s.name for s in loaded.input_specs] == ["x"]
    assert loaded.exported_program is not None
    res = trace_model(loaded)
    assert res.method == "torch.export"
    with torch.no_grad():
        assert compare_outputs(m.run(loaded.example_args), res.graph_module(*loaded.example_args))[0]
    targets = {n.target for n in res.graph_module.graph.nodes if n.op == "get_attr"}
    assert "conv.weight" in targets and "bn.running_var" in targets
    # the traced graph owns its weights
    with torch.no_grad():
        res.graph_module.conv.weight.mul_(2)
    assert not torch.equal(res.graph_module.conv.weight, loaded.module.conv.weight)


def test_not_a_pt2(tmp_path):
    p = tmp_path / "junk.pt2"
    p.write_bytes(b"not a zip")
    with pytest.raises(NormcError) as e:
        load_model(str(p))
    assert "torch.export" in e.value.message


# ------------------------------------------------------------------ pickles


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    p = tmp_path / "model.pt"
    if writer == "pickle":
        with open(p, "wb") as f:
            pickle.dump(Evil(str(marker)), f)
    else:
        torch.save(Evil(str(marker)), p)
    with pytest.raises(NormcError) as e:
        load_model(str(p))
    assert "pickled Python object" in e.value.message
    assert "--allow-pickle" in e.value.hint
    assert not marker.exists()


def test_state_dict_as_model_is_explained(factory, tmp_path):
    p = tmp_path / "weights.pth"
    torch.save(net_from(factory).state_dict(), p)
    with pytest.raises(NormcError) as e:
        load_model(str(p))
    assert "state dict" in e.value.message and "--weights" in e.value.hint
    st = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(1)}, str(st))
    with pytest.raises(NormcError) as e:
        load_model(str(st))
    assert "--weights" in e.value.hint


def test_allow_pickle_loads_whole_module(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    p = tmp_path / "whole.pt"
    torch.save(net, p)
    with pytest.raises(NormcError):
        load_model(str(p))
    x = torch.randn(3, 4)
    m = load_model(str(p), allow_pickle=True, example_args=(x,))
    assert isinstance(m.module, nn.Sequential)
    with torch.no_grad():
        assert torch.equal(m.run(), net(x))
    p2 = tmp_path / "pair.pt"
    torch.save((net, x), p2)
    m2 = load_model(str(p2), allow_pickle=True)
    assert torch.equal(m2.example_args[0], x)
    assert trace_model(m2).method == "symbolic_trace"


HF_FACTORY = textwrap.dedent(
    """
    import torch
    from transformers import BertConfig, BertModel

    def build():
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=32)
        return BertModel(cfg), {"input_ids": torch.randint(0, 100, (1, 8))}
    """
)


def test_hf_factory_is_traced_with_export(tmp_path):
    p = tmp_path / "hf_model.py"
    p.write_text(HF_FACTORY)
    m = load_model(f"{p}:build")
    assert m.is_hf
    assert m.input_specs[0].name == "input_ids"
    assert m.input_specs[0].low >= 0 and m.input_specs[0].high <= 100
    res = trace_model(m)
    assert res.method == "torch.export"
    with torch.no_grad():
        assert compare_outputs(m.run(), res.graph_module(**m.example_kwargs))[0]


def test_pt2_with_pickled_payload_is_refused(factory, tmp_path):
    """torch.export.load itself falls back to unsafe unpickling; normc must not."""
    import io
    import zipfile

    original_torch_load = torch.load
    m = load_model(f"{factory}:with_inputs")
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(m.module, m.example_args), str(good))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    replaced = False
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "sample_inputs" in info.filename:
                buf = io.BytesIO()
                torch.save(Evil(str(marker)), buf)
                data, replaced = buf.getvalue(), True
            zout.writestr(info, data)
    assert replaced
    with pytest.raises(NormcError) as e:
        load_model(str(evil))
    assert "pickled" in e.value.message and "--allow-pickle" in e.value.hint
    assert not marker.exists()
    assert torch.load is original_torch_load  # the guard is undone
    assert load_model(str(good)).example_args[0].shape == (1, 3, 8, 8)
