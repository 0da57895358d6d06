# Mutant of std.layer_norm_bias: the `not present(b)` guard is dropped, so
# layer_norm(x, g, b) + beta becomes layer_norm(x, g, beta) and the norm's own bias b is lost.
rule ln_bias_drops_bias {
  exact
  match   n = layer_norm(x, g?, b?, normalized_shape = ns)
          y = add(n, beta)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and single_use(n) and is_param(beta) and rank(beta) == 1
  rewrite y = layer_norm(x, g, beta)
}

# control: std.layer_norm_bias with the last-dim guard on normalized_shape (sound)
rule ln_bias_drops_bias_control {
  exact
  match   n = layer_norm(x, g?, b?, normalized_shape = ns)
          y = add(n, beta)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and not present(b) and single_use(n) and is_param(beta) and rank(beta) == 1
  rewrite y = layer_norm(x, g, beta)
}
