# A norm's gain and shift folded into every linear that reads it:
#   linear(gamma * n + beta, W, b) = linear(n, W * gamma, b + W beta)
# leaving an affine-free norm. Refused when any reader of the norm is not a linear.

rule fold_layer_norm_affine {
  doc "LayerNorm gamma/beta folded into every linear reading it (W' = W diag(gamma), b' = b + W beta)"
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   has_affine(h) and len(ns) == 1          # over the last dim: the linears' input
  rewrite h = layer_norm(x)
          each u: y = linear(h, w * (g ?? 1), (b ?? 0) + sum(w * (beta ?? 0), dim = 1))
}

rule fold_rms_norm_affine {
  doc "RMSNorm gain folded into every linear reading it (W' = W diag(gamma))"
  exact
  match   h = rms_norm(x, g?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   has_affine(h) and len(ns) == 1
  rewrite h = rms_norm(x)
          each u: y = linear(h, w * g, b)
}
