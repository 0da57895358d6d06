"""Hugging Face model directories (``save_pretrained`` layout) as models.

A directory with ``config.json`` and safetensors weights (``model.safetensors``, or shards
named by ``model.safetensors.index.json``) is loaded offline:

* the class is ``config.architectures[0]`` looked up in the installed ``transformers``,
  or the one ``task`` names (a task such as ``causal-lm``, an auto class such as
  ``AutoModelForMaskedLM``, or a model class such as ``BertModel``);
* weights come from safetensors only; a directory with only pickled ``.bin`` weights is
  refused unless ``allow_pickle``; every parameter must be in the checkpoint (a missing
  key would otherwise be filled with random numbers);
* no code from the directory runs: a config with ``auto_map`` (custom modelling code) or an
  unknown ``model_type`` is refused unless ``trust_remote_code``;
* ``use_cache=False`` where the config has it, float32, eval mode;
* example inputs come from the config, as keyword arguments named like ``forward``'s:
  ``input_ids`` (uniform in ``[0, vocab_size)``, seed :data:`EXAMPLE_SEED`), ``attention_mask``
  (all ones), ``token_type_ids`` (in ``[0, type_vocab_size)``) and, for encoder-decoders,
  ``decoder_input_ids`` where ``forward`` takes them, of shape ``[batch, seq_len]`` (default
  ``[1, 16]``, at most the position table);
  ``pixel_values`` ``[batch, num_channels, image_size, image_size]`` from the config (its
  ``vision_config`` for dual encoders such as CLIP, which get both), or
  :data:`DEFAULT_IMAGE_SIZE` for CNN configs that name no size (ResNet, ConvNeXt, ...).

The :class:`LoadedModel` records the directory (``hf_dir``), the config (``hf_config``, as loaded:
``use_cache=False`` and float32 -- the original stays in ``hf_dir / "config.json"``) and the
tokenizer / preprocessor files beside the weights (``hf_files``), for writers that rebuild a
Hugging Face directory. Calibration text is tokenized with the directory's own tokenizer
(:func:`text_tokenizer`).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

from normc.errors import NormcError
from normc.frontend.specs import EXAMPLE_SEED, InputSpec, LoadedModel

DEFAULT_BATCH = 1
DEFAULT_SEQ_LEN = 16
# ImageNet resolution: what CNN checkpoints (ResNet, ConvNeXt, RegNet, ...) were trained at when
# their config names no image size.
DEFAULT_IMAGE_SIZE = 224

# Task names (as in optimum / the transformers pipelines) -> auto class.
TASKS = {
    "base": "AutoModel",
    "feature-extraction": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "text-generation": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "fill-mask": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "multiple-choice": "AutoModelForMultipleChoice",
    "image-classification": "AutoModelForImageClassification",
}

# Files a Hugging Face directory carries besides config and weights, that a rebuilt
# directory needs to be used the same way (tokenizers, processors, generation defaults).
COPY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "image_processor_config.json", "processor_config.json",
    "feature_extractor_config.json", "video_preprocessor_config.json", "generation_config.json",
)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
_OTHER_WEIGHTS = {".h5": "TensorFlow", ".msgpack": "Flax", ".gguf": "GGUF", ".onnx": "ONNX"}
_INPUT_KINDS = ("input_ids", "pixel_values")


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0][:300] if lines else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


@contextlib.contextmanager
def _offline_and_quiet():
    """No hub access (``HF_HUB_OFFLINE``), no progress bars, no transformers warnings on stderr."""
    from transformers.utils import logging as hf_logging

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- checks on the files


def _read_config_json(d: Path) -> dict:
    cfg = d / "config.json"
    if not cfg.is_file():
        raise NormcError(f"`{d}` is a folder without config.json, so not a Hugging Face model directory",
                         hint="point at the folder `model.save_pretrained(...)` wrote, or name a model file "
                         "(`model.pt2`, `file.py:function`)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormcError(f"`{cfg}` is not readable JSON: {_one_line(e)}",
                         hint="re-save the model with `save_pretrained`") from e
    if not isinstance(data, dict):
        raise NormcError(f"`{cfg}` holds a JSON {type(data).__name__}, not an object",
                         hint="re-save the model with `save_pretrained`")
    return data


def _check_code_free(d: Path, data: dict, trust_remote_code: bool) -> None:
    """Refuse a config that needs Python code from the directory (``auto_map``, unknown model_type)."""
    if trust_remote_code:
        return
    if data.get("auto_map"):
        names = ", ".join(sorted({str(v) if isinstance(v, str) else str(v[0]) for v in data["auto_map"].values()}))
        raise NormcError(f"`{d}` needs its own Python code to build the model ({names}); loading it would run "
                         "code from the directory",
                         hint="pass --trust-remote-code only if you trust its author")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise NormcError(f"`{d / 'config.json'}` names no model_type",
                         hint="re-save the model with `save_pretrained` from a transformers model class")
    if model_type not in CONFIG_MAPPING:
        import transformers
        raise NormcError(f"model_type `{model_type}` of `{d}` is not in transformers {transformers.__version__}",
                         hint="upgrade transformers, or pass --trust-remote-code if the directory ships "
                         "its own modelling code and you trust its author")


def _weights(d: Path, allow_pickle: bool) -> bool:
    """Check the weight files; True when safetensors are used, False for pickled .bin."""
    index = d / _SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise NormcError(f"`{index}` is not a valid safetensors index: {_one_line(e)}",
                             hint="it must be JSON with a `weight_map` from tensor names to shard files") from e
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise NormcError(f"`{d}` lacks {len(missing)} of the {len(shards)} shards its index names: "
                             + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""),
                             hint="copy the whole directory, every `model-XXXXX-of-YYYYY.safetensors` file")
        return True
    files = [p for p in d.iterdir() if p.is_file()]
    if any(p.name == "model.safetensors" for p in files):
        return True
    safetensors = [p.name for p in files if p.suffix == ".safetensors"]
    if safetensors:
        raise NormcError(f"`{d}` has safetensors files ({', '.join(sorted(safetensors)[:3])}) but neither "
                         f"`model.safetensors` nor `{_SAFETENSORS_INDEX}`",
                         hint="save with `save_pretrained`, which names the file (or writes the shard index)")
    pickled = sorted(p.name for p in files if p.suffix in _PICKLE_WEIGHTS)
    if pickled:
        if not allow_pickle:
            raise NormcError(f"`{d}` has only pickled weights ({', '.join(pickled[:3])}); unpickling runs code "
                             "from the file",
                             hint="convert them to safetensors (`model.save_pretrained(dir)` writes "
                             "model.safetensors), or pass --allow-pickle only if you trust their author")
        return False
    other = sorted({_OTHER_WEIGHTS[p.suffix] for p in files if p.suffix in _OTHER_WEIGHTS})
    if other:
        raise NormcError(f"`{d}` has {' and '.join(other)} weights, which normc does not read",
                         hint="save the PyTorch model with `save_pretrained` (model.safetensors)")
    raise NormcError(f"`{d}` has a config.json but no weights (no model.safetensors, no shard index)",
                     hint="copy the weight files into the directory, or save the model with `save_pretrained`")


# --------------------------------------------------------------------------- the class


def _model_class(d: Path, config: Any, task: str | None) -> type:
    import transformers

    version = transformers.__version__
    if task is not None:
        name = TASKS.get(task.strip().lower(), task.strip())
        cls = getattr(transformers, name, None)
        if not _is_model_class(cls):
            raise NormcError(f"`--task {task}` names neither a task nor a model class of transformers {version}",
                             hint="use one of: " + ", ".join(sorted(set(TASKS))) +
                             ", an auto class (AutoModelForCausalLM) or a class such as BertModel")
        if not _auto_fits(cls, config):
            fits = [t for t, a in TASKS.items() if _auto_fits(getattr(transformers, a, None), config)]
            raise NormcError(f"`--task {task}` ({cls.__name__}) has no model for model_type "
                             f"`{config.model_type}` in transformers {version}",
                             hint=("tasks it has: " + ", ".join(fits)) if fits else "drop --task")
        return cls
    archs = getattr(config, "architectures", None) or []
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map:  # the directory's own code (only reached with trust_remote_code): through its auto class
        autos = [k for k in auto_map if k.startswith("AutoModel") and _is_model_class(getattr(transformers, k, None))]
        named = [k for k in autos if archs and str(auto_map[k]).rsplit(".", 1)[-1] == str(archs[0])]
        if named or autos:
            return getattr(transformers, (named or autos)[0])
    if not archs:
        raise NormcError(f"`{d / 'config.json'}` names no architecture (`architectures` is empty)",
                         hint="pass --task, e.g. --task causal-lm or --task base")
    name = str(archs[0])
    cls = getattr(transformers, name, None)
    if cls is None:
        raise NormcError(f"the model class `{name}` (config.architectures) is not in transformers {version}",
                         hint="upgrade transformers, or pass --task (e.g. --task base) to load it with an "
                         "auto class")
    if not _is_model_class(cls):
        raise NormcError(f"`{name}` in config.architectures is not a model class of transformers",
                         hint="fix config.json, or pass --task")
    return cls


def _auto_fits(cls: Any, config: Any) -> bool:
    """False when ``cls`` is an auto class without a model for this config's type."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls is not None
    try:
        return type(config) in mapping
    except Exception:  # lazy mappings import model modules; when that fails, let from_pretrained say why
        return True


