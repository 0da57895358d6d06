"""Timing shared by the benchmarks: contiguous blocks, medians taken by the caller."""
from __future__ import annotations

import time


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
