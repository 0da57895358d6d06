"""The library API: what an export script calls (the CLI is a thin layer over it)."""
from __future__ import annotations

from pathlib import Path

from .frontend import LoadedModel, load_model
from .grammar.checker import load_and_check
from .grammar.loader import Program
from .pipeline import CompileResult, RunOptions, compile_model
from .pipeline.runner import input_specs_from_decls


def load_rules(path: str | Path | None = None, *, text: str | None = None) -> Program:
    """Parse and check a `.nc` file (or source text); raises NcError with located messages."""
    return load_and_check(path=path, text=text, file=str(path) if path else "<string>")


def load(program: Program, model: str, *, weights: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a model for `program`: its `input` declarations, if any, define the example inputs."""
    specs = input_specs_from_decls(program.main.inputs) if program.main.inputs else None
    return load_model(model, weights=weights, allow_pickle=allow_pickle, input_specs=specs)


def apply(rules: str | Path | Program, model: str | LoadedModel, output: str | Path | None = None, **options) -> CompileResult:
    """Apply a rules file to a model; verify; write `output` (only when verification passed).

    Returns the CompileResult: `.graph_module` (the rewritten model), `.report` (the JSON report), `.passed`.
    """
    program = rules if isinstance(rules, Program) else load_rules(rules)
    loaded = model if isinstance(model, LoadedModel) else load(program, model)
    out = output if isinstance(output, str) and output.endswith("/") else (Path(output) if output else None)
    return compile_model(program, loaded, RunOptions(output=out, **options))


def check(rules, model, **options) -> CompileResult:
    """Verification only: nothing is written."""
    return apply(rules, model, None, write=False, **options)
