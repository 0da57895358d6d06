# Unified Normalization (and other fixed-statistics norms) folded into the linears:
# at inference UN is y = gamma * x / sqrt(running_var + eps) + beta, a per-channel affine,
# so it disappears from the graph. Exact.
#   normc apply examples/un_fold.nc zoo:un-vit -o un_vit.onnx --report r.json
pipeline {
  apply std.fixed_norm
  verify rel 1e-5
}
