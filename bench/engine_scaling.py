"""How the rewriting engine scales: chains of N conv -> BatchNorm pairs, side by side with torch.fx.

For each N (an `nn.Sequential` of Conv2d(4, 4, 3) + BatchNorm2d(4) pairs, input 1x4x8x8, random
running statistics), four things are timed in one process:

  rewrite  normc's rewrite alone: `apply_rule` of every rule of std.bn on the canonical graph
           (tracing and canonicalization are set up beforehand, not timed)
  apply    normc's whole run: `normc.api.apply` of examples/bn_fold.nc on the module (trace,
           canonicalize, rewrite, verification on its default inputs; nothing written)
  fuse     `torch.fx.experimental.optimization.fuse` (copies the module, traces it, folds each pair)
  trace    `torch.fx.symbolic_trace` alone (the floor every fx-based tool pays)

Each round runs the four in a rotated order for every N (a fresh model and graph each time);
the figures are medians over rounds, in wall-clock and in CPU seconds of the process (one thread:
the work itself, less inflated by other load on a shared machine). Printed: seconds, each one's
ratio to fuse, and the log-log slope of seconds against N (1.0 = linear). A line starts with
WARNING when rounds disagree by more than 10 % or a ratio is impossible (the whole run faster
than its own rewrite, fuse faster than the trace it contains): that figure is noise.

    python bench/engine_scaling.py                     # N = 200 400 800 1600 3200, 3 rounds; ~15 min on 2 cores
    python bench/engine_scaling.py --quick             # N = 100 200 400 800, 2 rounds; ~2 min
    python bench/engine_scaling.py --n 400 1600 --rounds 5 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the normc of this checkout, run from anywhere
BN_FOLD_NC = ROOT / "examples" / "bn_fold.nc"
COLUMNS = ("rewrite", "apply", "fuse", "trace")
CLOCKS = {"wall": "wall-clock seconds (medians)",
          "cpu": "CPU seconds of this process (medians; what other load on a shared machine inflates least)"}


def chain(n: int, channels: int = 4, seed: int = 0) -> nn.Sequential:
    """n Conv2d + BatchNorm2d pairs with non-trivial running statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            conv.weight.mul_(0.5)  # keeps activations of a deep chain in range
            bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g) * 0.1)
        layers += [conv, bn]
    return nn.Sequential(*layers).eval()


def loaded(module: nn.Module, x: torch.Tensor):
    from normc.frontend.specs import InputSpec, LoadedModel
    return LoadedModel(module, (x,), {}, [InputSpec.from_example("x", x)], f"chain of {len(module) // 2}", False)


class Case:
    """The four timed operations on one N; `setup` work is not timed."""

    def __init__(self, n: int):
        self.n = n
        self.x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        from normc.api import load_rules
        from normc.grammar.loader import load_std
        self.program = load_rules(BN_FOLD_NC)
        std = load_std()
        self.rules = [std.rules[name] for name in std.groups["std.bn"]]

    def run(self, column: str) -> tuple[dict, dict]:
        """Wall and CPU seconds of one `column` operation on a fresh model (and what it did)."""
        module = chain(self.n)
        did = {}
        if column == "rewrite":
            from normc.ir.rewrite import apply_rule
            from normc.pipeline import prepare_graph
            gm, _ = prepare_graph(loaded(module, self.x))

            def work():
                reports = [apply_rule(gm, rule) for rule in self.rules]
                did["applied"] = sum(r.applied for r in reports)
        elif column == "apply":
            import normc.api
            lm = loaded(module, self.x)

            def work():
                result = normc.api.apply(self.program, lm)
                if not result.passed:
                    raise SystemExit(f"bn_fold.nc did not verify at N={self.n}: {result.report['verify']}")
                did["applied"] = sum(r["applied"] for r in result.report["rules"])
        elif column == "fuse":
            from torch.fx.experimental.optimization import fuse

            def work():
                fuse(module)
        else:
            def work():
                fx.symbolic_trace(module)
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        work()
        return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}, did


