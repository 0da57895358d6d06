# Mutant of the OS+ channel shift: the norm's output is shifted by z (beta' = beta - z) but
# the linears reading it do not compensate (right: b' = b + W z).
rule shift_no_bias_comp {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)]
  let     z = (max(h) + min(h)) / 2
  rewrite h = layer_norm(x, g, (beta ?? 0) - z)
          each u: y = linear(h, w, b)
}

# control: the shift with its bias compensation b' = b + W z (sound)
rule shift_no_bias_comp_control {
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   (ns ?? [size(x, -1)]) == [size(x, -1)]
  let     z = (max(h) + min(h)) / 2
  rewrite h = layer_norm(x, g, (beta ?? 0) - z)
          each u: y = linear(h, w, (b ?? 0) + sum(w * z, dim = 1))
}
