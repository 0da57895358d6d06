# Norm followed by its activation becomes one `norm_act` op: one pass over memory instead
# of two (a Triton kernel on CUDA; standard ONNX ops at export). Exact.

rule fuse_layer_norm_gelu {
  doc "LayerNorm + GELU as one norm_act op"
  exact
  match   n = layer_norm(x, g?, b?, normalized_shape = ns, eps = e)
          y = gelu(n, approximate = ap)
  where   single_use(n)
  rewrite y = norm_act(x, g, b, norm = "layer_norm", activation = "gelu", eps = e, normalized_shape = ns, approximate = ap)
}

rule fuse_rms_norm_silu {
  doc "RMSNorm + SiLU as one norm_act op"
  exact
  match   n = rms_norm(x, g?, normalized_shape = ns, eps = e?)       # e is none: the dtype's own eps
          y = silu(n)
  where   single_use(n)
  rewrite y = norm_act(x, g, norm = "rms_norm", activation = "silu", eps = e, normalized_shape = ns)
}

rule fuse_group_norm_silu {
  doc "GroupNorm + SiLU as one norm_act op"
  exact
  match   n = group_norm(x, g?, b?, groups = k, eps = e)
          y = silu(n)
  where   single_use(n)
  rewrite y = norm_act(x, g, b, norm = "group_norm", activation = "silu", groups = k, eps = e)
}

rule fuse_group_norm_relu {
  doc "GroupNorm + ReLU as one norm_act op (BiT, ResNet-GN)"
  exact
  match   n = group_norm(x, g?, b?, groups = k, eps = e)
          y = relu(n)
  where   single_use(n)
  rewrite y = norm_act(x, g, b, norm = "group_norm", activation = "relu", groups = k, eps = e)
}

rule fuse_batch_norm_relu {
  doc "BatchNorm + ReLU as one norm_act op (for BNs that cannot fold into a conv)"
  exact
  match   n = batch_norm(x, m?, v?, g?, b?, eps = e)
          y = relu(n)
  where   single_use(n) and frozen_stats(n)
  rewrite y = norm_act(x, g, b, m, v, norm = "batch_norm", activation = "relu", eps = e)
}
