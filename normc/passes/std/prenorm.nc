# Pre-LN -> Pre-RMSNorm and Pre-CRMSNorm (Jiang et al. 2023, "Pre-RMSNorm and Pre-CRMSNorm
# Transformers: Equivalent and Efficient Pre-LN Transformers").
# Global passes: they need the whole residual stream, which a local pattern cannot see,
# so they are implemented in Python (normc/passes/prenorm.py) and declared here.

pass prenorm_to_rmsnorm(untie: bool = true) {
  doc "Pre-LN -> Pre-RMSNorm: recentre every residual-stream writer; every LayerNorm reader becomes RMSNorm (same eps). Exact."
  exact
  impl "normc.passes.prenorm:to_rmsnorm"
}

pass prenorm_to_crmsnorm(untie: bool = true) {
  doc "Pre-LN -> Pre-CRMSNorm: the zero-mean stream stored in d-1 dims. Exact, saves 1/d; odd inner dims rarely pay on tensor cores."
  exact
  impl "normc.passes.prenorm:to_crmsnorm"
}
