"""`normc apply RULES DIR -o OUTDIR/` from the command line: a user's save_pretrained folder in, a
checkpoint in the same layout out, loadable with from_pretrained as it is; a rewrite with no place in
that layout exits 2 and writes nothing."""
from __future__ import annotations

import json

import pytest
import torch

from tests.cli.test_cli import cli, max_rel, no_traceback

SMOOTH = """pipeline {
  calibrate from "random" samples 4
  apply std.smooth_rms
  apply std.fold_norm_affine
  verify rel 1e-5
}
"""
PRENORM = """pipeline {
  apply std.prenorm_to_rmsnorm
  verify rel 1e-4
}
"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("hfout") / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return folder


def test_cli_writes_a_checkpoint_from_pretrained_loads(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM
    rules, out, report = tmp_path / "smooth.nc", tmp_path / "out", tmp_path / "r.json"
    rules.write_text(SMOOTH)
    result = cli("apply", rules, llama_dir, "-o", f"{out}/", "--report", report, "--quiet")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    applied = {r["name"]: r["applied"] for r in json.loads(report.read_text())["rules"]}
    assert applied["std.smooth_rms"] == 5 and applied["std.fold_rms_norm_affine"] == 5  # 2 x 2 blocks + final
    original = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    rewritten, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert set(rewritten.state_dict()) == set(original.state_dict())
    norm = rewritten.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))  # the gain moved into the linears
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))  # not the traced shape
    with torch.no_grad():
        assert max_rel(original(ids).logits, rewritten.eval()(ids).logits) < 1e-5


def test_cli_refuses_a_rewrite_the_layout_cannot_hold(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    rules, out = tmp_path / "prenorm.nc", tmp_path / "out"
    rules.write_text(PRENORM)
    result = cli("apply", rules, folder, "-o", f"{out}/", "--quiet")
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert "transformer.h.0.ln_1" in result.output and "rms_norm" in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left
