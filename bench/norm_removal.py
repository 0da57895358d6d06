"""What removing Unified Normalization at inference buys: original vs folded, side by side.

For `zoo:un-vit` and `zoo:un-gpt` (plain-nn transformers with UnifiedNorm in place of
LayerNorm) this builds

  A  the original model (every UN is a per-channel affine `x * scale + shift` at inference),
  B  the folded model: each UN's affine folded into the linears that read it
     (W' = W diag(scale), b' = b + W shift) and the norm removed (identity),

checks that B computes what A does, and times both in eager torch and in onnxruntime
(spinning off). Each variant is timed in its own contiguous block (warm-up, then N runs),
in at least 5 rounds whose order rotates (A B, B A, ...); A/B is the median of the rounds'
ratios (bench/_timing.py). The norms' share of A's run time is measured with torch.profiler (eager: the CPU
time inside UnifiedNorm forwards / the whole forward) and with onnxruntime's node profiler
(ONNX: time of the Mul/Add nodes that carry the norms' scale/shift / all node time); the
speed-up is printed next to its limit 1 / (1 - share), and a warning line when it exceeds that
limit or when the rounds disagree by more than 10 %. Ratios only; no thresholds.

Folding: `normc.api.apply("examples/un_fold.nc", ...)` (the standard rules std.fixed_norm;
rewrite done directly on the canonical graph).

    python bench/norm_removal.py                      # small zoo models, < 2 min on 2 cores
    python bench/norm_removal.py --size base          # 12 layers, d=768 (ViT-B/16-like, GPT-2-like)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import (  # bench/ on sys.path
    Timing,
    graph_share,
    limit_of,
    module_share,
    ort_share,
    ratio_warnings,
    time_rotated,
)
from torch import fx

ROOT = Path(__file__).resolve().parents[1]
UN_FOLD_NC = ROOT / "examples" / "un_fold.nc"


# --------------------------------------------------------------------------- folding
def folded_model(loaded) -> tuple[fx.GraphModule, str, int]:
    """The folded graph of `loaded` (normc's own rules: examples/un_fold.nc), how it was made, norms removed."""
    import normc.api
    from normc.ir import ops

    result = normc.api.apply(str(UN_FOLD_NC), loaded)
    if not result.passed:
        raise SystemExit(f"un_fold.nc did not verify: {result.report['verify']['failure']}")
    gm = result.graph_module
    left = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.fixed_norm)
    total = sum(1 for m in loaded.module.modules() if type(m).__name__ == "UnifiedNorm")
    return gm, f"normc.api.apply({UN_FOLD_NC.relative_to(ROOT)})", total - left


# --------------------------------------------------------------------------- shares
def eager_norm_share(module: torch.nn.Module, args: tuple, runs: int) -> float:
    """CPU time inside UnifiedNorm forwards / CPU time of the whole forward (torch.profiler)."""
    from normc.nn import FrozenAffineNorm

    return module_share(module, args, runs, lambda m: isinstance(m, FrozenAffineNorm))


def graph_norm_share(gm: fx.GraphModule, args: tuple, runs: int) -> float:
    """The same share for a canonical graph: time inside its `fixed_norm` nodes / whole forward."""
    from normc.ir import ops

    return graph_share(gm, args, runs, {ops.fixed_norm})


