# Outlier Suppression+ on all-MiniLM-L6-v2 (real weights): shift each channel by the middle of
# its calibrated range into the biases, then scale. Post-LN, so the compensated variant.
#   normc apply examples/minilm_osplus.nc zoo:minilm -o minilm_osplus.onnx
pipeline {
  calibrate from "builtin:sentences" samples 64
  apply std.shift_scale_compensated(alpha = 0.8)
  verify rel 1e-4
}
