# Norms with frozen statistics are a per-channel affine at inference, y = a * x + c
# (Unified Normalization, PowerNorm, BatchNorm over a transformer's features). They fold
# into the linear next to them and disappear from the graph.

rule sink_fixed_norm {
  doc "a per-channel fixed norm moved below token indexing (x[:, 0]) so it can reach the linear after it"
  exact
  match   n = fixed_norm(x, a, c?, dim = d)
          y = getitem(n, index = i)
  where   d == -1 and single_use(n) and keeps_last_dim(i, n) and rank(a) == 1 and size(a, 0) == size(x, -1)
  rewrite y = fixed_norm(getitem(x, index = i), a, c, dim = -1)
}

rule fold_fixed_norm_next {
  doc "a fixed-statistics norm folded into every linear reading it (W' = W diag(a), b' = b + W c)"
  exact
  match   h = fixed_norm(x, a, c?, dim = d)
          each u in users(h): y = linear(h, w, b?)
  where   (d == -1 or d == rank(x) - 1) and rank(a) == 1 and size(a, 0) == size(x, -1)
  rewrite each u: y = linear(x, w * a, (b ?? 0) + sum(w * (c ?? 0), dim = 1))
}

rule fold_fixed_norm_prev {
  doc "a fixed-statistics norm after a linear (post-norm) folded into it (W' = diag(a) W, b' = a b + c)"
  exact
  match   l = linear(x, w, b?)
          y = fixed_norm(l, a, c?, dim = d)
  where   (d == -1 or d == rank(l) - 1) and rank(a) == 1 and size(a, 0) == size(l, -1) and single_use(l) and not shared(w)
  rewrite y = linear(x, w * bcast(a, w, 0), (b ?? 0) * a + (c ?? 0))
}
