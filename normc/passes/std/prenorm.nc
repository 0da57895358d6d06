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

rule compress_crms_readers {
  doc "linears reading an expanded CRMSNorm read its d-1 compressed output: W' = (W diag(g))[:, :-1] - (W diag(g))[:, -1:], b' = b + W beta"
  exact
  match   h = crms_norm(x, g?, beta?, eps = e, expand = true)
          each u in users(h): y = linear(h, w, b?)
  rewrite n = crms_norm(x, eps = e, expand = false)
          each u: y = linear(n, (w * (g ?? 1))[:, :-1] - (w * (g ?? 1))[:, -1:], (b ?? 0) + sum(w * (beta ?? 0), dim = 1))
}
