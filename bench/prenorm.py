"""Pre-LN -> Pre-RMSNorm on a GPT-2-shaped model: original vs converted, side by side.

Builds a transformers GPT2LMHeadModel (random weights, non-trivial LayerNorm gains/shifts; vocab
8192 by default instead of GPT-2's 50257, so the LM head does not dwarf the blocks) and

  A  the original model (25 LayerNorms for 12 layers: two per block and the final one),
  B  the model converted with examples/prenorm_to_rmsnorm.nc through `normc.api.apply`
     (gamma/beta folded into the linears, residual writers recentred, every LayerNorm -> RMSNorm;
     verified in fp32 and replayed in f64 by the example's own `verify` steps),

then times both, per batch size, in

  torch eager, HF module    A = the transformers module itself, B = normc's converted graph module
  torch eager, same graph   A = normc's canonical graph of the original (same fx machinery as B)
  onnxruntime               A = canonical graph exported at --orig-opset (LayerNormalization),
                            B = converted graph at opset 23 (RMSNormalization); sessions from
                            normc.backends.onnx_backend.ort_session (thread spinning off)

Every variant is timed in its own contiguous block (warm-up, then --runs calls), for --rounds
(at least 5) rounds whose order rotates (A B, B A, ...); A/B is the median of the rounds' ratios
(bench/_timing.py). Prints A/B ratios (> 1: the converted model is faster) next to the limit
1/(1 - LayerNorm share of A) (B still normalizes, so it cannot gain more), and a warning line
when a ratio exceeds its limit or the rounds disagree by more than 10 %. No thresholds. The converted graphs are specialised to their batch size: the conversion runs once
per batch size (verification on the example input only, to keep batch 8 affordable).

    python bench/prenorm.py                                  # 12 layers, d=768, seq 128, batch 1 and 8
    python bench/prenorm.py --layers 2 --dim 128 --runs 20   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import (  # bench/ on sys.path
    graph_share,
    limit_of,
    module_share,
    ort_share,
    ratio_warnings,
    time_rotated,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "prenorm_to_rmsnorm.nc"


# --------------------------------------------------------------------------- model
def build_model(layers: int, dim: int, heads: int, vocab: int, seq: int, attn: str, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from normc.frontend.zoo import randomize_norms

    cfg = GPT2Config(n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=max(seq, 128),
                     bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation=attn)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    randomize_norms(model, torch.Generator().manual_seed(seed))  # LN gains/shifts away from 1/0
    return model.eval()


def loaded_for(model, batch: int, seq: int, vocab: int):
    from normc.frontend.specs import InputSpec, LoadedModel

    spec = InputSpec("input_ids", (batch, seq), torch.int64, 0, vocab)
    ids = spec.sample(torch.Generator().manual_seed(batch))
    return LoadedModel(model, (ids,), {}, [spec], f"bench:gpt2-b{batch}", True)


def logits(out):
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


# --------------------------------------------------------------------------- timing
@contextlib.contextmanager
def stage(msg: str, quiet: bool):
    t0 = time.perf_counter()
    if not quiet:
        print(f"  {msg} ...", end="", flush=True, file=sys.stderr)
    yield
    if not quiet:
        print(f" {time.perf_counter() - t0:.1f}s", file=sys.stderr)


# --------------------------------------------------------------------------- one batch size
def bench_batch(model, batch: int, opts, tmp: Path) -> tuple[list[dict], dict]:
    import normc.api
    from normc.backends.onnx_backend import (
        check_onnx,
        export_onnx,
        onnx_op_counts,
        ort_session,
    )
    from normc.ir import ops
    from normc.pipeline import prepare_graph

    quiet = opts.quiet
    print(f"batch {batch}:", file=sys.stderr) if not quiet else None
    loaded = loaded_for(model, batch, opts.seq, opts.vocab)
    (ids,) = loaded.example_args
    with stage("converting with examples/prenorm_to_rmsnorm.nc (normc.api.apply)", quiet):
        result = normc.api.apply(str(EXAMPLE), loaded, None, verify_inputs=0)
    if not result.passed:
        raise SystemExit(f"the conversion did not verify: {result.report['verify']['failure']}")
    conv = result.graph_module
    steps = [s["verify"] for s in result.report["steps"] if s["step"] == "verify"]
    before, after = result.report["graph"]["before"]["op_counts"], result.report["graph"]["after"]["op_counts"]
    with stage("canonical graph of the original", quiet):
        canon, _ = prepare_graph(loaded)
    detail = {"batch": batch, "layer_norm_before": before.get("layer_norm", 0), "rms_norm_after": after.get("rms_norm", 0),
              "layer_norm_after": after.get("layer_norm", 0), "verify_fp32_max_rel": steps[0]["max_rel_err"],
              "verify_f64_max_rel": steps[1]["max_rel_err"] if len(steps) > 1 else None}

    rows = []
    torch.set_num_threads(opts.threads)
    with torch.inference_mode():
        ref = logits(model(ids))
        got = logits(conv(ids))
        detail["eager_B_vs_A_max_rel"] = float((ref - got).abs().max() / ref.abs().max())

        def eager(m):
            return lambda: m(ids)
        with stage("timing torch eager (HF module, converted, canonical LN graph)", quiet):
            t = time_rotated([eager(model), eager(conv), eager(canon)], opts.runs, opts.warmup, opts.rounds)
        with stage("profiling the LayerNorms' share (eager)", quiet):
            share_hf = module_share(model, (ids,), max(3, opts.runs), lambda m: isinstance(m, torch.nn.LayerNorm))
            share_canon = graph_share(canon, (ids,), max(3, opts.runs), {ops.layer_norm})
        rows.append(("torch eager: HF module vs converted", batch, t, 0, 1, share_hf))
        rows.append(("torch eager: same fx graph, LN vs RMS", batch, t, 2, 1, share_canon))

    if not opts.no_onnx:
        pa, pb = tmp / f"orig_b{batch}.onnx", tmp / f"rms_b{batch}.onnx"
        with stage(f"ONNX export (A opset {opts.orig_opset}, B opset 23)", quiet):
            export_onnx(canon, (ids,), None, pa, opset=opts.orig_opset)
            export_onnx(conv, (ids,), None, pb, opset=23)
        ca, cb = onnx_op_counts(pa), onnx_op_counts(pb)
        detail["onnx_A_norm_ops"] = {k: v for k, v in ca.items() if "Normalization" in k or k == "ReduceMean"}
        detail["onnx_B_norm_ops"] = {k: v for k, v in cb.items() if "Normalization" in k or k == "ReduceMean"}
        sa, sb = ort_session(pa, opts.threads), ort_session(pb, opts.threads)
        with stage("onnxruntime check against torch", quiet):
            ra = check_onnx(pa, canon, [((ids,), {})], session=sa)
            rb = check_onnx(pb, model, [((ids,), {})], session=sb)
        detail["ort_A_vs_torch_max_rel"], detail["ort_B_vs_original_max_rel"] = ra.max_rel_err, rb.max_rel_err
        feed_a = {sa.get_inputs()[0].name: ids.numpy()}
        feed_b = {sb.get_inputs()[0].name: ids.numpy()}
        with stage("timing onnxruntime", quiet):
            t = time_rotated([lambda: sa.run(None, feed_a), lambda: sb.run(None, feed_b)],
                             opts.runs, opts.warmup, opts.rounds)
        with stage("profiling the LayerNorms' share (onnxruntime)", quiet):
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = opts.threads, 1, 3
            so.enable_profiling, so.profile_file_prefix = True, str(tmp / f"ortprof_b{batch}")
            share_ort = ort_share(pa, lambda sess: sess.run(None, {sess.get_inputs()[0].name: ids.numpy()}),
                                  max(3, opts.runs), so, lambda name, op_type: op_type == "LayerNormalization")
        rows.append((f"onnxruntime: LayerNormalization (opset {opts.orig_opset}) vs RMSNormalization (23)", batch, t, 0, 1,
                     share_ort))
        del sa, sb
        for p in (pa, pb):
            p.unlink(missing_ok=True)
    out = []
    for backend, b, timing, ia, ib, share in rows:
        limit = limit_of(share)
        out.append({"backend": backend, "batch": b, "A_ms": timing.medians[ia] * 1e3, "B_ms": timing.medians[ib] * 1e3,
                    "A/B": timing.ratio(ia, ib), "round_ratios": timing.ratios(ia, ib), "ln_share": share,
                    "limit": limit, "warnings": ratio_warnings(f"{backend}, batch {b}", timing, ia, ib, limit)})
    return out, detail


def print_table(rows: list[dict]) -> None:
    w = max(len(r["backend"]) for r in rows)
    print(f"{'backend':<{w}}  {'batch':>5}  {'A ms':>9}  {'B ms':>9}  {'A/B':>6}  {'LN share':>8}  {'limit':>6}")
    for r in rows:
        print(f"{r['backend']:<{w}}  {r['batch']:>5}  {r['A_ms']:>9.2f}  {r['B_ms']:>9.2f}  {r['A/B']:>6.3f}  "
              f"{100 * r['ln_share']:>7.1f}%  {r['limit']:>6.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=None, help="default: dim // 64")
    p.add_argument("--vocab", type=int, default=8192, help="GPT-2 has 50257; 8192 keeps the head from dominating")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=4, help="timed runs per block")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs per block")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of blocks, order rotated each round (at least 5); A/B = median of the rounds' ratios")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="transformers attention implementation")
    p.add_argument("--orig-opset", type=int, default=18, help="opset of the original's ONNX (LayerNormalization >= 17)")
    p.add_argument("--no-onnx", action="store_true", help="eager torch only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write rows and details here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    opts = p.parse_args(argv)
    heads = opts.heads or max(1, opts.dim // 64)
    torch.set_num_threads(opts.threads)
    import warnings
    warnings.filterwarnings("ignore")

    print(f"GPT-2-shaped LM: {opts.layers} layers, d={opts.dim}, {heads} heads, vocab {opts.vocab} "
          f"(GPT-2: 50257), seq {opts.seq}, attention {opts.attn}, random weights; threads {opts.threads}; "
          f"{opts.warmup} warm-up + {opts.runs} runs x {opts.rounds} round(s) per block; torch {torch.__version__}")
    model = build_model(opts.layers, opts.dim, heads, opts.vocab, opts.seq, opts.attn, opts.seed)
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="normc-bench-prenorm-") as tmp:
        for b in [int(x) for x in opts.batches.split(",") if x.strip()]:
            r, d = bench_batch(model, b, opts, Path(tmp))
            rows += r
            details.append(d)
    for d in details:
        print(f"batch {d['batch']}: LayerNorm {d['layer_norm_before']} -> RMSNorm {d['rms_norm_after']} "
              f"(LayerNorm left {d['layer_norm_after']}); verify fp32 max_rel {d['verify_fp32_max_rel']:.2e}, "
              f"f64 replay {d['verify_f64_max_rel']:.2e}; eager B vs A {d['eager_B_vs_A_max_rel']:.2e}"
              + (f"; ONNX A {d['onnx_A_norm_ops']} B {d['onnx_B_norm_ops']}, ort B vs original max_rel "
                 f"{d['ort_B_vs_original_max_rel']:.2e}" if "onnx_A_norm_ops" in d else ""))
    print()
    print_table(rows)
    print("A = original (LayerNorm), B = converted (RMSNorm); A/B > 1: B is faster; A/B is the median of the rounds' "
          "ratios. LN share: time in A's LayerNorms (torch.profiler; onnxruntime node profiler); limit = 1/(1-share).")
    for r in rows:
        for w in r["warnings"]:
            print(w)
    if opts.json:
        opts.json.write_text(json.dumps({"rows": rows, "details": details, "argv": sys.argv[1:]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
