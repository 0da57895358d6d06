"""Hugging Face model classes from tiny configs (random weights, no download), as LoadedModels."""
from __future__ import annotations

import torch

from normc.frontend.specs import InputSpec, LoadedModel
from normc.frontend.zoo import _seeded, randomize_norms

VOCAB, SEQ = 128, 12
LM = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
          use_cache=False)


def build(model_class: str, config_class: str, config: dict, inputs) -> LoadedModel:
    """The model built from `config` (norm gains and statistics randomized: folding them is never a no-op),
    with example inputs: token ids ("ids") or pixels (("pixels", shape))."""
    import transformers
    cfg = getattr(transformers, config_class)(**config)
    with _seeded() as g:
        model = getattr(transformers, model_class)(cfg)
        randomize_norms(model, g)
        model.eval()
        if inputs == "ids":
            spec = InputSpec("input_ids", (1, SEQ), torch.int64, 0, min(VOCAB, getattr(cfg, "vocab_size", VOCAB)))
        else:
            spec = InputSpec("pixel_values", tuple(inputs[1]), torch.float32)
        example = spec.sample(g)
    return LoadedModel(model, (example,), {}, [spec], model_class, True)
