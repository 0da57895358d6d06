"""Running a program's pipeline on a model: apply, calibrate, verify, export, report."""
from .runner import CompileResult, RunOptions, compile_model, prepare_graph

__all__ = ["CompileResult", "RunOptions", "compile_model", "prepare_graph"]
