"""How many times one normc run executes the model: eager forwards of the original, runs of graph modules
(compiled and node by node), and traces, counted on a small GPT-2-shaped model (zoo:gpt2: 2 layers, d=64)
through examples/prenorm_to_rmsnorm.nc to ONNX (verification as written: fp32 after each step, float64).

    python bench/forward_passes.py                    # this checkout
    python bench/forward_passes.py --root /work/main  # another checkout's normc (before / after)

Runs with real tensors are counted apart from the ones torch.export and the ONNX exporter make with fake
tensors while tracing (those are part of a trace). Counts, not timings: the same on any machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake(args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree
    return any(isinstance(a, FakeTensor) for a in pytree.tree_leaves(args))


def count(model: str, rules: Path, output_suffix: str) -> Counter:
    import torch
    import torch.fx as fx
    import torch.fx.graph_module as gmod

    import normc.api as nc
    counts: Counter = Counter()

    wrapped = gmod._WrappedCall.__call__

    def wrapped_call(self, obj, *args, **kwargs):
        counts["graph module runs (traced)" if _fake((args, kwargs)) else "graph module runs"] += 1
        return wrapped(self, obj, *args, **kwargs)
    gmod._WrappedCall.__call__ = wrapped_call

    run = fx.Interpreter.run

    def interp_run(self, *args, **kwargs):
        if type(self).__name__ == "_Upcast":  # normc.verify.sites: one site's (or block's) nodes, not the model
            counts["site/block evaluations in float64"] += 1
        else:
            counts["node-by-node runs (traced)" if _fake(args) else "node-by-node runs"] += 1
        return run(self, *args, **kwargs)
    fx.Interpreter.run = interp_run

    export = torch.export.export

    def export_count(*a, **k):
        counts["torch.export traces"] += 1
        return export(*a, **k)
    torch.export.export = export_count

    decomp = torch.export.ExportedProgram.run_decompositions

    def decomp_count(self, *a, **k):
        counts["run_decompositions"] += 1
        return decomp(self, *a, **k)
    torch.export.ExportedProgram.run_decompositions = decomp_count

    symbolic = fx.symbolic_trace

    def symbolic_count(*a, **k):
        counts["symbolic traces"] += 1
        return symbolic(*a, **k)
    fx.symbolic_trace = symbolic_count

    program = nc.load_rules(rules)
    loaded = nc.load(program, model)

    def hook(module, args, kwargs):
        counts["original forwards (traced)" if _fake((args, kwargs)) else "original forwards"] += 1
    loaded.module.register_forward_pre_hook(hook, with_kwargs=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = nc.apply(program, loaded, Path(tmp) / f"out{output_suffix}")
    if not result.passed:
        raise SystemExit(f"the run failed: {result.report['verify']['failure']}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose normc is counted")
    ap.add_argument("--model", default="zoo:gpt2")
    ap.add_argument("--rules", type=Path, default=ROOT / "examples" / "prenorm_to_rmsnorm.nc")
    ap.add_argument("-o", "--output-suffix", default=".onnx")
    args = ap.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    import normc
    counts = count(args.model, args.rules, args.output_suffix)
    print(f"normc from {Path(normc.__file__).parent}: {args.model} through {args.rules.name} -> {args.output_suffix}")
    for k in sorted(counts):
        print(f"  {k:32s} {counts[k]}")
    print(json.dumps(dict(counts)))


if __name__ == "__main__":
    main()
