# Outlier migration before INT8: move the per-channel range of a norm's output into the
# weights of every linear that reads it. Exact in real arithmetic (verified in fp32).
# Needs `calibrate` before it: absmax/min/max of an activation are calibration statistics.
#
#   SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^a / max_k |W_kj|^(1-a)
#   Outlier Suppression+ (Wei et al. 2023): shift z_j = (max_j + min_j)/2 into the biases, then scale.
# Post-LN models (BERT) also feed the norm output into the residual add: the *_compensated
# rules keep the residual exact with a multiply (and add) on the skip path; the plain rules refuse.

rule smooth(alpha: float = 0.5) {
  doc "SmoothQuant: LayerNorm -> {linears} outliers migrated into the weights (gamma/s, beta/s, W*s)"
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   len(ns) == 1                        # scales are per channel of the last dim
  let     wmax = clamp(max_u(absmax(w, dim = 0)), min = 1e-5)          # all-zero weight columns: no infinite scale
          s = clamp(clamp(absmax(h), min = 1e-5) ** alpha / wmax ** (1 - alpha), min = 1e-5)
  rewrite h = layer_norm(x, (g ?? 1) / s, (beta ?? 0) / s)
          each u: y = linear(h, w * s, b)
}

rule smooth_rms(alpha: float = 0.5) {
  doc "SmoothQuant for RMSNorm -> {linears} (LLaMA-style): gamma/s, W*s"
  exact
  match   h = rms_norm(x, g?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   len(ns) == 1
  let     wmax = clamp(max_u(absmax(w, dim = 0)), min = 1e-5)
          s = clamp(clamp(absmax(h), min = 1e-5) ** alpha / wmax ** (1 - alpha), min = 1e-5)
  rewrite h = rms_norm(x, (g ?? 1) / s)
          each u: y = linear(h, w * s, b)
}

rule smooth_compensated(alpha: float = 0.5) {
  doc "SmoothQuant for post-LN norms: the linears get W*s, the other readers (the residual) get the norm output times s back"
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in any users(h): y = linear(h, w, b?)
  where   len(ns) == 1
  let     wmax = clamp(max_u(absmax(w, dim = 0)), min = 1e-5)
          s = clamp(clamp(absmax(h), min = 1e-5) ** alpha / wmax ** (1 - alpha), min = 1e-5)
  rewrite n = layer_norm(x, (g ?? 1) / s, (beta ?? 0) / s)
          h = mul(n, s)                                                  # the skip path sees the original h
          each u: y = linear(n, w * s, b)
}

rule shift_scale(alpha: float = 0.5) {
  doc "Outlier Suppression+: shift z=(max+min)/2 into the norm bias and the linears' biases (b + W z), then scale"
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   len(ns) == 1                        # scales are per channel of the last dim
  let     z = (max(h) + min(h)) / 2
          wmax = clamp(max_u(absmax(w, dim = 0)), min = 1e-5)
          s = clamp(clamp((max(h) - min(h)) / 2, min = 1e-5) ** alpha / wmax ** (1 - alpha), min = 1e-5)
  rewrite h = layer_norm(x, (g ?? 1) / s, ((beta ?? 0) - z) / s)
          each u: y = linear(h, w * s, (b ?? 0) + sum(w * z, dim = 1))
}

rule shift_scale_compensated(alpha: float = 0.5) {
  doc "Outlier Suppression+ for post-LN norms: the skip path gets (n * s + z) back"
  exact
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns)
          each u in any users(h): y = linear(h, w, b?)
  where   len(ns) == 1
  let     z = (max(h) + min(h)) / 2
          wmax = clamp(max_u(absmax(w, dim = 0)), min = 1e-5)
          s = clamp(clamp((max(h) - min(h)) / 2, min = 1e-5) ** alpha / wmax ** (1 - alpha), min = 1e-5)
  rewrite n = layer_norm(x, (g ?? 1) / s, ((beta ?? 0) - z) / s)
          h = add(mul(n, s), z)
          each u: y = linear(n, w * s, (b ?? 0) + sum(w * z, dim = 1))
}