def _is_model_class(cls: Any) -> bool:
    if not isinstance(cls, type):
        return False
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return issubclass(cls, (PreTrainedModel, _BaseAutoModelClass))


# --------------------------------------------------------------------------- loading


def load_hf_dir(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    batch: int | None = None,
    seq_len: int | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """Load a ``save_pretrained`` directory (see the module docstring)."""
    d = Path(path)
    if not d.is_dir():
        raise NormcError(f"`{path}` is not a directory", hint="name the folder that holds config.json")
    data = _read_config_json(d)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise NormcError("reading a Hugging Face directory needs the `transformers` package",
                         hint="pip install 'transformers>=4.45'") from e
    _check_code_free(d, data, trust_remote_code)
    use_safetensors = _weights(d, allow_pickle)

    from transformers import AutoConfig

    with _offline_and_quiet():
        try:
            config = AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:  # a bad config may raise anything
            raise NormcError(f"transformers cannot read `{d / 'config.json'}`: {_one_line(e)}",
                             hint="re-save the model with `save_pretrained` from this transformers version") from e
        for cfg in {id(c): c for c in (config, _text_config(config))}.values():
            if hasattr(cfg, "use_cache"):
                cfg.use_cache = False  # a KV cache object in the outputs cannot be traced
        cls = _model_class(d, config, task)
        try:
            model, info = cls.from_pretrained(
                str(d), config=config, local_files_only=True, use_safetensors=use_safetensors,
                trust_remote_code=trust_remote_code, output_loading_info=True, **_float32())
        except NormcError:
            raise
        except Exception as e:
            raise NormcError(f"loading `{d}` as {cls.__name__} failed: {_one_line(e)}",
                             hint="check that the weights belong to this config (or choose --task)") from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        what = (f"lacks {len(missing)} weights of {type(model).__name__}: " + ", ".join(missing[:4])
                + (" ..." if len(missing) > 4 else "")) if missing else \
            f"has weights of other shapes: {', '.join(mismatched[:3])}"
        archs = getattr(config, "architectures", None)
        raise NormcError(f"`{d}` {what} (they would be random)",
                         hint=f"load it as the class it was saved from ({', '.join(archs)}): drop --task"
                         if task and archs else "check that the weights belong to this config")
    model.eval()
    notes = [f"Hugging Face directory loaded as {type(model).__name__} (float32, use_cache=False)"]
    if getattr(config, "auto_map", None):
        notes.append("the directory's own modelling code ran (--trust-remote-code)")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        notes.append(f"{len(unexpected)} checkpoint tensors unused by {type(model).__name__}: "
                     + ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else ""))
    kwargs, specs = example_inputs(model, config, batch=batch, seq_len=seq_len, image_size=image_size)
    files = [d / f for f in COPY_FILES if (d / f).is_file()]
    return LoadedModel(model, (), kwargs, specs, str(path), True, notes=notes,
                       hf_dir=d, hf_config=model.config, hf_files=files)


