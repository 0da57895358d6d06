# LayerNorm -> a norm with fixed statistics, calibrated on data (in the spirit of test-time
# BN calibration). NOT an identity: these rules are `approximate`; the pipeline reports the
# error they cause, on the calibration inputs and on held-apart inputs, and fails when it
# exceeds the gate `verify approx max_rel X`. Follow with std.fixed_norm to fold them away.
# (Mixing in per-sample statistics, as alpha-BN does, would keep a data-dependent op that
# cannot fold; these rules use the calibrated statistics only.)

rule ln_to_bn {
  doc "LayerNorm -> BN-style fixed norm: per-channel mean and variance of its input, from calibration"
  approximate
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns, eps = eps)
  where   len(ns) == 1
  let     mu = mean(x)
          var = clamp(rms(x) ** 2 - mu ** 2, min = 0)
          s = (g ?? 1) / sqrt(var + eps)
  rewrite h = fixed_norm(x, s, (beta ?? 0) - mu * s)
}

rule ln_to_un {
  doc "LayerNorm -> UN-style fixed norm: per-channel second moment of its input (no mean), from calibration"
  approximate
  match   h = layer_norm(x, g?, beta?, normalized_shape = ns, eps = eps)
  where   len(ns) == 1
  let     s = (g ?? 1) / sqrt(rms(x) ** 2 + eps)
  rewrite h = fixed_norm(x, s, beta ?? 0 * s)
}
