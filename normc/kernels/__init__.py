"""Fused kernels for canonical ops (`norm_act`): an eager reference that is the spec, the
unfused pair it replaces, and a Triton kernel for CUDA (optional: importing this package
never needs Triton)."""
from normc.kernels.norm_act import (ACTIVATIONS, NORMS, norm_act, norm_act_reference,
                                    norm_act_unfused)
from normc.kernels.norm_act_triton import bench_bandwidth, is_available, norm_act_triton, supports

__all__ = ["NORMS", "ACTIVATIONS", "norm_act", "norm_act_reference", "norm_act_unfused", "norm_act_triton",
           "is_available", "supports", "bench_bandwidth"]
