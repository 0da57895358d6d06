"""INT8 quantization as a pipeline step: settings (the `quantize int8 { ... }` block), which linears
they select, one plan lowered both to the torch simulation and to onnxruntime's QDQ export, the
per-linear error report, and the quality gate."""
