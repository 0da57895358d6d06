"""Hugging Face directories for tests: tiny configs, random weights (seeded; norm gains and statistics
randomized so that folding them is never a no-op), written with `save_pretrained`. No download."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from normc.frontend.zoo import _seeded, randomize_norms

VOCAB = 128
LM = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64)


@dataclass(frozen=True)
class Family:
    name: str
    model: str           # transformers class saved (config.architectures)
    config_class: str
    config: dict
    inputs: str          # "ids", "pixels" or "ids+pixels"


FAMILIES = {f.name: f for f in [
    Family("gpt2", "GPT2LMHeadModel", "GPT2Config",
           dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32), "ids"),
    Family("opt", "OPTForCausalLM", "OPTConfig",
           dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
                max_position_embeddings=32, word_embed_proj_dim=32), "ids"),
    Family("llama", "LlamaForCausalLM", "LlamaConfig", dict(LM, num_key_value_heads=2), "ids"),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", dict(LM, num_key_value_heads=2), "ids"),
    Family("bert", "BertModel", "BertConfig", dict(LM, max_position_embeddings=32), "ids"),
    Family("vit", "ViTModel", "ViTConfig",
           dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8), "pixels"),
    Family("resnet", "ResNetModel", "ResNetConfig",
           dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), "pixels"),
    Family("convnext", "ConvNextModel", "ConvNextConfig",
           dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32), "pixels"),
    # beyond one input kind: an encoder-decoder (decoder_input_ids) and a dual encoder (ids + pixels)
    Family("t5", "T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
           "ids"),
    Family("clip", "CLIPModel", "CLIPConfig",
           dict(text_config=dict(LM, max_position_embeddings=32),
                vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   image_size=32, patch_size=8)), "ids+pixels"),
]}


def build_model(family: Family) -> torch.nn.Module:
    import transformers
    cfg = getattr(transformers, family.config_class)(**family.config)
    with _seeded() as g:
        model = getattr(transformers, family.model)(cfg)
        randomize_norms(model, g)
    return model.eval()


def save_dir(family: Family, path: Path, **save_kwargs) -> tuple[Path, torch.nn.Module]:
    """`save_pretrained` the family's model into `path` (plus a small tokenizer file to be carried)."""
    from transformers.utils import logging as hf_logging
    model = build_model(family)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(path), **save_kwargs)
    finally:
        hf_logging.enable_progress_bar()
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return path, model


def save_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over the words of normc's built-in sentences (no pad token: it pads with
    `</s>`), saved with `save_pretrained` into `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from normc.data import calibration_sentences
    words = sorted({w for s in calibration_sentences() for w in s.lower().split()})
    vocab = {"[UNK]": 0, "</s>": 1}
    for w in words[: vocab_size - len(vocab)]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(path))
