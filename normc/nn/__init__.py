"""normc's own modules: norms whose inference form is a frozen per-channel affine.

They say what canonical op they are (`__normc_canonical__`) and trace to the canonical
`fixed_norm` op, so the standard rules fold them into the linears that read them.
"""
from normc.nn.power_norm import PowerNorm, group_scaling
from normc.nn.unified_norm import FrozenAffineNorm, UnifiedNorm, fixed_norm_scale

__all__ = ["UnifiedNorm", "PowerNorm", "FrozenAffineNorm", "fixed_norm_scale", "group_scaling"]
