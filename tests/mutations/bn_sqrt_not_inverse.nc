# Mutant of std.fold_bn_conv: multiplies by the standard deviation instead of dividing.
#   wrong: s = gamma * sqrt(var + eps)  right: s = gamma / sqrt(var + eps)
rule bn_sqrt_not_inverse {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) * sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
