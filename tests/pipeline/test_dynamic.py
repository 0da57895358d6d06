"""Dynamic shapes and original names from tracing to the .pt2 / .onnx outputs (issue 9 items 2, 3, 6, 7;
issue 10 item 2: one trace of the model per run)."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normc import api
from normc.backends.onnx_backend import export_onnx, ort_session
from normc.backends.torch_backend import load_pt2
from normc.cli import main
from normc.frontend import trace as trace_mod
from normc.frontend.specs import LoadedModel, specs_from_examples
from normc.frontend.trace import trace_counts
from normc.pipeline import RunOptions, compile_model

RULES = """pipeline {{
  {apply}
  export torch to "{pt2}"
  export onnx to "{onnx}"
}}
"""


def _hf_loaded(model: nn.Module, kwargs: dict, name: str) -> LoadedModel:
    model.eval()
    return LoadedModel(model, (), kwargs, specs_from_examples((), kwargs), name, True)


def _tokens(vocab: int, batch: int, seq: int, mask: bool = True) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    out = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if mask:
        out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return out


def _pixels(batch: int, size: int = 32) -> dict:
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))}


def _run(loaded: LoadedModel, tmp_path, apply: str = "", **options):
    pt2, onnx_path = tmp_path / "m.pt2", tmp_path / "m.onnx"
    program = api.load_rules(text=RULES.format(apply=apply, pt2=pt2, onnx=onnx_path))
    before = trace_counts()
    result = compile_model(program, loaded, RunOptions(verify_inputs=1, allow_outside_writes=True, **options))
    after = trace_counts()
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    assert result.passed, result.report["verify"]
    return result, pt2, onnx_path, counts


def _check_outputs(model, pt2, onnx_path, inputs: list[dict], names: list[str]):
    """The .pt2 and the .onnx at each input match the original; ONNX outputs carry `names`, the .pt2
    returns the same keys."""
    sess = ort_session(onnx_path)
    assert [o.name for o in sess.get_outputs()] == names
    program = load_pt2(pt2)
    for kw in inputs:
        with torch.no_grad():
            ref = model(**kw)
        ref_leaves = [ref[n] for n in names]
        got = program(**kw)
        assert isinstance(got, dict) and list(got) == names
        outs = sess.run(None, {k: v.numpy() for k, v in kw.items()})
        for r, p, o in zip(ref_leaves, got.values(), outs):
            assert p.shape == r.shape and o.shape == tuple(r.shape)
            scale = float(r.abs().max())
            assert float((p - r).abs().max()) <= 1e-4 * max(1.0, scale)
            assert float(np.abs(o - r.numpy()).max()) <= 1e-4 * max(1.0, scale)


def _input_dims(onnx_path) -> dict:
    sess = ort_session(onnx_path)
    return {i.name: list(i.shape) for i in sess.get_inputs()}


def test_gpt2_dynamic_batch_and_sequence_with_original_names(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    loaded = _hf_loaded(model, _tokens(64, 1, 16), "gpt2-tiny")
    result, pt2, onnx_path, counts = _run(loaded, tmp_path, "apply std.prenorm_to_rmsnorm")
    # one trace of the model, one export of the rewritten graph shared by .pt2 and .onnx
    assert counts.get("torch.export") == 1 and counts.get("export_graph") == 1
    assert "symbolic_trace" not in counts
    assert result.report["trace"]["dynamic"] == {"input_ids": {0: "batch", 1: "sequence"},
                                                 "attention_mask": {0: "batch", 1: "sequence"}}
    shapes = [s["input_ids"] for s in result.report["trace"]["verified_shapes"]]
    assert len({tuple(s) for s in shapes}) == 3  # the example and two other shapes were verified
    assert result.report["verify"]["n_inputs"] >= 4
    assert _input_dims(onnx_path) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    inputs = [_tokens(64, b, s) for b, s in [(1, 8), (3, 33), (3, 8), (1, 33)]]
    _check_outputs(model, pt2, onnx_path, inputs, ["logits"])


def test_static_keeps_the_example_shape(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    loaded = _hf_loaded(model, _tokens(64, 1, 16, mask=False), "gpt2-tiny")
    result, pt2, onnx_path, _ = _run(loaded, tmp_path, static=True)
    assert result.report["trace"]["dynamic"] == {}
    assert "verified_shapes" not in result.report["trace"]
    assert _input_dims(onnx_path) == {"input_ids": [1, 16]}
    _check_outputs(model, pt2, onnx_path, [_tokens(64, 1, 16, mask=False)], ["logits"])
    with pytest.raises(AssertionError, match="Guard failed"):  # the static program refuses another batch
        load_pt2(pt2)(**_tokens(64, 3, 16, mask=False))


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean(dim=(2, 3))), y


def test_symbolic_trace_model_gets_dynamic_batch_and_image_size(tmp_path):
    m = SmallCnn().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 16, 16)
    loaded = LoadedModel(m, (x,), {}, specs_from_examples((x,), {}, ["x"]), "cnn", False)
    result, pt2, onnx_path, counts = _run(loaded, tmp_path, "apply std.fold_bn_conv")
    assert counts.get("symbolic_trace") == 1 and "torch.export" not in counts and counts.get("export_graph") == 1
    assert result.report["rules"][0]["applied"] == 1
    assert _input_dims(onnx_path) == {"x": ["batch", 3, "height", "width"]}
    sess = ort_session(onnx_path)
    assert [o.name for o in sess.get_outputs()] == ["output_0", "output_1"]
    program = load_pt2(pt2)
    for shape in [(3, 3, 16, 16), (2, 3, 9, 12)]:
        xi = torch.randn(*shape)
        with torch.no_grad():
            ref = m(xi)
        got = program(xi)
        assert isinstance(got, tuple) and len(got) == 2
        outs = sess.run(None, {"x": xi.numpy()})
        for r, p, o in zip(ref, got, outs):
            assert torch.allclose(p, r, atol=1e-4) and np.allclose(o, r.numpy(), atol=1e-4)


def test_a_model_that_cannot_be_traced_dynamically_falls_back_with_a_warning(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    real = trace_mod._export_original

    def refuse_dynamic(module, args, kwargs, dynamic_shapes=None):
        if dynamic_shapes is not None:
            raise RuntimeError("Constraints violated (batch)! a planted refusal")
        return real(module, args, kwargs, dynamic_shapes)

    monkeypatch.setattr(trace_mod, "_export_original", refuse_dynamic)
    loaded = _hf_loaded(model, _tokens(64, 1, 16, mask=False), "gpt2-tiny")
    result, _, onnx_path, _ = _run(loaded, tmp_path)
    warned = [w for w in result.report["warnings"] if w.startswith("shapes are static")]
    assert warned and "Constraints violated (batch)! a planted refusal" in warned[0]
    assert _input_dims(onnx_path) == {"input_ids": [1, 16]}


# --------------------------------------------------------------------------- CLI: nothing rewritten, logs
def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _cnn_factory(tmp_path) -> str:
    path = tmp_path / "cnn.py"
    path.write_text("import torch\nfrom torch import nn\n\n"
                    "def build():\n"
                    "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()\n"
                    "    return m, torch.randn(1, 3, 12, 12)\n")
    return f"{path}:build"


def test_nothing_rewritten_is_said_and_require_applied_fails(tmp_path):
    rules = tmp_path / "bn.nc"
    rules.write_text("pipeline {\n  apply std.fold_bn_conv\n}\n")
    model = _cnn_factory(tmp_path)
    out, report = tmp_path / "m.pt2", tmp_path / "r.json"
    ok = _cli("apply", rules, model, "-o", out, "--report", report, "--quiet", "--samples", "1")
    assert ok.exit_code == 0 and out.exists()
    assert "no site was rewritten" in ok.output
    data = json.loads(report.read_text())
    assert data["nothing_rewritten"]["message"] == "no site was rewritten"
    assert data["nothing_rewritten"]["reasons"]
    out.unlink()
    strict = _cli("apply", rules, model, "-o", out, "--report", report, "--require-applied", "--quiet",
                  "--samples", "1")
    assert strict.exit_code == 1 and not out.exists()
    assert "no site was rewritten (--require-applied)" in strict.output
    assert json.loads(report.read_text())["verify"]["passed"] is False


def test_not_a_terminal_one_line_per_stage_and_quiet(tmp_path):
    rules = tmp_path / "none.nc"
    rules.write_text("# nothing\n")
    model = _cnn_factory(tmp_path)
    res = _cli("check", rules, model, "--samples", "1")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("normc: ")]
    assert any(re.fullmatch(r"normc: tracing  \d+\.\ds", ln) for ln in lines), lines
    assert any(re.fullmatch(r"normc: loading model  \d+\.\ds", ln) for ln in lines), lines
    quiet = _cli("check", rules, model, "--samples", "1", "--quiet")
    assert quiet.exit_code == 0 and "normc: " not in quiet.stderr


def test_onnx_export_of_a_training_mode_graph_warns_nothing(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.LayerNorm(4)))
    gm.train()
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(gm, (x,), None, tmp_path / "m.onnx")
    assert gm.training  # the caller's mode is left as it was
    assert not [w for w in caught if "training mode" in str(w.message)]
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "normc" in w.filename]
    sess = ort_session(tmp_path / "m.onnx")
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    gm.eval()
    assert np.allclose(out, gm(x).detach().numpy(), atol=1e-5)  # dropout traced in eval mode: identity


# --------------------------------------------------------------------------- more architectures (slow)
@pytest.mark.slow
def test_bert_names_and_dynamic_shapes(tmp_path):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    loaded = _hf_loaded(model, _tokens(64, 1, 16), "bert-tiny")
    _, pt2, onnx_path, counts = _run(loaded, tmp_path)
    assert counts.get("torch.export") == 1 and counts.get("export_graph") == 1
    dims = _input_dims(onnx_path)
    assert dims["input_ids"] == ["batch", "sequence"]
    # BERT's mask broadcasts over the batch: torch keeps its batch a symbol of its own
    assert dims["attention_mask"][1] == "sequence" and isinstance(dims["attention_mask"][0], str)
    inputs = [_tokens(64, b, s) for b, s in [(1, 8), (3, 33)]]
    _check_outputs(model, pt2, onnx_path, inputs, ["last_hidden_state", "pooler_output"])


@pytest.mark.slow
def test_vit_names_and_dynamic_batch(tmp_path):
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    model = ViTModel(cfg).eval()
    loaded = _hf_loaded(model, _pixels(1), "vit-tiny")
    _, pt2, onnx_path, _ = _run(loaded, tmp_path, "apply std.prenorm_to_rmsnorm")
    assert _input_dims(onnx_path)["pixel_values"][0] == "batch"
    _check_outputs(model, pt2, onnx_path, [_pixels(3), _pixels(1)], ["last_hidden_state", "pooler_output"])


@pytest.mark.slow
def test_resnet_names_and_dynamic_batch(tmp_path):
    from transformers import ResNetConfig, ResNetModel
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = ResNetModel(cfg).eval()
    loaded = _hf_loaded(model, _pixels(1), "resnet-tiny")
    result, pt2, onnx_path, _ = _run(loaded, tmp_path, "apply std.bn")
    assert result.report["rules"][0]["applied"] > 0
    assert _input_dims(onnx_path)["pixel_values"][:2] == ["batch", 3]
    _check_outputs(model, pt2, onnx_path, [_pixels(3), _pixels(1)], ["last_hidden_state", "pooler_output"])
