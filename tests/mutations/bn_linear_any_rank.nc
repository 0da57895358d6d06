# Mutant of std.fold_bn_linear: the rank(c) == 2 guard is dropped. On a [N, T, F] linear
# output, BatchNorm1d normalises dim 1 (T), not the linear's output features.
rule bn_linear_any_rank {
  exact
  match   c = linear(x, w, b?)
          y = batch_norm(c, mean?, var?, gamma?, beta?, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = (gamma ?? 1) / sqrt(var + eps)
  rewrite y = linear(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + (beta ?? 0))
}
