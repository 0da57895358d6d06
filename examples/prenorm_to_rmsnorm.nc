# Pre-LN -> Pre-RMSNorm, for any architecture (no module paths in here).
#   normc apply examples/prenorm_to_rmsnorm.nc zoo:gpt2 -o out.pt2 --report r.json
# - Pre-LN models (GPT-2, OPT, ViT, ...): every LayerNorm becomes an RMSNorm, exactly.
# - RMSNorm models (LLaMA, Qwen2, Mistral): reported "already RMSNorm"; their norm gains
#   are still folded into the linears that read them.
# - Post-LN models (BERT): refused, with the residual add that makes them post-LN.

pipeline {
  apply std.fold_norm_affine       # gamma/beta into the linears reading each norm (where all readers are linear)
  apply std.prenorm_to_rmsnorm     # recentre the residual writers; LayerNorm readers -> RMSNorm
  verify rel 1e-4                  # fp32: error relative to the largest output (logit)
  verify dtype f64 rel 1e-10       # the same conversion in float64: exact up to rounding
}
