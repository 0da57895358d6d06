# Norm + activation as one op (LN+GELU, RMSNorm+SiLU, GroupNorm+SiLU, BN+ReLU). Exact.
#   normc apply examples/fuse_norm_act.nc zoo:cnn -o fused.onnx
pipeline {
  apply std.fuse_norm_act
  verify rel 1e-6
}
