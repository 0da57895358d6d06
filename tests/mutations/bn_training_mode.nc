# Mutant of std.fold_bn_conv: the frozen_stats guard is dropped, so a batch_norm that
# normalises by batch statistics (training mode) is folded with its running statistics.
rule bn_training_mode {
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
