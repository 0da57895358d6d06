# Mutant: BatchNorm BEFORE a conv folded into the conv, without the padding guard.
#   conv(x * s + t, W, b) = conv(x, W * s[None, :], b + sum(W * t[None, :]))  only when the
#   conv pads nothing: zero padding pads bn(x) with zeros, the folded conv pads x with zeros.
# The sound rule adds `and all_zero(p)` (groups == 1 keeps s aligned with the weight's dim 1).
rule bn_before_conv_padded {
  exact
  match   n = batch_norm(x, mean?, var?, gamma?, beta?, eps = eps)
          y = conv2d(n, w, b?, padding = p, groups = g)
  where   frozen_stats(n) and single_use(n) and not shared(w) and g == 1
  let     s = (gamma ?? 1) / sqrt(var + eps)
          t = (beta ?? 0) - mean * s
  rewrite y = conv2d(x, w * bcast(s, w, 1), (b ?? 0) + sum(w * bcast(t, w, 1), dim = [1, 2, 3]))
}

# control: the same fold with the padding guard (sound)
rule bn_before_conv_padded_control {
  exact
  match   n = batch_norm(x, mean?, var?, gamma?, beta?, eps = eps)
          y = conv2d(n, w, b?, padding = p, groups = g)
  where   frozen_stats(n) and single_use(n) and not shared(w) and g == 1 and all_zero(p)
  let     s = (gamma ?? 1) / sqrt(var + eps)
          t = (beta ?? 0) - mean * s
  rewrite y = conv2d(x, w * bcast(s, w, 1), (b ?? 0) + sum(w * bcast(t, w, 1), dim = [1, 2, 3]))
}
