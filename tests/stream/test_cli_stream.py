"""`normc zoo --write` and `normc apply DIR -o OUT/ --stream` from the command line."""
from __future__ import annotations

import json

from click.testing import CliRunner
from safetensors import safe_open

from normc.checkpoint import checkpoint_files
from normc.cli import main

RULES = """
pipeline {
  calibrate from "random" samples 2
  apply std.smooth_rms
  apply std.fold_norm_affine
}
"""


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _meta(folder):
    out = {}
    for k, f in checkpoint_files(folder).items():
        with safe_open(str(f), "pt") as h:
            t = h.get_tensor(k)
            out[k] = (tuple(t.shape), t.dtype)
    return out


def test_zoo_write_then_apply_streamed(tmp_path):
    src, out = tmp_path / "mini", tmp_path / "out"
    r = _cli("zoo", "--write", "llama-mini", src)
    assert r.exit_code == 0, r.output
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 4
    with safe_open(str(checkpoint_files(src)["model.layers.0.input_layernorm.weight"]), "pt") as h:
        gain = h.get_tensor("model.layers.0.input_layernorm.weight")
    assert not bool((gain == 1).all())  # gains not all one
    rules = tmp_path / "r.nc"
    rules.write_text(RULES)
    report = tmp_path / "r.json"
    r = _cli("apply", rules, src, "-o", f"{out}/", "--stream", "--samples", 1, "--report", report)
    assert r.exit_code == 0, r.output
    assert "streamed 4 blocks of model.layers" in r.output and "--stream" in r.output
    assert _meta(out) == _meta(src)  # keys, shapes, dtypes (bf16) kept
    rep = json.loads(report.read_text())["stream"]
    assert rep["reason"] == "--stream" and rep["worst_block"]["max_rel_err"] < 1e-2


def test_stream_needs_a_directory_output(tmp_path):
    src = tmp_path / "mini"
    assert _cli("zoo", "--write", "llama-mini", src).exit_code == 0
    rules = tmp_path / "r.nc"
    rules.write_text(RULES)
    r = _cli("apply", rules, src, "-o", tmp_path / "x.onnx", "--stream")
    assert r.exit_code == 2 and "-o OUTDIR/" in r.output
    r = _cli("apply", rules, "zoo:llama", "-o", f"{tmp_path / 'o'}/", "--stream")
    assert r.exit_code == 2 and "checkpoint directory" in r.output


def test_zoo_write_unknown_shape(tmp_path):
    r = _cli("zoo", "--write", "llama-7", tmp_path / "x")
    assert r.exit_code == 2 and "llama-7b" in r.output
    assert not (tmp_path / "x").exists()
