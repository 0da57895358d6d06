"""bench/_timing.py: rotated order, at least 5 rounds, and the warnings for ratios past their
physical limit or rounds that disagree (issue 13). No clocks are asserted on: the timings are
built by hand or only their order is checked."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _timing import Timing, limit_of, ratio_warnings, time_rotated


def test_order_rotates_every_round():
    calls = []
    fns = [lambda: calls.append("A"), lambda: calls.append("B")]
    time_rotated(fns, runs=1, warmup=0, rounds=5)
    assert "".join(calls) == "AB" "BA" "AB" "BA" "AB"
    calls.clear()
    time_rotated([*fns, lambda: calls.append("C")], runs=1, warmup=0, rounds=6)
    assert "".join(calls) == "ABC" "BCA" "CAB" "ABC" "BCA" "CAB"


def test_fewer_than_five_rounds_are_refused():
    with pytest.raises(SystemExit, match="at least 5 rounds"):
        time_rotated([lambda: None, lambda: None], runs=1, warmup=0, rounds=4)


def test_ratio_is_the_median_of_round_ratios():
    t = Timing(rounds=[[2.0, 2.0, 2.2, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.1]], medians=[2.0, 1.0])
    assert t.ratio() == 2.0 and t.ratios()[2] == pytest.approx(2.2)


def test_consistent_rounds_within_the_limit_give_no_warning():
    t = Timing(rounds=[[1.05, 1.06, 1.05, 1.07, 1.05], [1.0] * 5], medians=[1.05, 1.0])
    assert ratio_warnings("x", t, limit=limit_of(0.10)) == []


def test_ratio_past_the_physical_limit_warns():
    # the issue's case: eager A/B 17.4 while the norms' share allows at most 1.013
    t = Timing(rounds=[[17.4] * 5, [1.0] * 5], medians=[17.4, 1.0])
    (w,) = ratio_warnings("un-vit eager", t, limit=1.013)
    assert w.startswith("warning: un-vit eager: A/B = 17.400 exceeds its physical limit 1.013")


def test_disagreeing_rounds_warn():
    t = Timing(rounds=[[0.85, 1.37, 1.0, 1.1, 0.9], [1.0] * 5], medians=[1.0, 1.0])
    (w,) = ratio_warnings("prenorm", t)
    assert "rounds disagree by 52 %" in w and "0.850 to 1.370" in w


def test_limit_of_share():
    assert limit_of(0.5) == 2.0 and limit_of(float("nan")) == float("inf") and limit_of(1.0) == float("inf")
