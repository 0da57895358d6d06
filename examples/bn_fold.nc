# Fold every BatchNorm into the conv or linear before it, then verify.
#   normc apply examples/bn_fold.nc zoo:resnet18 -o out.pt2 --report r.json
use std.bn

pipeline {
  apply std.bn                 # std.fold_bn_conv, then std.fold_bn_linear
  verify rel 1e-5              # max |a-b| / max |a| over every output, fp32
}
