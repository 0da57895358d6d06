# Recognizers: decomposed norms written as chains of small ops become one canonical node.
# normc runs these during canonicalization, so every rule sees `rms_norm` / `layer_norm`
# however a model spelled them. (The 1:1 forms — nn.LayerNorm, F.layer_norm,
# aten.layer_norm, nn.RMSNorm, aten.rms_norm — are translated before these run.)

rule layer_norm_chain {
  doc "(x - mean(x)) * rsqrt(var(x) + eps), a hand-written LayerNorm"
  exact
  match   mu = reduce_mean(x, dim = d, keepdim = true)
          c = sub(x, mu)
          v = reduce_mean(power(c, exponent = 2), dim = d2, keepdim = true)
          y = mul(c, inv_sqrt(add(v, eps)))
  where   d == [-1] and d2 == [-1] and is_number(eps)
  rewrite y = layer_norm(x, normalized_shape = [size(x, -1)], eps = eps)
}

rule rms_norm_chain {
  doc "x * rsqrt(mean(x^2, -1) + eps), the RMSNorm torch.export leaves for LLaMA, Qwen2, Mistral"
  exact
  match   v = reduce_mean(power(x, exponent = 2), dim = d, keepdim = true)
          y = mul(x, inv_sqrt(add(v, eps)))
  where   d == [-1] and is_number(eps)
  rewrite y = rms_norm(x, normalized_shape = [size(x, -1)], eps = eps)
}

rule rms_norm_weight {
  doc "weight * rms_norm(x): the per-channel gain becomes the norm's weight"
  exact
  match   n = rms_norm(x, g?, normalized_shape = ns)
          y = mul(n, w)
  where   not present(g) and single_use(n) and is_param(w) and rank(w) == 1 and len(ns) == 1 and size(w, 0) == size(x, -1)
  rewrite y = rms_norm(x, w)
}

rule layer_norm_weight {
  doc "weight * layer_norm(x): the gain becomes the norm's weight"
  exact
  match   n = layer_norm(x, g?, b?, normalized_shape = ns)
          y = mul(n, w)
  where   not present(g) and not present(b) and single_use(n) and is_param(w) and rank(w) == 1
          and len(ns) == 1 and size(w, 0) == size(x, -1)
  rewrite y = layer_norm(x, w)
}

rule layer_norm_bias {
  doc "layer_norm(x) + bias: the shift becomes the norm's bias"
  exact
  match   n = layer_norm(x, g?, b?, normalized_shape = ns)
          y = add(n, beta)
  where   not present(b) and single_use(n) and is_param(beta) and rank(beta) == 1
          and len(ns) == 1 and size(beta, 0) == size(x, -1)
  rewrite y = layer_norm(x, g, beta)
}
