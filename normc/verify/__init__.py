"""Numeric equivalence: run two models (or a model and an export) and compare every output."""
from normc.verify.compare import (
    CachedReference,
    OutputDiff,
    Tolerance,
    VerifyResult,
    compare_leaves,
    compare_outputs,
    diff_tensors,
    flatten_outputs,
    merge_worst,
    summarize,
    verify_models,
)
from normc.verify.inputs import cast_inputs, sample_inputs

__all__ = [
    "CachedReference",
    "OutputDiff",
    "Tolerance",
    "VerifyResult",
    "cast_inputs",
    "compare_leaves",
    "compare_outputs",
    "diff_tensors",
    "flatten_outputs",
    "merge_worst",
    "sample_inputs",
    "summarize",
    "verify_models",
]
