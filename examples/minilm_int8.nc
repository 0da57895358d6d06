# INT8 all-MiniLM-L6-v2 (real weights) that keeps the model: outlier migration (OS+), then INT8 with
# the FFN output projections -- whose input comes from a GELU, with a range set by the first token --
# quantized per token at run time. Judged on 256 held-out sentences, simulated and in onnxruntime.
#   normc apply examples/minilm_int8.nc zoo:minilm -o minilm_int8.onnx --report r.json
pipeline {
  calibrate from "builtin:sentences" samples 64
  apply std.shift_scale_compensated(alpha = 0.8)
  verify rel 1e-4                                   # migration is exact in fp32
  quantize int8 {
    # unsaid words keep onnxruntime's best for this CPU: per-channel int8 weights (7-bit where
    # U8S8 saturates), static asymmetric uint8 activations
    match linear(gelu(x), w, b?): activations per_token dynamic
  }
  verify approx min_cosine 0.997 approx mean_cosine 0.998 samples 256
}
