# Mutant of std.rms_norm_chain: the recognised RMSNorm forgets the chain's eps
# (rms_norm with eps = none uses the dtype's machine epsilon instead).
rule rms_chain_eps_dropped {
  exact
  match   v = reduce_mean(power(x, exponent = 2), dim = d, keepdim = true)
          y = mul(x, inv_sqrt(add(v, eps)))
  where   d == [-1] and not is_param(eps) and rank(eps) == 0
  rewrite y = rms_norm(x, normalized_shape = [size(x, -1)])
}

# control: std.rms_norm_chain, with eps restricted to a number (rank(eps) == 0; see the report)
rule rms_chain_eps_dropped_control {
  exact
  match   v = reduce_mean(power(x, exponent = 2), dim = d, keepdim = true)
          y = mul(x, inv_sqrt(add(v, eps)))
  where   d == [-1] and not is_param(eps) and rank(eps) == 0
  rewrite y = rms_norm(x, normalized_shape = [size(x, -1)], eps = eps)
}
