# Mutant of std.fold_layer_norm_affine: gamma applied twice to every reading linear.
#   wrong: W' = W diag(gamma)^2          right: W' = W diag(gamma), b' = b + W beta
rule norm_affine_gamma_twice {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and (present(g) or present(beta))
  rewrite h = layer_norm(x)
          each u: y = linear(h, w * (g ?? 1) * (g ?? 1), (b ?? 0) + sum(w * (beta ?? 0), dim = 1))
}

# control: std.fold_layer_norm_affine with the last-dim guard on normalized_shape (sound)
rule norm_affine_gamma_twice_control {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and (present(g) or present(beta))
  rewrite h = layer_norm(x)
          each u: y = linear(h, w * (g ?? 1), (b ?? 0) + sum(w * (beta ?? 0), dim = 1))
}
