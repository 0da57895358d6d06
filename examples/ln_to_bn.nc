# LayerNorm -> BatchNorm-style fixed statistics, calibrated, then folded away. APPROXIMATE:
# the report gives the measured error; the run fails when it exceeds the gate.
#   normc check examples/ln_to_bn.nc zoo:vit --report r.json
pipeline {
  calibrate from "random" samples 32      # or a tensor file / a text file for a language model
  apply std.ln_to_bn
  apply std.fixed_norm                    # the fixed norms fold into the linears that read them
  verify approx max_rel 1.0               # gate on the approximation error (relative to the largest output);
                                          # random-weight zoo models measure ~0.75 here, trained ones far less
}
