"""The library API: what an export script calls (the CLI is a thin layer over it).

A model is any of:

* a source string or path: ``"zoo:gpt2"``, ``"model.py:build"``, ``"model.pt2"``, or a Hugging
  Face directory (``config.json`` + safetensors; see :mod:`normc.frontend.hf`);
* an ``nn.Module`` with ``example_inputs=`` (a tensor, a tuple of tensors, a dict of tensors
  or ``(args, kwargs)``), or without them when the rules declare ``input`` lines;
* a pair ``(module, example_inputs)``;
* a :class:`LoadedModel`.

    import normc.api as nc
    result = nc.apply("examples/bn_fold.nc", model, "model.onnx", example_inputs=torch.randn(1, 3, 224, 224))
    result = nc.apply("examples/prenorm_to_rmsnorm.nc", "./my-gpt2", "gpt2.onnx")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import NormcError
from .frontend import LoadedModel, load_model
from .frontend.load import load_module, split_examples
from .frontend.specs import sample_examples, specs_from_examples
from .grammar.checker import load_and_check
from .grammar.loader import Program
from .pipeline import CompileResult, RunOptions, compile_model
from .pipeline.runner import input_specs_from_decls

ModelLike = str | os.PathLike | nn.Module | tuple | LoadedModel

# keyword options of apply/check that choose how the model is loaded (the rest go to RunOptions)
_LOAD_OPTIONS = ("weights", "allow_pickle", "task", "trust_remote_code", "batch", "seq_len", "image_size")


def load_rules(path: str | Path | None = None, *, text: str | None = None, rules_path=()) -> Program:
    """Parse and check a `.nc` file (or source text); raises NcError with located messages.
    `rules_path`: more folders `use "x.nc"` may read from (besides the file's own folder and std)."""
    return load_and_check(path=path, text=text, file=str(path) if path else "<string>", rules_path=rules_path)


def load(program: Program | None, model: ModelLike, *, example_inputs: Any = None, weights: str | None = None,
         allow_pickle: bool = False, task: str | None = None, trust_remote_code: bool = False,
         batch: int | None = None, seq_len: int | None = None, image_size: int | None = None) -> LoadedModel:
    """Load a model for `program` (see the module docstring for what `model` may be).

    Example inputs, first that applies: `example_inputs`; the `input` declarations of `program`;
    the model's own (factory, zoo, .pt2, Hugging Face config). `task`, `trust_remote_code`,
    `batch`, `seq_len`, `image_size` apply to Hugging Face directories.
    """
    if isinstance(model, LoadedModel):
        return model
    specs = input_specs_from_decls(program.main.inputs) if program is not None and program.main.inputs else None
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        if example_inputs is not None:
            raise NormcError("example inputs given twice: in the (module, example_inputs) pair and as "
                             "example_inputs=", hint="give them once")
        model, example_inputs = model
    if isinstance(model, nn.Module):
        loaded = load_module(model, example_inputs)
        if example_inputs is None:
            if specs is None:
                raise NormcError(f"no example inputs for the {type(model).__name__} given",
                                 hint="pass example_inputs=(tensor, ...), a (module, example_inputs) pair, "
                                 "or declare `input` lines in the rules")
            loaded.example_args, loaded.example_kwargs, loaded.input_specs = sample_examples(specs), {}, specs
        return loaded
    if not isinstance(model, (str, os.PathLike)):
        raise NormcError(f"a model cannot be a {type(model).__name__}",
                         hint="pass an nn.Module (with example_inputs), a (module, example_inputs) pair, "
                         "or a model source such as 'zoo:cnn', 'model.py:build', a .pt2 or a Hugging Face directory")
    loaded = load_model(model, weights=weights, allow_pickle=allow_pickle,
                        input_specs=specs if example_inputs is None else None, task=task,
                        trust_remote_code=trust_remote_code, batch=batch, seq_len=seq_len, image_size=image_size)
    if example_inputs is not None:
        args, kwargs = split_examples(example_inputs, loaded.source)
        loaded.example_args, loaded.example_kwargs = args, kwargs
        loaded.input_specs = specs_from_examples(args, kwargs, _arg_names(loaded))
    return loaded


def _arg_names(loaded: LoadedModel) -> list[str]:
    from .frontend.specs import forward_arg_names
    return forward_arg_names(loaded.module)


def apply(rules: str | Path | Program, model: ModelLike, output: str | Path | None = None, *,
          example_inputs: Any = None, **options) -> CompileResult:
    """Apply a rules file to a model; verify; write `output` (only when verification passed).

    `model`: a source string / path, an nn.Module (with `example_inputs`), a `(module,
    example_inputs)` pair, or a LoadedModel. Keyword options `weights`, `allow_pickle`, `task`,
    `trust_remote_code`, `batch`, `seq_len`, `image_size` choose how it is loaded; the others go to
    RunOptions (`verify_inputs`, `seed`, `rollback`, ...).

    Returns the CompileResult: `.graph_module` (the rewritten model), `.report` (the JSON report), `.passed`.
    """
    program = rules if isinstance(rules, Program) else load_rules(rules)
    load_opts = {k: options.pop(k) for k in _LOAD_OPTIONS if k in options}
    loaded = load(program, model, example_inputs=example_inputs, **load_opts)
    out = output if isinstance(output, str) and output.endswith("/") else (Path(output) if output else None)
    return compile_model(program, loaded, RunOptions(output=out, **options))


def check(rules: str | Path | Program, model: ModelLike, *, example_inputs: Any = None, **options) -> CompileResult:
    """Verification only: nothing is written (same model forms and options as `apply`)."""
    return apply(rules, model, None, example_inputs=example_inputs, write=False, **options)
