"""INT8 on all-MiniLM-L6-v2 (real weights): naive, outlier migration, and migration + each remedy for
the post-GELU FFN output projections -- simulated and in onnxruntime, from ONE plan per row.

    python bench/int8.py                  # everything (sim + ORT + latency)
    python bench/int8.py --skip-onnx      # simulation only
    python bench/int8.py --heldout 64     # fewer held-out sentences (default 288)

Data: calibration = the 64 built-in calibration sentences (`calibrate from "builtin:sentences"`);
held out = the 32 built-in evaluation sentences + template sentences (normc/data/heldout.py) to
`--heldout`; each tokenized alone to [1, 32]. Quality: sentence-embedding (mean-pooled) cosine to
fp32, mean / min over the held-out sentences.

Rows (each a `quantize int8 { ... }` block, lowered by normc.quantize to the torch simulation and to
onnxruntime QDQ): naive; SmoothQuant / OS+ migration by normc's own rules (examples/minilm_*.nc);
OS+ plus, for the linears whose input comes from a GELU (`match linear(gelu(x), w, b?)`): keep fp32,
weight-only (W8A16-style), per-token dynamic activations, a separate static range for the first
token. Columns: simulated and ORT cosine, |sim - ORT| of the mean cosine, the largest FFN-output
local error over the layers (simulation), ORT latency (median of rounds; each round runs every
model once in rotated order, `--runs` timed runs each, median per model and round).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import normc.api
from normc.backends.cpu_features import cpu_features
from normc.data import calibration_sentences
from normc.data.calibration import from_sentences
from normc.data.heldout import heldout_sentences
from normc.frontend.minilm import build_minilm, mean_pool_embedding
from normc.grammar.parser import parse_text
from normc.pipeline.runner import prepare_graph
from normc.quantize.report import (
    error_shares,
    first_output,
    range_profile,
    reference_outputs,
)
from normc.quantize.run import quantize_graph, write_onnx_int8
from normc.quantize.simulate import local_errors

POST_GELU = "match linear(gelu(x), w, b?)"
ROWS = [  # (label, migration rules file or None, quantize block body)
    ("naive", None, ""),
    ("SmoothQuant a=0.8", "minilm_smoothquant.nc", ""),
    ("OS+ a=0.8", "minilm_osplus.nc", ""),
    ("OS+ + FFN-out keep fp32", "minilm_osplus.nc", f"{POST_GELU}: keep fp32"),
    ("OS+ + FFN-out W8A16", "minilm_osplus.nc", f"{POST_GELU}: activations fp32"),
    ("OS+ + FFN-out per-token dynamic", "minilm_osplus.nc", f"{POST_GELU}: activations per_token dynamic"),
    ("OS+ + FFN-out first-token range", "minilm_osplus.nc", f"{POST_GELU}: first_tokens 1"),
]
FFN_OUT = "encoder.layer.{l}.output.dense"


def embeddings(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([mean_pool_embedding(first_output(model(*a, **k)), a[1]) for a, k in inputs])


def onnx_embeddings(path, inputs) -> torch.Tensor:
    from normc.backends.onnx_backend import ort_session, run_onnx
    sess = ort_session(path)
    return torch.cat([mean_pool_embedding(torch.from_numpy(run_onnx(sess, a, k)[0]), a[1]) for a, k in inputs])


def cos_stats(ref, emb) -> tuple[float, float, torch.Tensor]:
    c = torch.nn.functional.cosine_similarity(ref.double(), emb.double())
    return float(c.mean()), float(c.min()), c


def timed(path, args, kwargs, runs: int) -> float:
    from normc.backends.onnx_backend import ort_session
    from normc.backends.quantize import onnx_feed
    sess = ort_session(path)
    feed = onnx_feed([i.name for i in sess.get_inputs()], args, kwargs)
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--heldout", type=int, default=288)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per model and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--explain", action="store_true", help="rank the naive row's linears by share of the error")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers to run, in that order (default: all)")
    opts = ap.parse_args(argv)
    t_start = time.perf_counter()
    cpu = cpu_features()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"# CPU: {cpu.describe()}")
    loaded = build_minilm()
    n_pos = len(loaded.example_args)
    calib = from_sentences(calibration_sentences(), specs=loaded.input_specs, n_positional=n_pos)
    held = from_sentences(heldout_sentences(opts.heldout), specs=loaded.input_specs, n_positional=n_pos)
    print(f"# {len(calib)} calibration / {len(held)} held-out sentences ({len(held) - 32} from templates), [1, 32]")
    ref = embeddings(loaded.module, held)
    graphs = {}
    work = Path(tempfile.mkdtemp(prefix="normc-int8-bench-"))
    rows, onnx_files = [], {}
    observed = {}
    order = [int(i) for i in opts.rows.split(",")] if opts.rows else range(len(ROWS))
    for label, rules, body in (ROWS[i] for i in order):
        t0 = time.perf_counter()
        if rules not in graphs:
            if rules is None:
                graphs[rules] = prepare_graph(loaded)[0]
            else:
                res = normc.api.apply(str(ROOT / "examples" / rules), loaded, write=False)
                assert res.passed, res.report["verify"]
                graphs[rules] = res.graph_module
        gm = graphs[rules]
        step = parse_text("pipeline { quantize int8 { " + body + " } }").pipeline.steps[0]
        q = quantize_graph(gm, step, calib, observed=observed.get(rules))
        observed[rules] = q.stats
        sim_mean, sim_min, sim_c = cos_stats(ref, embeddings(q.sim.graph_module, held))
        local = local_errors(q.sim, held[:32])
        ffn_out = [local.get(FFN_OUT.format(l=l), 0.0) for l in range(6)]
        row = {"label": label, "sim": (sim_mean, sim_min), "ffn_out": ffn_out, "q": q}
        if not opts.skip_onnx:
            out = work / f"row{len(rows)}.onnx"
            write_onnx_int8(q, loaded.example_args, loaded.example_kwargs, out, calib)
            o_mean, o_min, o_c = cos_stats(ref, onnx_embeddings(out, held))
            row["ort"] = (o_mean, o_min)
            row["sim_ort"] = (abs(o_mean - sim_mean), float((o_c - sim_c).abs().max()))
            onnx_files[label] = out
        rows.append(row)
        print(f"# {label}: {time.perf_counter() - t0:.0f} s; sim {sim_mean:.4f} / {sim_min:.4f}"
              + (f", ORT {row['ort'][0]:.4f} / {row['ort'][1]:.4f}, |sim-ORT| {row['sim_ort'][0]:.5f} / "
                 f"{row['sim_ort'][1]:.4f}" if "ort" in row else "")
              + f", FFN-out local {' '.join(f'{e:.4f}' for e in ffn_out)}", flush=True)

    latency = {}
    if onnx_files:
        from normc.backends.onnx_backend import export_onnx
        fp32 = work / "fp32.onnx"
        export_onnx(graphs.get(None) or prepare_graph(loaded)[0], loaded.example_args, loaded.example_kwargs, fp32)
        models = [("fp32", fp32)] + list(onnx_files.items())
        for r in range(opts.rounds):
            k = r % len(models)
            for label, path in models[k:] + models[:k]:
                latency.setdefault(label, []).append(timed(path, loaded.example_args, loaded.example_kwargs, opts.runs))

    print()
    print(f"## Sentence-embedding cosine to fp32 ({len(held)} held-out sentences; mean / min)")
    print()
    print("| row | sim cos | ORT cos | abs(sim - ORT) mean / worst sentence | FFN-out local err, max over layers |"
          " ORT latency ms | vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(latency["fp32"]) if latency else None
    if latency:
        print(f"| fp32 | 1 | 1 | | | {base * 1e3:.2f} | 1.00x |")
    for row in rows:
        ort_s = f"{row['ort'][0]:.4f} / {row['ort'][1]:.4f}" if "ort" in row else "-"
        diff = f"{row['sim_ort'][0]:.5f} / {row['sim_ort'][1]:.4f}" if "sim_ort" in row else "-"
        lat = statistics.median(latency[row["label"]]) if row["label"] in latency else None
        lat_s = f"{lat * 1e3:.2f} | {base / lat:.2f}x" if lat else "- | -"
        print(f"| {row['label']} | {row['sim'][0]:.4f} / {row['sim'][1]:.4f} | {ort_s} | {diff} | "
              f"{max(row['ffn_out']):.4f} | {lat_s} |")

    print()
    print("## FFN-output local error ||y_q - y|| / ||y|| per layer (simulation, 32 held-out sentences)")
    print()
    print("| row | " + " | ".join(f"L{l}" for l in range(6)) + " |")
    print("|---|" + "---|" * 6)
    for row in rows:
        print(f"| {row['label']} | " + " | ".join(f"{e:.4f}" for e in row["ffn_out"]) + " |")

    print()
    print("## Range profile of the FFN-output inputs (naive, calibration): widest positions and ratio to the rest")
    print()
    print("| layer | min / max | widest positions (pos, absmax) | widest / next position |")
    print("|---|---|---|---|")
    stats = rows[0]["q"].stats
    for l in range(6 if FFN_OUT.format(l=0) in stats else 0):
        p = range_profile(stats[FFN_OUT.format(l=l)])
        print(f"| {l} | {p['min']:.2f} / {p['max']:.2f} | {p['top_positions']} | {p['position_ratio']:.2f} |")

    if opts.explain:
        print()
        print("## Explain: naive linears by share of the end-to-end error (1 - mean output cosine, that linear alone)")
        print()
        q = rows[0]["q"]
        ex = held[:32]
        shares = error_shares(q, ex, reference_outputs(graphs[None], ex))
        print("| linear | loss alone | share |")
        print("|---|---|---|")
        for name, loss, share in shares[:10]:
            print(f"| {name} | {loss:.2e} | {share:.1%} |")
    if latency:
        print()
        print("latency rounds (ms): " + "; ".join(f"{k}: {', '.join(f'{v * 1e3:.2f}' for v in vs)}"
                                               for k, vs in latency.items()))
    print(f"\n# total {time.perf_counter() - t_start:.0f} s, load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
