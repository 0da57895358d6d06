# Work on weights alone, done once. A value computed only from parameters and constants is the
# same at every inference: weight standardization (BiT, NF-Nets), `w * scale` reparametrizations,
# Gemma's `1 + w`, casts of weights. Each such subgraph is evaluated once, with the model's own ops
# on its own tensors, and becomes a parameter; the convs and linears reading it become plain ones.

pass fold_constants {
  doc "every subgraph computed from parameters and constants alone folded into a new parameter (weight standardization, w * scale). Exact."
  exact
  impl "normc.passes.constants:fold_constants"
}
