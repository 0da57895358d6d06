"""Streaming a big checkpoint: write it, rewrite it block by block, check the memory bound.

    python bench/streaming.py                       # LLaMA-7B shape, bf16, std.smooth_rms + std.fold_norm_affine
    python bench/streaming.py --shape opt-1.3b      # OPT-1.3B shape, fp16, std.smooth (pre-LN, LayerNorm with bias)
    python bench/streaming.py --shape llama-mini    # a 1 MB checkpoint: the flow in a minute

1. `normc zoo --write SHAPE DIR` writes the random-weight checkpoint (itself streamed).
2. `normc apply RULES DIR -o OUT/ --stream --report R` in a child process: calibration on 8 sequences
   of 64 tokens (random ids), the rules, per-block verification in the checkpoint's dtype, end-to-end
   logits compared by streaming both models.
3. Prints wall time, the child's peak RSS (getrusage of the child), the largest block's bytes, the
   worst per-block error and the end-to-end error, and the bound peak RSS <= 2 x largest block +
   embedding/head + activations (reported as measured, no threshold enforced here).
4. Deletes both checkpoints unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RULES = {
    "llama": """pipeline {
  calibrate from "random" samples 8      # 8 sequences x 64 tokens
  apply std.smooth_rms
  apply std.fold_norm_affine
}
""",
    "opt": """pipeline {
  calibrate from "random" samples 8      # 8 sequences x 64 tokens
  apply std.smooth
}
""",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-7b", help="llama-7b, opt-1.3b or llama-mini")
    ap.add_argument("--workdir", default="/tmp/normc-streaming")
    ap.add_argument("--samples", type=int, default=2, help="random verification inputs besides the example")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    print(f"disk free at {work}: {free / 1e9:.1f} GB")
    src, out = work / args.shape, work / f"{args.shape}-out"
    rules = work / f"{args.shape}.nc"
    rules.write_text(RULES["opt" if args.shape.startswith("opt") else "llama"])
    try:
        t = time.perf_counter()
        if not (src / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "normc.cli", "zoo", "--write", args.shape, str(src)], check=True, env=env)
        print(f"write {args.shape}: {time.perf_counter() - t:.0f} s, "
              f"{sum(f.stat().st_size for f in src.iterdir()) / 1e9:.2f} GB")
        report = work / f"{args.shape}.json"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "normc.cli", "apply", str(rules), str(src), "-o", f"{out}/",
                               "--stream", "--samples", str(args.samples), "--report", str(report)], check=False, env=env)
        wall = time.perf_counter() - t
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if proc.returncode != 0:
            print(f"normc apply exited {proc.returncode}")
            return proc.returncode
        rep = json.loads(report.read_text())["stream"]
        head = next(e for e in rep["per_unit"] if e["unit"] == "head")
        bound = 2 * rep["largest_block_bytes"] + head["bytes"]
        print(f"shape {args.shape}: {rep['blocks']} blocks, {rep['dtype']}, rules {rules.name}")
        print(f"wall {wall:.0f} s (normc's own: {rep['seconds']:.0f} s)")
        print(f"peak RSS of the normc process: {child_peak / 1e9:.2f} GB (normc's own count: {rep['peak_rss_bytes'] / 1e9:.2f} GB)")
        print(f"largest block: {rep['largest_block_bytes'] / 1e6:.0f} MB; embedding + head unit: {head['bytes'] / 1e6:.0f} MB; "
              f"2 x block + head = {bound / 1e9:.2f} GB (+ activations, + the Python/torch process itself)")
        print(f"worst per-block error: {rep['worst_block']['unit']} max_rel {rep['worst_block']['max_rel_err']:.3g} "
              f"({rep['dtype']}); end to end logits max_rel {rep['end_to_end']['max_rel_err']:.3g} "
              f"on {rep['end_to_end']['inputs']} inputs")
        print(f"calibration: {rep['calibration_samples']} sequences; output files: {len(rep['files'])}")
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
