"""Traces and forward passes of the original per normc run (issue 10: "trace once").

    PYTHONPATH=. python bench/trace_counts.py [OUTDIR]

Runs `apply std.prenorm_to_rmsnorm; export torch; export onnx` on zoo:gpt2 (GPT-2 shape, 2 layers) with
4 random verification inputs, counting calls by wrapping torch.export.export, torch.fx.symbolic_trace,
ExportedProgram.run_decompositions and torch.onnx.export, and forward calls of the loaded module with a
hook (torch.export's trace of normc's copy of the module counts once too: hooks are copied with it).
Works on any normc checkout (it counts from outside normc).
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import torch
import torch.fx


def main(out: Path) -> None:
    counts: collections.Counter = collections.Counter()

    def wrap(owner, name, key):
        real = getattr(owner, name)

        def counted(*a, **k):
            counts[key] += 1
            return real(*a, **k)
        setattr(owner, name, counted)

    wrap(torch.export, "export", "torch.export.export")
    wrap(torch.fx, "symbolic_trace", "fx.symbolic_trace")
    wrap(torch.export.ExportedProgram, "run_decompositions", "run_decompositions")
    wrap(torch.onnx, "export", "torch.onnx.export")
    from normc import api
    from normc.frontend import load_model
    from normc.pipeline import RunOptions, compile_model
    program = api.load_rules(text=f'pipeline {{\n  apply std.prenorm_to_rmsnorm\n'
                                  f'  export torch to "{out}/g.pt2"\n  export onnx to "{out}/g.onnx"\n}}\n')
    loaded = load_model("zoo:gpt2")
    loaded.module.register_forward_hook(lambda *a: counts.update(["forward of the original"]))
    result = compile_model(program, loaded, RunOptions(verify_inputs=4))
    print(f"passed {result.passed}, verification inputs {result.report['verify'].get('n_inputs')}")
    for key, n in sorted(counts.items()):
        print(f"{key}: {n}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
