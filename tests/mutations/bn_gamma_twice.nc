# Mutant of std.fold_bn_conv: gamma applied twice to the folded weight.
#   wrong: W' = W * s * gamma           right: W' = W * s
rule bn_gamma_twice {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s * (gamma ?? 1), w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
