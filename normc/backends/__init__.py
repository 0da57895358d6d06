"""Lowering to deployment formats, each with its own check.

* torch_backend: ``.pt2`` (torch.export) and state dicts (``.safetensors`` / torch.save)
* onnx_backend: ONNX via the dynamo exporter, onnxruntime check, op counts
* tensorrt_backend: TensorRT engine from ONNX (raises BackendMissing without TensorRT/GPU)
"""
from normc.backends.onnx_backend import check_onnx, export_onnx, onnx_op_counts, ort_session, run_onnx
from normc.backends.torch_backend import load_pt2, save_pt2, save_state_dict

__all__ = [
    "check_onnx",
    "export_onnx",
    "load_pt2",
    "onnx_op_counts",
    "ort_session",
    "run_onnx",
    "save_pt2",
    "save_state_dict",
]