def _float32() -> dict:
    """`dtype=` (transformers >= 4.56; `torch_dtype=` before)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except Exception:  # noqa: BLE001
        return config


# --------------------------------------------------------------------------- example inputs


def _positive(name: str, value: int | None, default: int) -> int:
    v = default if value is None else int(value)
    if v < 1:
        raise NormcError(f"{name} must be at least 1, not {v}", hint=f"pass a positive {name}")
    return v


def example_inputs(model: torch.nn.Module, config: Any, *, batch: int | None = None, seq_len: int | None = None,
                   image_size: int | None = None) -> tuple[dict, list[InputSpec]]:
    """Keyword example inputs for ``model`` derived from its config, and their specs."""
    batch = _positive("batch", batch, DEFAULT_BATCH)
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    main = getattr(model, "main_input_name", "input_ids")
    if main not in _INPUT_KINDS or main not in params:
        raise NormcError(f"{type(model).__name__} takes `{main}`; normc derives example inputs for token "
                         "(input_ids) and image (pixel_values) models only",
                         hint="write a factory `model.py:build` returning (model, example_inputs)")
    specs: list[InputSpec] = []
    if main == "input_ids":
        text = _text_config(config)
        vocab = getattr(text, "vocab_size", None)
        if not vocab:
            raise NormcError(f"the config of {type(model).__name__} has no vocab_size to draw token ids from",
                             hint="write a factory `model.py:build` returning (model, example_inputs)")
        limit = _max_positions(text)
        seq = _positive("seq_len", seq_len, min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN)
        if limit and seq > limit:
            raise NormcError(f"seq_len {seq} exceeds the {limit} positions of {type(model).__name__}",
                             hint=f"pass a sequence length of at most {limit}")
        shape = (batch, seq)
        specs.append(InputSpec("input_ids", shape, torch.int64, 0, int(vocab)))
        if "attention_mask" in params:
            specs.append(InputSpec("attention_mask", shape, torch.int64, 1, 2))
        types = getattr(text, "type_vocab_size", None)
        if "token_type_ids" in params and types:
            specs.append(InputSpec("token_type_ids", shape, torch.int64, 0, int(types)))
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            # an encoder-decoder (T5, BART, ...) runs its decoder on target ids: as many as the source
            specs.append(InputSpec("decoder_input_ids", shape, torch.int64, 0, int(vocab)))
    vision = getattr(config, "vision_config", None)
    if main == "pixel_values" or ("pixel_values" in params and vision is not None):
        # an image model, or a dual encoder (CLIP, SigLIP, ...) whose vision tower has its own config
        vision = vision if vision is not None else config
        channels = int(getattr(vision, "num_channels", 3) or 3)
        size = image_size if image_size is not None else getattr(vision, "image_size", None)
        if isinstance(size, (list, tuple)):
            h, w = (int(size[0]), int(size[-1]))
        else:
            h = w = _positive("image_size", size, DEFAULT_IMAGE_SIZE)
        specs.append(InputSpec("pixel_values", (batch, channels, h, w), torch.float32))
    g = torch.Generator().manual_seed(EXAMPLE_SEED)
    return {s.name: s.sample(g) for s in specs}, specs


def _max_positions(config: Any) -> int | None:
    """The length of a learned position table, if the model has one (rotary models have no limit
    that matters for a short example)."""
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0 and getattr(config, "rope_theta", None) is None \
                and getattr(config, "rope_parameters", None) is None:
            return v
    return None


# --------------------------------------------------------------------------- the directory's tokenizer

# a vocabulary (tokenizer_config.json alone is settings, not a tokenizer)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


def text_tokenizer(loaded: LoadedModel):
    """A calibration tokenizer ``(sentences, max_length) -> BatchEncoding`` from the files of the
    Hugging Face directory ``loaded`` came from (padded to ``max_length``; a tokenizer without a pad
    token pads with its end-of-sequence token, which the attention mask hides)."""
    d = loaded.hf_dir
    if d is None or not any((d / f).is_file() for f in _TOKENIZER_FILES):
        raise NormcError(f"`{loaded.source}` has no tokenizer files to turn calibration text into token ids",
                         hint="save the tokenizer into the directory (`tokenizer.save_pretrained(dir)`), or "
                         "calibrate from a tensor file or \"random\"")
    trust = bool(getattr(loaded.hf_config, "auto_map", None))  # the user passed --trust-remote-code for it
    from transformers import AutoTokenizer

    with _offline_and_quiet():
        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust)
        except Exception as e:
            raise NormcError(f"transformers cannot load the tokenizer of `{loaded.source}`: {_one_line(e)}",
                             hint="calibrate from a tensor file or \"random\" instead") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise NormcError(f"the tokenizer of `{loaded.source}` has neither a pad nor an end-of-sequence token",
                             hint="set `pad_token` in tokenizer_config.json, or calibrate from a tensor file")
        tok.pad_token = tok.eos_token

    def tokenize(sentences: list[str], max_length: int):
        return tok(list(sentences), padding="max_length", truncation=True, max_length=int(max_length),
                   return_tensors="pt")

    return tokenize
