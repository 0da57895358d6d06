# BatchNorm folding, written in normc itself.
#   W' = W * gamma / sqrt(var + eps)   (per output channel)
#   b' = (b - mean) * gamma / sqrt(var + eps) + beta
# A transposed conv keeps its output channels on dim 1 of its weight, group by group
# ([in, out/groups, k...]); torch's fuse_conv_bn_eval(transpose=True) gets grouped ones wrong.

rule fold_bn_conv {
  doc "BatchNorm after a conv (1d/2d/3d, grouped, depthwise) folded into the conv's weight and bias"
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}

rule fold_bn_conv_transpose {
  doc "BatchNorm after a transposed conv (1d/2d/3d, grouped) folded into it: weight [in, out/groups, k...] scaled per output channel (dim 1, per group)"
  exact
  match   c = conv_transpose(x, w, b?, groups = g)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv_transpose(x, w * bcast(s, w, 1, groups = g), ((b ?? 0) - mean) * s + (beta ?? 0))
}

rule fold_bn_linear {
  doc "BatchNorm1d over a linear's output features ([N, C]) folded into the linear"
  exact
  match   c = linear(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   rank(c) == 2 and frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = linear(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
