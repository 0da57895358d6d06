# Mutant of std.rms_norm_weight: the `not present(g)` guard is dropped, so
# rms_norm(x, g) * w becomes rms_norm(x, w) and the norm's own gain g is lost.
rule rms_weight_drops_gain {
  exact
  match   n = rms_norm(x, g?, normalized_shape = ns)
          y = mul(n, w)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and single_use(n) and is_param(w) and rank(w) == 1
  rewrite y = rms_norm(x, w)
}

# control: std.rms_norm_weight with the last-dim guard on normalized_shape (sound)
rule rms_weight_drops_gain_control {
  exact
  match   n = rms_norm(x, g?, normalized_shape = ns)
          y = mul(n, w)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)] and not present(g) and single_use(n) and is_param(w) and rank(w) == 1
  rewrite y = rms_norm(x, w)
}
