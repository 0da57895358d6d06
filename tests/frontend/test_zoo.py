import pytest
import torch
import torch.nn as nn

from normc.errors import NormcError
from normc.frontend import ZOO, load_model, randomize_norms, zoo_names

EXPECTED = ["resnet18", "cnn", "gpt2", "opt", "vit", "llama", "qwen2", "mistral", "bert"]


def test_zoo_names():
    assert set(EXPECTED) <= set(zoo_names())
    for name in zoo_names():
        assert ZOO[name].description


@pytest.mark.parametrize("name", EXPECTED)
def test_zoo_deterministic_and_runs(name):
    a = load_model(f"zoo:{name}")
    b = load_model(f"zoo:{name}")
    assert a.source == f"zoo:{name}"
    assert not a.module.training
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for x, y in zip(a.example_args, b.example_args):
        assert torch.equal(x, y)
    assert len(a.input_specs) == len(a.example_args)
    for spec, x in zip(a.input_specs, a.example_args):
        assert tuple(x.shape) == spec.shape and x.dtype == spec.dtype
    out = a.run()
    assert out is not None
    assert a.is_hf == (name != "cnn")


def test_zoo_restores_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("zoo:cnn")
    assert torch.equal(torch.rand(3), expected)


def test_resnet18_has_20_batchnorms():
    m = load_model("zoo:resnet18")
    bns = [mod for mod in m.module.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert m.example_args[0].shape == (1, 3, 224, 224)
    assert m.input_specs[0].name == "pixel_values"


def test_norms_are_randomized():
    cnn = load_model("zoo:cnn").module
    bns = [m for m in cnn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 6
    for bn in bns:
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        assert (bn.weight >= 0.5).all() and (bn.weight <= 1.5).all()
        assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0
    llama = load_model("zoo:llama").module
    norms = [m for m in llama.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5
    for n in norms:
        assert not torch.allclose(n.weight, torch.ones_like(n.weight))
        assert (n.weight >= 0.5).all() and (n.weight <= 1.5).all()
    gpt2 = load_model("zoo:gpt2").module
    lns = [m for m in gpt2.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 5 and all(ln.bias.abs().max() > 0 for ln in lns)


def test_randomize_norms_counts_every_kind():
    m = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.RMSNorm(4), nn.Linear(4, 4))
    g = torch.Generator().manual_seed(0)
    assert randomize_norms(m, g) == 4
    assert not torch.allclose(m[3].weight, torch.ones(4))


def test_gpt2_head_is_tied():
    m = load_model("zoo:gpt2").module
    assert m.lm_head.weight is m.transformer.wte.weight


def test_transformer_examples_are_token_ids():
    m = load_model("zoo:llama")
    (ids,) = m.example_args
    assert ids.dtype == torch.int64 and ids.shape == (1, 16)
    assert ids.min() >= 0 and ids.max() < 256
    assert m.input_specs[0].name == "input_ids"
    assert m.module.config.use_cache is False


def test_unknown_zoo_name_suggests():
    with pytest.raises(NormcError) as e:
        load_model("zoo:resnet19")
    assert "resnet19" in e.value.message
    assert "zoo:resnet18" in e.value.hint
