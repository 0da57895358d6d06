"""Loading models safely and tracing them to torch.fx.

    loaded = load_model("zoo:resnet18")          # or "model.py:build", "model.pt2", ...
    traced = trace_model(loaded)                 # TraceResult(graph_module, method, notes)

Importing this package does not import transformers; only HF zoo builders do.
"""
from normc.frontend.load import ACCEPTED_FORMS, load_model, load_weights, read_state_dict
from normc.frontend.specs import InputSpec, LoadedModel
from normc.frontend.trace import (
    TraceResult,
    annotate_module_paths,
    compare_outputs,
    inplace_ops,
    module_path,
    trace_model,
)
from normc.frontend.zoo import ZOO, ZooEntry, randomize_norms, zoo_names

__all__ = [
    "ACCEPTED_FORMS",
    "InputSpec",
    "LoadedModel",
    "TraceResult",
    "ZOO",
    "ZooEntry",
    "annotate_module_paths",
    "compare_outputs",
    "inplace_ops",
    "load_model",
    "load_weights",
    "module_path",
    "randomize_norms",
    "read_state_dict",
    "trace_model",
    "zoo_names",
]
