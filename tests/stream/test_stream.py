"""Streaming: a checkpoint directory rewritten block by block equals the non-streaming result."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from normc import api
from normc.checkpoint import checkpoint_files
from normc.frontend.specs import InputSpec, LoadedModel
from normc.frontend.trace import TRACE_COUNTS
from normc.stream import stream_apply
from normc.verify.inputs import sample_inputs

RULES = """
pipeline {
  calibrate from "random" samples 4
  apply std.smooth_rms
  apply std.fold_norm_affine
}
"""


def _llama_dir(folder, dtype=torch.float32, layers=3, shard="100KB"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # RMSNorm gains not all one
    m.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for k, f in checkpoint_files(folder).items():
        with safe_open(str(f), "pt") as h:
            out[k] = h.get_tensor(k)
    return out


SPECS = [InputSpec("input_ids", (1, 8), torch.int64, 0, 128)]


def test_stream_equals_non_streaming_bit_for_bit(tmp_path):
    from transformers import LlamaForCausalLM
    src = _llama_dir(tmp_path / "src")
    assert len(set(checkpoint_files(src).values())) > 1  # sharded input
    prog = api.load_rules(text=RULES)
    traces = TRACE_COUNTS["torch.export"]
    rep = stream_apply(prog, src, tmp_path / "streamed", input_specs=SPECS, verify_inputs=2)
    assert rep.blocks == 3 and rep.block_path == "model.layers" and rep.calibration_samples == 4
    assert TRACE_COUNTS["torch.export"] - traces == rep.blocks + 1  # each block and the head traced once
    assert all(e["passed"] and e["sites"] > 0 for e in rep.per_unit)
    assert rep.end_to_end["within_tolerance"] and not rep.warnings

    model = LlamaForCausalLM.from_pretrained(src).eval()
    model.config.use_cache = False  # what the HF directory loader does
    example = sample_inputs(SPECS, 1, seed=0)[0]
    loaded = LoadedModel(model, example[0], {}, SPECS, str(src), True)
    loaded.source_dir = str(src)
    result = api.apply(prog, loaded, f"{tmp_path / 'plain'}/")
    assert result.passed
    a, b = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "plain")
    assert a.keys() == b.keys() == _tensors(src).keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # and the weights did change
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], _tensors(src)["model.layers.1.mlp.up_proj.weight"])


def test_stream_bf16_blocks_reproduce_the_original_independently(tmp_path):
    """Two blocks of the output, loaded into plain transformers layers, compute what the input's do
    (no normc code in the check); keys, shapes and dtypes equal the input's."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )
    src = _llama_dir(tmp_path / "src", dtype=torch.bfloat16)
    rep = stream_apply(api.load_rules(text=RULES), src, tmp_path / "out", input_specs=SPECS, verify_inputs=1,
                       max_shard_bytes=60_000)
    for e in rep.per_unit:  # each unit's gate: 3 x max(bf16's 1e-2, the original's own bf16 error vs float32)
        assert 1e-4 < e["original_dtype_error_rel"] < 5e-2, e
        assert e["tolerance_rel"] == pytest.approx(3 * max(1e-2, e["original_dtype_error_rel"]))
    e2e = rep.end_to_end  # both models against the checkpoint computed in float32
    assert 0 < e2e["original_vs_float32_rel"] < 5e-2 and 0 < e2e["rewritten_vs_float32_rel"] < 5e-2, e2e
    a, b = _tensors(src), _tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype == torch.bfloat16 for k in a)
    assert len(set(checkpoint_files(tmp_path / "out").values())) > 1
    cfg = LlamaConfig.from_pretrained(src)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    h = torch.randn(2, 8, cfg.hidden_size, dtype=torch.float32)
    pos = torch.arange(8)[None].expand(2, 8)
    rope = LlamaRotaryEmbedding(cfg)(h, pos)
    mask = torch.full((8, 8), float("-inf")).triu(1)[None, None].expand(2, 1, 8, 8)

    def run(weights, i):
        layer = LlamaDecoderLayer(cfg, i).eval()
        prefix = f"model.layers.{i}."
        layer.load_state_dict({k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)})
        with torch.no_grad():
            out = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out

    for i in (0, 2):
        ref, got = run(a, i), run(b, i)
        assert float((ref - got).abs().max() / ref.abs().max()) < 2e-2  # bf16 weights, rounded once
        assert not torch.equal(a[f"model.layers.{i}.mlp.gate_proj.weight"], b[f"model.layers.{i}.mlp.gate_proj.weight"])
    # the final norm's gain went into lm_head
    norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    assert torch.equal(b["model.norm.weight"], torch.ones_like(b["model.norm.weight"]))
    with torch.no_grad():
        norm.weight.copy_(a["model.norm.weight"].float())
        ref = torch.nn.functional.linear(norm(h), a["lm_head.weight"].float())
        norm.weight.fill_(1.0)
        got = torch.nn.functional.linear(norm(h), b["lm_head.weight"].float())
    assert float((ref - got).abs().max() / ref.abs().max()) < 2e-2


def test_stream_failing_verification_writes_nothing(tmp_path):
    from normc.errors import VerificationFailed
    src = _llama_dir(tmp_path / "src", layers=2)
    prog = api.load_rules(text=RULES.replace("}\n", "  verify rel 1e-12\n}\n"))  # fp32 rounding exceeds it
    with pytest.raises(VerificationFailed, match="model.layers.0") as info:
        stream_apply(prog, src, tmp_path / "out", input_specs=SPECS, verify_inputs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    partial = info.value.stream_report  # what --report writes: the failing unit with its figures
    assert "model.layers.0" in partial.failure
    assert [e["unit"] for e in partial.per_unit] == ["model.layers.0"] and not partial.per_unit[0]["passed"]


@pytest.mark.parametrize("forced", [True, False])
def test_should_stream(tmp_path, forced):
    from normc.stream import should_stream
    src = _llama_dir(tmp_path / "src", layers=2)
    go, why = should_stream(src, forced)
    assert go is forced and (why == "--stream") is forced


def test_stream_opt_smooth_unties_the_head(tmp_path):
    """Pre-LN OPT (LayerNorm with bias, head tied to the embeddings): std.smooth streamed; the head's
    new weight no longer equals the embedding, so the output writes both and unties them in config.json."""
    import json

    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)
    m = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.uniform_(-0.5, 0.5)
    m.save_pretrained(tmp_path / "src")
    rules = "pipeline {\n  calibrate from \"random\" samples 3\n  apply std.smooth\n}\n"
    specs = [InputSpec("input_ids", (1, 8), torch.int64, 0, 96)]
    rep = stream_apply(api.load_rules(text=rules), tmp_path / "src", tmp_path / "out", input_specs=specs,
                       verify_inputs=1)
    assert [e["sites"] for e in rep.per_unit] == [2, 2, 1]  # two LNs per block, the final LN -> head
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    out, info = OPTForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref, got = m(x).logits, out.eval()(x).logits
    assert float((ref - got).abs().max() / ref.abs().max()) < 1e-5