def _ort_options(threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()  # as normc.backends.onnx_backend.ort_session: spinning off
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def ort_norm_share(path: Path, args: tuple, norm_tensors: list[np.ndarray], runs: int, threads: int | None,
                   workdir: Path) -> tuple[float, int]:
    """Node time of the Mul/Add nodes that apply the norms' scale/shift / all node time
    (onnxruntime profiler). A node is a norm node when one of its inputs is an initializer
    equal to some norm's scale or shift (the exporter folds their reshape into a constant)."""
    import onnx

    from normc.backends.onnx_backend import run_onnx

    model = onnx.load(str(path))
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # Constant nodes too
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    inits[n.output[0]] = numpy_helper.to_array(a.t)

    def is_norm_const(name: str) -> bool:
        v = inits.get(name)
        if v is None or v.ndim == 0:
            return False
        flat = v.reshape(-1)
        return any(flat.shape == t.shape and np.array_equal(flat, t) for t in norm_tensors)

    norm_nodes = {n.name for n in model.graph.node if n.op_type in ("Mul", "Add")
                  and any(is_norm_const(i) for i in n.input)}
    share = ort_share(path, lambda sess: run_onnx(sess, args), runs, _ort_options(threads, str(workdir / "ortprof")),
                      lambda name, op_type: name in norm_nodes)
    return share, len(norm_nodes)


# --------------------------------------------------------------------------- one model
def build(name: str, size: str, seq: int | None):
    from normc.frontend.zoo import build_un_gpt, build_un_vit

    if name == "un-vit":
        return build_un_vit(size)
    if name == "un-gpt":
        return build_un_gpt(size, seq=seq)
    raise SystemExit(f"unknown model {name!r}: un-vit or un-gpt")


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a64, b64 = a.detach().double(), b.detach().double()
    err = float((a64 - b64).abs().max())
    return err, err / max(float(a64.abs().max()), 1e-30)


def bench_model(name: str, opts) -> tuple[list[dict], dict]:
    from normc.backends.onnx_backend import (
        export_onnx,
        onnx_op_counts,
        ort_session,
        run_onnx,
    )
    from normc.nn import FrozenAffineNorm
    from normc.pipeline.runner import prepare_graph

    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"  [{name} {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    loaded = build(name, opts.size, opts.seq)
    module, args = loaded.module, tuple(loaded.example_args)
    norms = [m for m in module.modules() if isinstance(m, FrozenAffineNorm)]
    say(f"{len(norms)} UnifiedNorms; folding")
    t0 = time.perf_counter()
    folded, how, n_folded = folded_model(loaded)
    fold_s = time.perf_counter() - t0
    canonical, _ = prepare_graph(loaded)  # control: the same graph, norms kept

    with torch.inference_mode():
        ref = module(*args)
        out_b = folded(*args)
        extra = [loaded.sample_inputs(torch.Generator().manual_seed(s))[0] for s in (1, 2)]
        errs = [max_err(ref, out_b)] + [max_err(module(*a), folded(*a)) for a in extra]
    abs_err, rel_err = max(e[0] for e in errs), max(e[1] for e in errs)
    info = {"model": name, "size": opts.size, "input": [tuple(a.shape) for a in args], "norms": len(norms),
            "folded": n_folded, "fold_method": how, "fold_seconds": round(fold_s, 3),
            "max_abs_err": abs_err, "max_rel_err": rel_err}

    rows = []
    runs, warmup = opts.runs, opts.warmup
    # ---- eager torch: A and B in contiguous blocks
    say("timing eager torch")
    with torch.inference_mode():
        eager = time_rotated([lambda: module(*args), lambda: folded(*args), lambda: canonical(*args)],
                             runs, warmup, opts.rounds)
    say("profiling the norms' share (eager)")
    n_prof = max(5, min(runs, 50))
    share_mod = eager_norm_share(module, args, n_prof)
    share_gm = graph_norm_share(canonical, args, n_prof)
    rows.append(_row(name, "torch eager (nn.Module vs folded)", eager, 0, 1, share_mod))
    rows.append(_row(name, "torch eager (canonical vs folded)", eager, 2, 1, share_gm))

    # ---- onnxruntime
    if not opts.no_onnx:
        with tempfile.TemporaryDirectory(prefix="normc-bench-") as tmp:
            tmp = Path(tmp)
            say("exporting ONNX (original, folded)")
            pa = export_onnx(module, args, {}, tmp / "original.onnx", opset=opts.opset)
            pb = export_onnx(folded, args, {}, tmp / "folded.onnx", opset=opts.opset)
            ca, cb = onnx_op_counts(pa), onnx_op_counts(pb)
            info["onnx_ops_original"], info["onnx_ops_folded"] = ca, cb
            sa, sb = ort_session(pa, opts.threads), ort_session(pb, opts.threads)
            oa, ob = run_onnx(sa, args)[0], run_onnx(sb, args)[0]
            info["onnx_max_abs_err"] = max(max_err(ref, torch.from_numpy(oa))[0], max_err(ref, torch.from_numpy(ob))[0])
            say("timing onnxruntime")
            ort_t = time_rotated([lambda: run_onnx(sa, args), lambda: run_onnx(sb, args)], runs, warmup, opts.rounds)
            del sa, sb
            tensors = []
            for m in norms:
                tensors.append(m.scale.detach().cpu().numpy().reshape(-1))
                if m.shift is not None:
                    tensors.append(m.shift.detach().cpu().numpy().reshape(-1))
            say("profiling the norms' share (onnxruntime)")
            share_ort, n_nodes = ort_norm_share(pa, args, tensors, n_prof, opts.threads, tmp)
            info["onnx_norm_nodes"] = n_nodes
            rows.append(_row(name, "onnxruntime (original vs folded)", ort_t, 0, 1, share_ort))
    return rows, info


def _row(model, backend, timing: Timing, a: int, b: int, share: float) -> dict:
    limit = limit_of(share)
    return {"model": model, "backend": backend, "a_ms": timing.medians[a] * 1e3, "b_ms": timing.medians[b] * 1e3,
            "speedup": timing.ratio(a, b), "round_ratios": timing.ratios(a, b), "norm_share": share, "limit": limit,
            "warnings": ratio_warnings(f"{model} {backend}", timing, a, b, limit)}


def print_table(rows: list[dict]) -> None:
    head = f"{'model':8} {'backend':36} {'A ms':>9} {'B ms':>9} {'A/B':>6} {'norm share':>10} {'limit':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:8} {r['backend']:36} {r['a_ms']:9.3f} {r['b_ms']:9.3f} {r['speedup']:6.3f} "
              f"{100 * r['norm_share']:9.1f}% {r['limit']:6.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="un-vit,un-gpt", help="comma-separated: un-vit, un-gpt")
    p.add_argument("--size", default="small", choices=["small", "base"])
    p.add_argument("--seq", type=int, default=None, help="un-gpt sequence length (default: the size's)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per block (default 200 small, 8 base)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per block (default 10 small, 2 base)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of blocks, order rotated each round (at least 5); A/B = median of the rounds' ratios")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and onnxruntime intra-op threads (default 1 small: tiny ops gain nothing from "
                        "more and suffer thread wake-up stalls on a shared machine; all cores base)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-onnx", action="store_true", help="eager torch only")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and details here")
    opts = p.parse_args(argv)
    base = opts.size == "base"
    opts.runs = opts.runs or (4 if base else 100)
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if base else 10)
    if opts.threads is None and not base:
        opts.threads = 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(f"normc bench: norm removal (UnifiedNorm folded into the next linears), size={opts.size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch / {opts.threads or 'default'} onnxruntime "
          f"threads, {os.cpu_count()} cores, "
          f"{opts.rounds} rounds of blocks in rotated order, each runs={opts.runs} after warm-up={opts.warmup}; "
          f"A = original, B = folded; A/B = median of the rounds' ratios")
    all_rows, infos = [], []
    t0 = time.perf_counter()
    for name in [m.strip() for m in opts.models.split(",") if m.strip()]:
        rows, info = bench_model(name, opts)
        all_rows += rows
        infos.append(info)
    print()
    for info in infos:
        ops_a, ops_b = info.get("onnx_ops_original"), info.get("onnx_ops_folded")
        onnx_note = ""
        if ops_a is not None:
            diff = {k: ops_b.get(k, 0) - ops_a.get(k, 0) for k in sorted(set(ops_a) | set(ops_b))
                    if ops_b.get(k, 0) != ops_a.get(k, 0)}
            onnx_note = (f"; ONNX ops folded - original: {diff} ({info['onnx_norm_nodes']} norm Mul/Add nodes "
                         f"found); ORT max abs err {info['onnx_max_abs_err']:.2e}")
        print(f"{info['model']}: input {info['input']}, {info['norms']} UnifiedNorms, {info['folded']} folded by "
              f"{info['fold_method']} in {info['fold_seconds']}s; folded vs original max abs err "
              f"{info['max_abs_err']:.2e} (rel {info['max_rel_err']:.2e}){onnx_note}")
    print()
    print_table(all_rows)
    print(f"\nshare: time inside the norms / whole forward in A (torch.profiler; onnxruntime node profiler). "
          f"limit = 1/(1-share): the speed-up if the norms cost nothing. total {time.perf_counter() - t0:.1f}s")
    for r in all_rows:
        for w in r["warnings"]:
            print(w)
    if opts.json:
        opts.json.write_text(json.dumps({"rows": all_rows, "models": infos}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
