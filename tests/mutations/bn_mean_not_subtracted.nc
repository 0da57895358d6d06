# Mutant of std.fold_bn_conv: the running mean is not subtracted in the folded bias.
#   wrong: b' = b * s + beta            right: b' = (b - mean) * s + beta
rule bn_mean_not_subtracted {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), (b ?? 0) * s + (beta ?? 0))
}
