# Mutant of std.fold_layer_norm_affine: beta is removed from the norm but never reaches the linears.
#   wrong: b' = b                        right: b' = b + W beta
rule norm_affine_beta_dropped {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and (present(g) or present(beta))
  rewrite h = layer_norm(x)
          each u: y = linear(h, w * (g ?? 1), b)
}

# control: std.fold_layer_norm_affine with the last-dim guard on normalized_shape (sound)
rule norm_affine_beta_dropped_control {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and (present(g) or present(beta))
  rewrite h = layer_norm(x)
          each u: y = linear(h, w * (g ?? 1), (b ?? 0) + sum(w * (beta ?? 0), dim = 1))
}
