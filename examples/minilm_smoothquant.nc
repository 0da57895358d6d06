# SmoothQuant on all-MiniLM-L6-v2 (real weights) before INT8.
#   normc apply examples/minilm_smoothquant.nc zoo:minilm -o minilm_smooth.onnx --report r.json
# MiniLM is post-LN: each LayerNorm output also feeds the next residual add, so the plain
# std.smooth refuses it; std.smooth_compensated scales the linears and gives the skip
# path the original activation back with one multiply (reported as such).
pipeline {
  calibrate from "builtin:sentences" samples 64    # normc's own sentence set, tokenized by MiniLM's tokenizer
  apply std.smooth_compensated(alpha = 0.8)
  verify rel 1e-4                                  # fp32: the model is unchanged
}
