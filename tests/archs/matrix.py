"""The architecture matrix: Hugging Face model classes from tiny configs (random weights, no download),
each with the example pipelines that apply to it and the outcome written down as data.

`test_matrix.py` runs every entry (the `fast` ones in the default run, the rest with `-m slow`);
`table.py` renders docs/architectures.md from this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .models import LM, VOCAB


@dataclass(frozen=True)
class Outcome:
    result: str                                   # converted | partly converted | gains folded | refused | folded | fused
    ops: dict = field(default_factory=dict)       # canonical op -> (count before, count after)
    applied: dict = field(default_factory=dict)   # rule -> sites rewritten
    reason: str = ""                              # text one of the rule's refusals contains (the first rule in `applied`)
    note: str = ""                                # one line for the table


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    model: str                                    # transformers class
    config_class: str
    config: dict
    inputs: object                                # "ids", or ("pixels", shape)
    outcomes: dict                                # example (examples/<name>.nc) -> Outcome
    fast: str | None = None                       # the example run in the default test run


PIX = ("pixels", (1, 3, 32, 32))
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
PRENORM = "prenorm_to_rmsnorm"
POST_LN = "post-LN: layer_norm `"
RAW_OUTPUT = "model output `last_hidden_state` is the residual stream itself"


def _ln(n, folded, extra=None, **more):
    """Pre-LN -> Pre-RMSNorm: n LayerNorms become RMSNorms, `folded` affines went into linears."""
    ops = {"layer_norm": (n, 0), "rms_norm": (0, n)}
    ops.update(extra or {})
    return Outcome("converted", ops, {"std.prenorm_to_rmsnorm": more.pop("streams", 1),
                                      "std.fold_layer_norm_affine": folded}, **more)


def _rms(n, folded, **more):
    """An RMSNorm model: nothing to convert; the gains fold into the linears that read the norms."""
    return Outcome("gains folded", {"rms_norm": (n, n)}, {"std.fold_rms_norm_affine": folded,
                                                          "std.prenorm_to_rmsnorm": 0}, **more)


def _post_ln(n=5):
    return Outcome("refused", {"layer_norm": (n, n)}, {"std.prenorm_to_rmsnorm": 0}, POST_LN,
                   "post-LN: each LayerNorm normalizes a residual add")


ARCHS = [
    # ------------------------------------------------------------------ decoder LMs
    Arch("gpt2", "decoder LM", "GPT2LMHeadModel", "GPT2Config",
         dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, use_cache=False), "ids",
         {PRENORM: _ln(5, 4, note="Conv1D (addmm) projections; the tied LM head is untied")}),
    Arch("gpt-neox", "decoder LM", "GPTNeoXForCausalLM", "GPTNeoXConfig", dict(LM), "ids",
         {PRENORM: _ln(5, 5, note="parallel attention + MLP")}),
    Arch("gpt-j", "decoder LM", "GPTJForCausalLM", "GPTJConfig",
         dict(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=32, use_cache=False), "ids",
         {PRENORM: _ln(3, 3, note="one LayerNorm read by attention and MLP")}),
    Arch("codegen", "decoder LM", "CodeGenForCausalLM", "CodeGenConfig",
         dict(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=32, n_ctx=32,
              use_cache=False), "ids", {PRENORM: _ln(3, 3)}),
    Arch("phi", "decoder LM", "PhiForCausalLM", "PhiConfig", dict(LM), "ids", {PRENORM: _ln(3, 3)}),
    Arch("opt", "decoder LM", "OPTForCausalLM", "OPTConfig",
         dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=32, word_embed_proj_dim=32, use_cache=False), "ids", {PRENORM: _ln(5, 5)}),
    Arch("bloom", "decoder LM", "BloomForCausalLM", "BloomConfig",
         dict(vocab_size=VOCAB, hidden_size=32, n_head=4, n_layer=2, use_cache=False), "ids",
         {PRENORM: _ln(6, 5, {"reduce_mean": (0, 1), "sub": (0, 1)}, streams=2,
                       note="the stream starts at word_embeddings_layernorm: one centring op y - mean(y) after it")},
         fast=PRENORM),
    Arch("falcon", "decoder LM", "FalconForCausalLM", "FalconConfig",
         dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
              new_decoder_architecture=False, bias=True, use_cache=False), "ids",
         {PRENORM: _ln(3, 3, note="FalconLinear `x @ W.T + b` read as linear; parallel attention + MLP")}),
    Arch("falcon-new", "decoder LM", "FalconForCausalLM", "FalconConfig",
         dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_kv_heads=2, num_hidden_layers=2,
              new_decoder_architecture=True, use_cache=False), "ids",
         {PRENORM: _ln(5, 5, note="new_decoder_architecture: ln_attn and ln_mlp")}, fast=PRENORM),
    Arch("gpt-bigcode", "decoder LM", "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
         dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, use_cache=False), "ids",
         {PRENORM: _ln(5, 4)}),
    Arch("xglm", "decoder LM", "XGLMForCausalLM", "XGLMConfig",
         dict(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=32,
              use_cache=False), "ids",
         {PRENORM: _ln(5, 5, note="sinusoidal positions looked up with index_select: an embedding")}),
    Arch("biogpt", "decoder LM", "BioGptForCausalLM", "BioGptConfig", dict(LM, max_position_embeddings=32), "ids",
         {PRENORM: _ln(5, 5)}),
    Arch("stablelm", "decoder LM", "StableLmForCausalLM", "StableLmConfig", dict(LM, num_key_value_heads=4), "ids",
         {PRENORM: _ln(5, 5)}),
    Arch("mpt", "decoder LM", "MptForCausalLM", "MptConfig",
         dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32,
              use_cache=False), "ids", {PRENORM: _ln(5, 5)}),
    Arch("llama", "decoder LM", "LlamaForCausalLM", "LlamaConfig", dict(LM), "ids", {PRENORM: _rms(5, 5)}),
    Arch("mistral", "decoder LM", "MistralForCausalLM", "MistralConfig", dict(LM, num_key_value_heads=2), "ids",
         {PRENORM: _rms(5, 5)}),
    Arch("qwen2", "decoder LM", "Qwen2ForCausalLM", "Qwen2Config", dict(LM, num_key_value_heads=2), "ids",
         {PRENORM: _rms(5, 5)}),
    Arch("phi3", "decoder LM", "Phi3ForCausalLM", "Phi3Config", dict(LM, pad_token_id=0), "ids", {PRENORM: _rms(5, 5)}),
    Arch("gemma", "decoder LM", "GemmaForCausalLM", "GemmaConfig", dict(LM, num_key_value_heads=2, head_dim=8), "ids",
         {PRENORM: _rms(5, 5, note="the gain is 1 + w")}),
    Arch("olmo", "decoder LM", "OlmoForCausalLM", "OlmoConfig", dict(LM, pad_token_id=0, eos_token_id=1), "ids",
         {PRENORM: Outcome("converted", {"layer_norm": (5, 0), "rms_norm": (0, 5)},
                           {"std.fold_layer_norm_affine": 0, "std.prenorm_to_rmsnorm": 1}, "has no affine to fold",
                           "weightless LayerNorms computed in float32: nothing to fold, all become RMSNorm")}),
    Arch("olmo2", "decoder LM", "Olmo2ForCausalLM", "Olmo2Config", dict(LM, pad_token_id=0, eos_token_id=1), "ids",
         {PRENORM: Outcome("gains folded", {"rms_norm": (9, 9)}, {"std.fold_rms_norm_affine": 1}, "is add, not linear",
                           "norms after each sublayer (read by the residual add) and q/k norms keep their gains; "
                           "the final norm's folds into the LM head")}),
    # ------------------------------------------------------------------ encoders
    Arch("bert", "encoder", "BertModel", "BertConfig", dict(LM), "ids", {PRENORM: _post_ln()}),
    Arch("roberta", "encoder", "RobertaModel", "RobertaConfig", dict(LM, pad_token_id=1, max_position_embeddings=40),
         "ids", {PRENORM: _post_ln()}),
    Arch("distilbert", "encoder", "DistilBertModel", "DistilBertConfig",
         dict(vocab_size=VOCAB, dim=32, n_heads=4, n_layers=2, hidden_dim=64), "ids", {PRENORM: _post_ln()}),
    Arch("electra", "encoder", "ElectraModel", "ElectraConfig", dict(LM, embedding_size=32), "ids",
         {PRENORM: _post_ln()}),
    Arch("clip-text", "encoder", "CLIPTextModel", "CLIPTextConfig", dict(LM, max_position_embeddings=32), "ids",
         {PRENORM: _ln(5, 4)}),
    Arch("t5-encoder", "encoder-decoder's encoder", "T5EncoderModel", "T5Config",
         dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False), "ids",
         {PRENORM: _rms(5, 4, note="the final norm is the output: its gain stays")}),
    Arch("mt5-encoder", "encoder-decoder's encoder", "MT5EncoderModel", "MT5Config",
         dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False), "ids",
         {PRENORM: _rms(5, 4)}),
    # ------------------------------------------------------------------ vision transformers
    Arch("vit", "vision transformer", "ViTModel", "ViTConfig", dict(VIT), PIX, {PRENORM: _ln(5, 4)}),
    Arch("deit", "vision transformer", "DeiTModel", "DeiTConfig", dict(VIT), PIX, {PRENORM: _ln(5, 4)}),
    Arch("dinov2", "vision transformer", "Dinov2Model", "Dinov2Config", dict(VIT), PIX,
         {PRENORM: _ln(5, 4, note="LayerScale folded into the projections it scales")}),
    Arch("beit", "vision transformer", "BeitModel", "BeitConfig", dict(VIT), PIX,
         {PRENORM: Outcome("refused", {"layer_norm": (5, 5)}, {"std.prenorm_to_rmsnorm": 0}, RAW_OUTPUT,
                           "mean pooling: last_hidden_state is the raw residual stream")}),
    Arch("beit-cls", "vision transformer", "BeitModel", "BeitConfig",
         dict(VIT, use_mean_pooling=False, layer_scale_init_value=0.1), PIX,
         {PRENORM: _ln(5, 4, note="use_mean_pooling=False: a final LayerNorm; LayerScale folded")}),
    Arch("data2vec-vision", "vision transformer", "Data2VecVisionModel", "Data2VecVisionConfig", dict(VIT), PIX,
         {PRENORM: Outcome("refused", {"layer_norm": (4, 4)}, {"std.prenorm_to_rmsnorm": 0}, RAW_OUTPUT,
                           "last_hidden_state is the raw residual stream")}),
    Arch("clip-vision", "vision transformer", "CLIPVisionModel", "CLIPVisionConfig", dict(VIT), PIX,
         {PRENORM: Outcome("refused", {"layer_norm": (6, 6)}, {"std.prenorm_to_rmsnorm": 0}, RAW_OUTPUT,
                           "last_hidden_state is the raw residual stream (pre_layrnorm alone is not converted)")}),
    Arch("siglip-vision", "vision transformer", "SiglipVisionModel", "SiglipVisionConfig", dict(VIT), PIX,
         {PRENORM: Outcome("partly converted", {"layer_norm": (6, 1), "rms_norm": (0, 5)},
                           {"std.prenorm_to_rmsnorm": 1}, "model output `pooler_output` is the residual stream",
                           "the encoder converts; the attention-pooling head returns its raw residual")}),
    Arch("swin", "vision transformer", "SwinModel", "SwinConfig",
         dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4), PIX,
         {PRENORM: Outcome("partly converted", {"layer_norm": (7, 4), "rms_norm": (0, 3)},
                           {"std.prenorm_to_rmsnorm": 1}, "concatenates along the hidden dim",
                           "patch merging concatenates 4 tokens' channels before its LayerNorm: the last stage "
                           "converts")}),
    # ------------------------------------------------------------------ CNNs
    Arch("resnet", "CNN", "ResNetModel", "ResNetConfig",
         dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), PIX,
         {"bn_fold": Outcome("folded", {"batch_norm": (6, 0), "conv": (6, 6)}, {"std.fold_bn_conv": 6}),
          "fuse_norm_act": Outcome("fused", {"batch_norm": (6, 3), "norm_act": (0, 3)},
                                   {"std.fuse_batch_norm_relu": 3})}),
    Arch("mobilenet-v2", "CNN", "MobileNetV2Model", "MobileNetV2Config", dict(depth_multiplier=0.25, image_size=32),
         PIX, {"bn_fold": Outcome("folded", {"batch_norm": (52, 0), "conv": (52, 52)}, {"std.fold_bn_conv": 52})}),
    Arch("efficientnet", "CNN", "EfficientNetModel", "EfficientNetConfig",
         dict(width_coefficient=0.1, depth_coefficient=0.1, image_size=32, hidden_dim=128), PIX,
         {"bn_fold": Outcome("folded", {"batch_norm": (22, 0), "conv": (36, 36)}, {"std.fold_bn_conv": 22}),
          "fuse_norm_act": Outcome("unchanged", {"batch_norm": (22, 22), "norm_act": (0, 0)},
                                   {"std.fuse_batch_norm_relu": 0},
                                   note="BN + SiLU is not a fused pair (fold the BNs into the convs instead)")}),
    Arch("regnet", "CNN", "RegNetModel", "RegNetConfig",
         dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4), PIX,
         {"bn_fold": Outcome("folded", {"batch_norm": (9, 0), "conv": (13, 13)}, {"std.fold_bn_conv": 9}),
          "fuse_norm_act": Outcome("fused", {"batch_norm": (9, 4), "norm_act": (0, 5)},
                                   {"std.fuse_batch_norm_relu": 5})}),
    Arch("convnext", "CNN", "ConvNextModel", "ConvNextConfig",
         dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32), PIX,
         {PRENORM: Outcome("refused", {"layer_norm": (5, 5)}, {"std.prenorm_to_rmsnorm": 0},
                           "also read by conv `encoder.stages.0.layers.0.dwconv",
                           "the blocks read the stream with a depthwise conv, not a LayerNorm")}),
    Arch("bit", "CNN", "BitModel", "BitConfig",
         dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2, layer_type="bottleneck"), PIX,
         {"fold_constants": Outcome("folded", {"batch_norm": (9, 0), "group_norm": (9, 4), "norm_act": (0, 5),
                                               "conv": (9, 9)},
                                    {"std.fold_constants": 9, "std.fuse_group_norm_relu": 5},
                                    note="weight standardization computed once: plain convs; GroupNorm + ReLU fused"),
          "fuse_norm_act": Outcome("fused", {"batch_norm": (9, 9), "norm_act": (0, 5)},
                                   {"std.fuse_group_norm_relu": 5},
                                   note="without std.fold_constants the 9 weight standardizations stay")},
         fast="fold_constants"),
]

BY_NAME = {a.name: a for a in ARCHS}
