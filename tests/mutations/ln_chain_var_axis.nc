# Mutant of std.layer_norm_chain: the reduction axis of the variance is not checked, so
# (x - mean(x, -1)) * rsqrt(mean((x - mu)^2, dim = d2) + eps) with d2 != -1 is taken for a LayerNorm.
rule ln_chain_var_axis {
  exact
  match   mu = reduce_mean(x, dim = d, keepdim = true)
          c = sub(x, mu)
          v = reduce_mean(power(c, exponent = 2), dim = d2, keepdim = true)
          y = mul(c, inv_sqrt(add(v, eps)))
  where   d == [-1] and not is_param(eps) and rank(eps) == 0
  rewrite y = layer_norm(x, normalized_shape = [size(x, -1)], eps = eps)
}

# control: std.layer_norm_chain, with eps restricted to a number (rank(eps) == 0; see the report)
rule ln_chain_var_axis_control {
  exact
  match   mu = reduce_mean(x, dim = d, keepdim = true)
          c = sub(x, mu)
          v = reduce_mean(power(c, exponent = 2), dim = d2, keepdim = true)
          y = mul(c, inv_sqrt(add(v, eps)))
  where   d == [-1] and d2 == [-1] and not is_param(eps) and rank(eps) == 0
  rewrite y = layer_norm(x, normalized_shape = [size(x, -1)], eps = eps)
}
