"""A large elementwise new parameter (`w * s` on a vocabulary-sized head) is computed in float64 a block
of rows at a time, so its temporaries stay bounded: the numbers are the same as evaluating it whole, the
per-site float64 check still sees the exact value, and a wrong rule is still caught."""
from __future__ import annotations

import torch

from normc.api import load_rules
from normc.ir import rewrite
from normc.pipeline import RunOptions, compile_model
from tests.verify.test_sites import _assert_exact_per_site, _upcast_model

SMOOTH_FOLD = """pipeline {
  calibrate from "random" samples 4
  apply std.smooth_rms
  apply std.fold_norm_affine
  verify rel 1e-5
  verify dtype f64
}"""


def _run(text: str, monkeypatch, block_bytes: int | None):
    calls = []
    if block_bytes is not None:
        monkeypatch.setattr(rewrite, "ROW_BLOCK_BYTES", block_bytes)
    original = rewrite._Planner.eval_in_row_blocks

    def counting(self, *args):
        value = original(self, *args)
        calls.append(value is not None)
        return value
    monkeypatch.setattr(rewrite._Planner, "eval_in_row_blocks", counting)
    result = compile_model(load_rules(text=text), _upcast_model(), RunOptions(write=False, verify_inputs=2))
    monkeypatch.undo()
    return result, sum(calls)


def _params(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.graph_module.state_dict().items()}


def test_row_blocks_give_the_same_parameters_bit_for_bit(monkeypatch):
    whole, blocked_whole = _run(SMOOTH_FOLD, monkeypatch, None)
    rows, blocked = _run(SMOOTH_FOLD, monkeypatch, 3 * 16 * 8)  # three 16-wide float64 rows per block
    assert blocked_whole == 0 and blocked >= 4  # each linear's `w * s` and `w * g` went by rows
    a, b = _params(whole), _params(rows)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_row_blocks_keep_the_float64_check_exact(monkeypatch):
    text = "pipeline {\n  apply std.fold_norm_affine\n  verify rel 1e-5\n  verify dtype f64\n}"
    result, blocked = _run(text, monkeypatch, 2 * 16 * 8)
    assert blocked >= 3
    _assert_exact_per_site(result, "std.fold_rms_norm_affine", 2)


def test_row_blocks_still_catch_a_wrong_rule(monkeypatch, tmp_path):
    wrong = """rule fold_rms_slightly_wrong {
  exact
  match   h = rms_norm(x, g?, normalized_shape = ns)
          each u in users(h): y = linear(h, w, b?)
  where   has_affine(h) and len(ns) == 1
  rewrite h = rms_norm(x)
          each u: y = linear(h, w * g * (1 + 1e-9), b)
}
pipeline {
  apply fold_rms_slightly_wrong
  verify rel 1e-5
  verify dtype f64 rel 1e-12
}"""
    result, blocked = _run(wrong, monkeypatch, 2 * 16 * 8)
    assert blocked >= 3
    assert not result.passed
    sites = [s for s in result.report["steps"] if s["step"] == "verify"][-1]["verify"]["sites"]
    assert sites and not any(s["passed"] for s in sites)
    assert all(1e-10 < s["max_rel_err"] < 1e-8 for s in sites), sites