def slope(ns: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(N)."""
    xs, ys = [math.log(n) for n in ns], [math.log(s) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", help="chain lengths (default 200 400 800 1600 3200)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="N = 100 200 400 800, 2 rounds")
    ap.add_argument("--columns", nargs="+", choices=COLUMNS, default=list(COLUMNS))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    ns = args.n or ([100, 200, 400, 800] if args.quick else [200, 400, 800, 1600, 3200])
    rounds = args.rounds or (2 if args.quick else 3)
    columns = list(args.columns)
    torch.set_num_threads(args.threads)
    cases = {n: Case(n) for n in ns}
    times = {(clock, n, c): [] for clock in CLOCKS for n in ns for c in columns}
    warnings = []
    print(f"conv->BN chains, N = {' '.join(map(str, ns))}; {rounds} rounds, rotated order; "
          f"{args.threads} thread(s)", flush=True)
    for r in range(rounds):
        for n in ns:
            order = columns[r % len(columns):] + columns[:r % len(columns)]
            for c in order:
                seconds, did = cases[n].run(c)
                for clock in CLOCKS:
                    times[(clock, n, c)].append(seconds[clock])
                if c in ("rewrite", "apply") and did.get("applied") != n:
                    warnings.append(f"{c} at N={n} folded {did.get('applied')} of {n} pairs")
            print(f"  round {r + 1}/{rounds} N={n}: " + "  ".join(
                f"{c} {times[('wall', n, c)][-1]:.3f}s" for c in columns), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    slopes = {}
    for clock in CLOCKS:
        for n in ns:
            for c in columns:
                v, m = times[(clock, n, c)], med[(clock, n, c)]
                if len(v) > 1 and (max(v) - min(v)) > 0.10 * m:
                    warnings.append(f"{clock}: {c} at N={n}: rounds disagree by {100 * (max(v) - min(v)) / m:.0f} % "
                                    f"({', '.join(f'{s:.3f}' for s in v)})")
            if "rewrite" in columns and "apply" in columns and med[(clock, n, "apply")] < med[(clock, n, "rewrite")]:
                warnings.append(f"{clock}: N={n}: the whole run ({med[(clock, n, 'apply')]:.3f}s) is faster than "
                                f"its own rewrite ({med[(clock, n, 'rewrite')]:.3f}s): impossible, the timings are noise")
            if "fuse" in columns and "trace" in columns and med[(clock, n, "fuse")] < med[(clock, n, "trace")]:
                warnings.append(f"{clock}: N={n}: fuse ({med[(clock, n, 'fuse')]:.3f}s) is faster than the trace it "
                                f"contains ({med[(clock, n, 'trace')]:.3f}s): impossible, the timings are noise")
        print(f"\n{CLOCKS[clock]}")
        head = f"{'N':>6}  " + "  ".join(f"{c + ' s':>10}" for c in columns)
        if "fuse" in columns:
            head += "  " + "  ".join(f"{c + '/fuse':>12}" for c in columns if c != "fuse")
        print(head)
        for n in ns:
            line = f"{n:>6}  " + "  ".join(f"{med[(clock, n, c)]:>10.3f}" for c in columns)
            if "fuse" in columns:
                line += "  " + "  ".join(f"{med[(clock, n, c)] / med[(clock, n, 'fuse')]:>12.2f}"
                                         for c in columns if c != "fuse")
            print(line)
        if len(ns) > 1:
            slopes[clock] = {c: slope(ns, [med[(clock, n, c)] for n in ns]) for c in columns}
            print(f"{'slope':>6}  " + "  ".join(f"{slopes[clock][c]:>10.2f}" for c in columns)
                  + f"   (log-log, N = {ns[0]}..{ns[-1]})")
    print()
    for w in warnings:
        print(f"WARNING: {w}")
    if args.json:
        from normc.atomic import atomic_path
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({
                "n": ns, "rounds": rounds, "threads": args.threads,
                "seconds": {clock: {c: {str(n): times[(clock, n, c)] for n in ns} for c in columns} for clock in CLOCKS},
                "median": {clock: {c: {str(n): med[(clock, n, c)] for n in ns} for c in columns} for clock in CLOCKS},
                "slope": slopes, "warnings": warnings}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
