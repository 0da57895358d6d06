# Mutant of std.fold_bn_conv: the per-output-channel scale broadcast along the wrong weight dim.
#   wrong: W * bcast(s, w, 1) (scales input channels)   right: W * bcast(s, w, 0)
rule bn_wrong_bcast_dim {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 1), ((b ?? 0) - mean) * s + (beta ?? 0))
}
