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

rule rms_norm_chain_upcast {
  doc "x * rsqrt(mean(float(x)^2, -1) + eps) cast back (T5's LayerNorm in f16/bf16): an RMSNorm computed in float32, as torch computes it"
  exact
  match   up = cast(x)
          v = reduce_mean(power(up, exponent = 2), dim = d, keepdim = true)
          y = cast(mul(x, inv_sqrt(add(v, eps))))
  where   d == [-1] and is_number(eps) and precision(up) >= precision(x) and dtype(mul) == dtype(up)
          and dtype(y) == dtype(x)
  rewrite y = rms_norm(x, normalized_shape = [size(x, -1)], eps = eps)
}

# A norm that upcasts (`x.to(float32)` inside: LLaMA, OLMo, Phi-3, Mistral in f16/bf16) computes in float32
# and casts back: exactly what torch's own norm kernels do for f16/bf16 inputs, so the widening casts go
# (`precision(up) >= precision(x)`). In a float64 model the cast to float32 narrows: it changes the numbers,
# so it stays (and the norm stays a norm over a float32 value).
rule rms_norm_upcast {
  doc "cast(rms_norm(cast(x, f32)), dtype(x)) for an f16/bf16 x is rms_norm(x) (torch computes it in float32); never a narrowing cast"
  exact
  match   up = cast(x)
          n = rms_norm(up, g?, normalized_shape = ns)
          y = cast(n)
  where   not present(g) and single_use(up) and single_use(n) and precision(up) >= precision(x)
          and dtype(y) == dtype(x)
  rewrite y = rms_norm(x)
}

rule rms_norm_upcast_weight {
  doc "cast(w * rms_norm(cast(x, f32)), dtype(x)) (OLMo-2: the gain applied in float32) is rms_norm(x, w) for an f16/bf16 x"
  exact
  match   up = cast(x)
          n = rms_norm(up, g?, normalized_shape = ns)
          y = cast(mul(n, w))
  where   not present(g) and single_use(up) and single_use(n) and precision(up) >= precision(x) and is_param(w)
          and rank(w) == 1 and len(ns) == 1 and size(w, 0) == size(x, -1) and dtype(w) == dtype(x)
          and dtype(y) == dtype(x)
  rewrite y = rms_norm(x, w)
}

rule layer_norm_upcast {
  doc "cast(layer_norm(cast(x, f32)), dtype(x)) for an f16/bf16 x is layer_norm(x) (OLMo's weightless LayerNorm)"
  exact
  match   up = cast(x)
          n = layer_norm(up, g?, b?, normalized_shape = ns)
          y = cast(n)
  where   not present(g) and not present(b) and single_use(up) and single_use(n)
          and precision(up) >= precision(x) and dtype(y) == dtype(x)
  rewrite y = layer_norm(x)
}

rule rms_norm_offset_weight {
  doc "rms_norm(x) * (w + c) (Gemma's `1 + w`): the gain w + c becomes the norm's weight"
  exact
  match   n = rms_norm(x, g?, normalized_shape = ns)
          y = mul(n, add(w, c))
  where   not present(g) and single_use(n) and is_param(w) and is_number(c) and rank(w) == 1 and len(ns) == 1
          and size(w, 0) == size(x, -1) and dtype(w) == dtype(x)
  rewrite y = rms_norm(x, w + c)
}

rule rms_norm_weight {
  doc "weight * rms_norm(x): the per-channel gain becomes the norm's weight"
  exact
  match   n = rms_norm(x, g?, normalized_shape = ns)
          y = mul(n, w)
  where   not present(g) and single_use(n) and is_param(w) and rank(w) == 1 and len(ns) == 1 and size(w, 0) == size(x, -1)
          and dtype(w) == dtype(x)
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

rule linear_bias {
  doc "linear(x, W) + b, b a parameter over the output features (Falcon's `x @ W.T + b`): the bias joins the linear"
  exact
  match   l = linear(x, w, b?)
          y = add(l, c)
  where   not present(b) and single_use(l) and is_param(c) and rank(c) == 1 and size(c, 0) == size(w, 0)
          and dtype(c) == dtype(w)
  rewrite y = linear(x, w, c)
}
