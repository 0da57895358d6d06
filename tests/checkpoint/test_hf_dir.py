"""`-o OUTDIR/`: the rewritten model as a checkpoint in the original layout, loadable with from_pretrained."""
from __future__ import annotations

import json

import pytest
import torch

from normc import api
from normc.checkpoint import ShardWriter, checkpoint_files
from normc.errors import NormcError
from normc.frontend.specs import LoadedModel, specs_from_examples
from normc.frontend.trace import trace_counts

SMOOTH = """
pipeline {
  calibrate from "random" samples 4
  apply std.smooth_rms
  verify rel 1e-4
}
"""
BN = """
pipeline {
  apply std.bn
  verify rel 1e-5
}
"""


def _hf_dir(module, folder, example, side_files=True):
    """An HF directory (save_pretrained) and the LoadedModel normc makes of it (source_dir set)."""
    module.save_pretrained(folder)
    if side_files:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        (folder / "special_tokens_map.json").write_text("{}")
    reloaded = type(module).from_pretrained(folder).eval()
    specs = specs_from_examples(example, {}, ["input"])
    loaded = LoadedModel(reloaded, example, {}, specs, str(folder), True)
    loaded.source_dir = str(folder)
    return loaded


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def _llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # gains not all one: the fold has something to move
    return _hf_dir(m, tmp_path / "llama", (torch.randint(0, 128, (1, 8)),))


def test_smooth_rms_llama_dir_loads_and_matches(tmp_path):
    from transformers import LlamaForCausalLM
    loaded = _llama(tmp_path)
    out = tmp_path / "out"
    before = trace_counts().get("torch.export", 0)
    result = api.apply(api.load_rules(text=SMOOTH), loaded, f"{out}/")
    assert result.passed
    assert trace_counts().get("torch.export", 0) - before == 1  # the layout plan reuses the graph before the pipeline
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # weights did change (SmoothQuant moved the norm gains into the projections) ...
    orig = loaded.module.state_dict()
    new = model.state_dict()
    assert set(orig) == set(new)
    assert not torch.equal(orig["model.layers.0.input_layernorm.weight"], new["model.layers.0.input_layernorm.weight"])
    assert not torch.equal(orig["model.layers.1.mlp.up_proj.weight"], new["model.layers.1.mlp.up_proj.weight"])
    # ... and the function did not
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert _rel(loaded.module(x).logits, model(x).logits) < 1e-5
    assert (out / "tokenizer_config.json").is_file() and (out / "special_tokens_map.json").is_file()
    rec = result.report["checkpoint"][0]
    assert rec["reload_check"]["passed"] and rec["changed_keys"] > 0


def test_sharded_checkpoint_has_index_and_loads(tmp_path):
    from transformers import LlamaForCausalLM

    from normc.checkpoint import write_hf_dir
    from normc.pipeline import prepare_graph
    loaded = _llama(tmp_path)
    result = api.apply(api.load_rules(text=SMOOTH), loaded, None)
    before, _ = prepare_graph(loaded)
    out = tmp_path / "sharded"
    done = write_hf_dir(loaded.module, before, result.graph_module, out, source_dir=loaded.source_dir,
                        verify_inputs=[(loaded.example_args, {})], max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert done.reload_check["passed"]
    _, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bn_fold_resnet_dir_becomes_identity_bns(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=5)
    m = ResNetForImageClassification(cfg).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    loaded = _hf_dir(m, tmp_path / "resnet", (torch.randn(1, 3, 32, 32),), side_files=False)
    (tmp_path / "resnet" / "preprocessor_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()  # an existing (empty) directory is a directory target too
    result = api.apply(api.load_rules(text=BN), loaded, str(out))
    assert result.passed
    model, info = ResNetForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    bns = [mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert bns and all(torch.equal(b.running_mean, torch.zeros_like(b.running_mean)) for b in bns)
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in bns)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _rel(loaded.module(x).logits, model(x).logits) < 1e-5
        # the BNs compute exactly the identity plus their (folded) shift
        y = torch.randn(2, bns[0].num_features, 4, 4)
        assert torch.equal(bns[0](y), y + bns[0].bias[None, :, None, None])
    assert (out / "preprocessor_config.json").is_file()


def test_prenorm_to_rmsnorm_gpt2_dir_refused_nothing_written(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    loaded = _hf_dir(GPT2LMHeadModel(cfg).eval(), tmp_path / "gpt2", (torch.randint(0, 96, (1, 8)),))
    out = tmp_path / "out"
    with pytest.raises(NormcError) as e:
        api.apply(api.load_rules("examples/prenorm_to_rmsnorm.nc"), loaded, f"{out}/")
    msg = e.value.message
    assert "transformer.h.0.ln_1" in msg and "rms_norm" in msg and "layer_norm" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # no temporary left behind


def test_shard_writer_round_trip(tmp_path):
    from safetensors.torch import load_file
    tensors = {f"layer.{i}.w": torch.randn(10, 10, dtype=torch.bfloat16) for i in range(7)}
    w = ShardWriter(tmp_path, max_shard_bytes=450)
    for k, t in tensors.items():
        w.add(k, t)
    files = w.finish()
    assert files[-1] == "model.safetensors.index.json"
    where = checkpoint_files(tmp_path)
    assert set(where) == set(tensors)
    for k, t in tensors.items():
        got = load_file(str(where[k]))[k]
        assert got.dtype == torch.bfloat16 and torch.equal(got, t)
