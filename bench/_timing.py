"""Timing shared by the benchmarks: rotated A/B rounds, medians, and warnings when the numbers
contradict themselves.

Each round times every variant in its own contiguous block (warm-up, then `runs` calls); the
order rotates from round to round (A B, B A, A B, ...), so a variant never always runs first
or always after the other's cache and frequency state. A ratio is the median over rounds of
that round's A median / B median. Two warnings, printed by the benches next to the ratio:

- the ratio exceeds its physical limit (e.g. removing work that takes a share s of A's time
  cannot make A/B more than 1/(1-s)): the machine was disturbed while one variant ran;
- the per-round ratios disagree by more than 10 % (max - min over the median): the machine is
  loaded; the ratio is not to be trusted at that precision.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MIN_ROUNDS = 5
DISAGREEMENT = 0.10  # rounds whose A/B differ by more than this fraction of the median: a warning


def time_block(fn, runs: int, warmup: int) -> list[float]:
    """Seconds of each of `runs` calls of `fn()`, after `warmup` calls, all back to back."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class Timing:
    """Per variant: the median of each round's block, and the median of all its runs."""
    rounds: list[list[float]] = field(default_factory=list)   # [variant][round] -> block median (s)
    medians: list[float] = field(default_factory=list)        # [variant] -> median of all runs (s)

    def ratios(self, a: int = 0, b: int = 1) -> list[float]:
        return [ta / tb for ta, tb in zip(self.rounds[a], self.rounds[b])]

    def ratio(self, a: int = 0, b: int = 1) -> float:
        return statistics.median(self.ratios(a, b))

    def disagreement(self, a: int = 0, b: int = 1) -> float:
        r = self.ratios(a, b)
        return (max(r) - min(r)) / statistics.median(r) if r else 0.0


def time_rotated(fns: list, runs: int, warmup: int, rounds: int) -> Timing:
    """Time every variant `rounds` times, rotating the order each round (see the module doc)."""
    if rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds {rounds}: at least {MIN_ROUNDS} rounds, so that rounds can be compared")
    n = len(fns)
    per_round: list[list[float]] = [[] for _ in fns]
    every: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(n):
            i = (r + k) % n  # round r starts with variant r mod n
            times = time_block(fns[i], runs, warmup)
            per_round[i].append(statistics.median(times))
            every[i] += times
    return Timing(per_round, [statistics.median(t) for t in every])


def ratio_warnings(label: str, timing: Timing, a: int = 0, b: int = 1, limit: float | None = None) -> list[str]:
    """Warning lines for the A/B ratio of `label` (empty when the numbers are consistent)."""
    out = []
    ratio = timing.ratio(a, b)
    if limit is not None and not math.isnan(limit) and ratio > limit:
        out.append(f"warning: {label}: A/B = {ratio:.3f} exceeds its physical limit {limit:.3f} "
                   "(the time the change removes cannot buy more): the machine was disturbed; rerun on an idle machine")
    spread = timing.disagreement(a, b)
    if spread > DISAGREEMENT:
        r = timing.ratios(a, b)
        out.append(f"warning: {label}: rounds disagree by {100 * spread:.0f} % (A/B from {min(r):.3f} to {max(r):.3f} "
                   f"over {len(r)} rounds): the machine is loaded; rerun with more --rounds or on an idle machine")
    return out


def limit_of(share: float) -> float:
    """The largest A/B possible when B saves at most the fraction `share` of A's time."""
    return 1.0 / (1.0 - share) if not math.isnan(share) and share < 1 else float("inf")


# --------------------------------------------------------------------------- shares (profilers)
@contextlib.contextmanager
def quiet_fd2():
    """Silence the C++ profiler's own start/stop lines on stderr (file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _share(prof, part: str, whole: str) -> float:
    """Median over forwards of (time in `part` ranges inside the forward) / (the forward's time)."""
    events = prof.events()
    wholes = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == whole)
    parts = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == part)
    shares = []
    for start, end in wholes:
        inside = sum(pe - ps for ps, pe in parts if ps >= start and pe <= end)
        if end > start:
            shares.append(inside / (end - start))
    return statistics.median(shares) if shares else float("nan")


def module_share(module, args: tuple, runs: int, is_part) -> float:
    """CPU time inside the submodules for which `is_part(m)` holds / the whole forward (torch.profiler)."""
    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    stack: list = []
    handles = []
    for m in module.modules():
        if is_part(m):
            def pre(mod, inp):
                rf = record_function("bench::part")
                rf.__enter__()
                stack.append(rf)

            def post(mod, inp, out):
                stack.pop().__exit__(None, None, None)

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            module(*args)
            with quiet_fd2(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    with record_function("bench::forward"):
                        module(*args)
    finally:
        for h in handles:
            h.remove()
    return _share(prof, "bench::part", "bench::forward")


def graph_share(gm, args: tuple, runs: int, targets: set) -> float:
    """The same share for an fx graph: time inside its call_function nodes whose target is in `targets`."""
    import copy

    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    def wrap(target):
        def profiled(*a, **k):
            with record_function("bench::part"):
                return target(*a, **k)
        return profiled

    g = copy.deepcopy(gm)
    for n in g.graph.nodes:
        if n.op == "call_function" and n.target in targets:
            n.target = wrap(n.target)
    g.recompile()
    with torch.inference_mode():
        g(*args)
        with quiet_fd2(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                with record_function("bench::forward"):
                    g(*args)
    return _share(prof, "bench::part", "bench::forward")


def ort_share(path: Path, feed_fn, runs: int, session_options, is_part) -> float:
    """Node time of the nodes for which `is_part(node_name, op_type)` holds / all node time, per run
    (onnxruntime's profiler; median over runs). `feed_fn(session)` runs the session once."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), sess_options=session_options, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        feed_fn(sess)
    prof_file = sess.end_profiling()
    events = json.loads(Path(prof_file).read_text())
    Path(prof_file).unlink(missing_ok=True)
    runs_ = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    nodes = []
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            op_type = (e.get("args") or {}).get("op_name", "")
            nodes.append((e["ts"], e.get("dur", 0), is_part(name[: -len("_kernel_time")], op_type)))
    shares = []
    for start, end in runs_[3:]:  # the first 3 runs are warm-up
        inside = [(d, part) for ts, d, part in nodes if start <= ts <= end]
        total = sum(d for d, _ in inside)
        if total:
            shares.append(sum(d for d, part in inside if part) / total)
    return statistics.median(shares) if shares else float("nan")
