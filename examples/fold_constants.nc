# Work on weights alone done once, then the usual folds. BiT standardizes every conv weight at each
# call (`batch_norm(w.reshape(1, out, -1), training=True)`): folded once, the convs become plain convs,
# and the GroupNorm + ReLU pairs fuse.
#   normc apply examples/fold_constants.nc model.py:build -o out.onnx --report r.json
pipeline {
  apply std.fold_constants       # subgraphs of parameters and constants -> parameters
  apply std.bn                   # BatchNorms after the (now plain) convs
  apply std.fuse_norm_act        # GroupNorm + ReLU, BatchNorm + ReLU, LayerNorm + GELU, ... as one op
  verify rel 1e-5
}
