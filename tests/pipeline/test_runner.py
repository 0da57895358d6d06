"""normc.pipeline.runner: per-step verification, bisection to the culprit rule and sites,
RunOptions(rollback=, strict=), nothing written after a failure, and the tolerance and dtype
replay of `verify` steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import normc.api as nc
from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.pipeline import RunOptions, compile_model
from tests.fixtures.wrong_rules import fold_without_mean

# A BN fold that forgets to subtract the running mean, scoped by glob to two sites (bn1, bn2 of
# zoo:cnn), next to a correct fold in the same rules file: `apply lib` runs both in one step.
LIB = fold_without_mean("bn[12]") + """
rule fold_right {
  doc "the correct fold"
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean, var, gamma, beta, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = gamma / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + beta)
}
"""

MAIN = """
use "lib.nc" as lib
pipeline {
  apply lib
  apply std.fold_bn_linear
  verify rel 1e-5
}
"""
WRONG_SITES = {"bn1", "bn2"}


def site_path(site: str) -> str:
    return site.split(" (")[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    (folder / "lib.nc").write_text(LIB)
    (folder / "main.nc").write_text(MAIN)
    program = nc.load_rules(folder / "main.nc")
    return program, nc.load(program, "zoo:cnn"), folder


@pytest.fixture(scope="module")
def failed(planted):
    program, lm, folder = planted
    out = folder / "never.safetensors"
    return compile_model(program, lm, RunOptions(output=out, write=True)), out


@pytest.fixture(scope="module")
def rolled(planted):
    program, lm, _ = planted
    return compile_model(program, lm, RunOptions(write=False, rollback=True))


def test_planted_wrong_rule_fails_and_bisection_names_exactly_its_sites(failed):
    result, _ = failed
    r = result.report
    assert not result.passed and not r["verify"]["passed"]
    culprits = r["culprits"]
    assert {c["rule"] for c in culprits} == {"lib.fold_wrong"}
    assert {site_path(c["site"]) for c in culprits} == WRONG_SITES
    assert len(culprits) == 2
    for c in culprits:
        assert isinstance(c["local_error"], float) and c["local_error"] > 1e-4
        assert c["key"]
    failure = r["verify"]["failure"]
    assert "apply lib" in failure and "lib.fold_wrong at bn1" in failure and "lib.fold_wrong at bn2" in failure
    assert "--rollback" in failure
    # the correct rule of the same step is not blamed, and the failed step is the last one run
    step = r["steps"][-1]
    assert step["step"] == "apply lib" and step["culprits"] == culprits and step["bisection_tests"] > 0
    assert step["verify"]["passed"] is False
    assert not r["rolled_back"]


def test_nothing_is_written_after_a_failure(failed):
    result, out = failed
    assert not out.exists()
    assert result.outputs == [] and result.report["outputs"] == []


def test_rollback_drops_the_culprit_sites_and_passes(rolled):
    r = rolled.report
    assert rolled.passed, r["verify"]
    assert {site_path(c["site"]) for c in r["rolled_back"]} == WRONG_SITES
    assert {c["rule"] for c in r["rolled_back"]} == {"lib.fold_wrong"}
    assert all(c["local_error"] > 0 for c in r["rolled_back"])
    wrong = next(x for x in r["rules"] if x["name"] == "lib.fold_wrong")
    assert wrong["applied"] == 0
    rolled_reasons = {site_path(s["site"]): s["reason"] for s in wrong["skipped"] if "rolled back" in s["reason"]}
    assert set(rolled_reasons) == WRONG_SITES
    assert r["verify"]["max_rel_err"] <= 1e-5
    # every step has its own verification record, and all passed after the rollback
    applies = [s for s in r["steps"] if s["step"].startswith("apply")]
    assert [s["step"] for s in applies] == ["apply lib", "apply std.fold_bn_linear"]
    assert all(s["verify"]["passed"] for s in applies)
    # the BN sites the wrong rule lost are still folded (by the correct rule of the same step)
    assert "batch_norm" not in r["graph"]["after"]["op_counts"]


def test_rollback_strict_still_fails(planted):
    program, lm, _ = planted
    result = compile_model(program, lm, RunOptions(write=False, rollback=True, strict=True))
    assert not result.passed
    failure = result.report["verify"]["failure"]
    assert failure.startswith("--strict") and "lib.fold_wrong at bn1" in failure
    assert {site_path(c["site"]) for c in result.report["rolled_back"]} == WRONG_SITES


def test_correct_pipeline_has_no_culprits(planted):
    _, lm, _ = planted
    result = compile_model(nc.load_rules(Path(__file__).resolve().parents[2] / "examples" / "bn_fold.nc"), lm,
                           RunOptions(write=False))
    assert result.passed
    assert result.report["culprits"] == [] and result.report["rolled_back"] == []


def test_failure_in_an_earlier_step_stops_the_pipeline(planted):
    """After a step that broke equivalence (no rollback), later steps are not run."""
    _, lm, folder = planted
    (folder / "two.nc").write_text('use "lib.nc" as lib\npipeline {\n  apply lib.fold_wrong\n'
                                   '  apply lib.fold_right\n  verify rel 1e-5\n}\n')
    result = compile_model(nc.load_rules(folder / "two.nc"), lm, RunOptions(write=False))
    assert not result.passed
    assert [s["step"] for s in result.report["steps"]] == ["apply lib.fold_wrong"]
    assert {site_path(c["site"]) for c in result.report["culprits"]} == WRONG_SITES


# ------------------------------------------------------------------ tolerance and dtype of verify steps
class PreLN(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return x + self.q(h) * self.k(h)


@pytest.fixture(scope="module")
def pre_ln():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = PreLN().eval()
        with torch.no_grad():
            m.ln.weight.uniform_(0.5, 1.5)
            m.ln.weight[2] = 20.0
            m.ln.bias.normal_(0, 0.3)
        x = torch.randn(2, 5, 16)
    return LoadedModel(m, (x,), {}, [InputSpec.from_example("x", x)], "pre_ln", False)


def test_step_uses_the_next_verify_tolerance(pre_ln):
    loose = compile_model(load_rules(text="pipeline {\n  apply std.fold_norm_affine\n  verify rel 1e-5\n}"), pre_ln,
                          RunOptions(write=False))
    assert loose.passed
    step = loose.report["steps"][0]
    assert step["verify"]["tolerance"]["max_rel"] == 1e-5


def test_f64_verify_tolerance_is_not_applied_to_the_fp32_step_check(pre_ln):
    result = compile_model(load_rules(text="pipeline {\n  apply std.fold_norm_affine\n  verify dtype f64 rel 1e-10\n}"),
                           pre_ln, RunOptions(write=False))
    assert result.report["culprits"] == [], result.report["verify"]["failure"]
    assert result.passed, result.report["verify"]["failure"]


def test_f64_replay_applies_calibrated_rules(pre_ln):
    text = """
rule smooth_off {
  doc "SmoothQuant with the linears' weights scaled 1e-6 too much: wrong far above f64 rounding"
  exact
  match   h = layer_norm(x, g?, beta?)
          each u in users(h): y = linear(h, w, b?)
  let     s = clamp(absmax(h), min = 1e-5) ** 0.5
  rewrite h = layer_norm(x, (g ?? 1) / s, (beta ?? 0) / s)
          each u: y = linear(h, w * s * 1.000001, b)
}
pipeline {
  calibrate from "random" samples 4
  apply smooth_off
  verify rel 1e-4
  verify dtype f64 rel 1e-10
}"""
    result = compile_model(load_rules(text=text), pre_ln, RunOptions(write=False))
    f64 = [s for s in result.report["steps"] if s["step"] == "verify"][-1]
    assert f64["verify"]["max_rel_err"] > 0, "the f64 replay did not apply the calibrated rule"
    assert not result.passed


def test_local_error_measures_the_sites_outputs_not_its_internal_values(pre_ln):
    text = """
rule smooth_off {
  doc "SmoothQuant with the linears' weights scaled 0.1% too much"
  exact
  match   h = layer_norm(x, g?, beta?)
          each u in users(h): y = linear(h, w, b?)
  let     s = clamp(absmax(h), min = 1e-5) ** 0.5
  rewrite h = layer_norm(x, (g ?? 1) / s, (beta ?? 0) / s)
          each u: y = linear(h, w * s * 1.001, b)
}
pipeline {
  calibrate from "random" samples 4
  apply smooth_off
  verify rel 1e-5
}"""
    result = compile_model(load_rules(text=text), pre_ln, RunOptions(write=False))
    assert not result.passed
    (culprit,) = result.report["culprits"]
    assert culprit["rule"] == "smooth_off"
    # the linears' outputs are off by ~0.1%; the whole model by ~0.2%
    assert culprit["local_error"] < 0.01, culprit


# ------------------------------------------------------------------ approximate steps and their gates
class LnLinear(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(self.ln(x))


@pytest.fixture(scope="module")
def ln_linear():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = LnLinear().eval()
    x = torch.randn(2, 5, 16)
    return LoadedModel(m, (x,), {}, [InputSpec.from_example("x", x)], "ln_linear", False)


def _approx(gate: str) -> str:
    return f'pipeline {{\n  calibrate from "random" samples 4\n  apply std.ln_to_bn\n  verify {gate}\n}}'


def test_approx_max_rel_gate(ln_linear):
    ok = compile_model(load_rules(text=_approx("approx max_rel 10")), ln_linear, RunOptions(write=False))
    assert ok.passed, ok.report["verify"]["failure"]
    err = ok.report["verify"]["max_rel_err"]
    assert err > 1e-3  # a real approximation
    step = next(s for s in ok.report["steps"] if s["step"] == "apply std.ln_to_bn")
    assert step["approximate"] and "verify_calibration" in step
    bad = compile_model(load_rules(text=_approx(f"approx max_rel {err / 2:.6g}")), ln_linear, RunOptions(write=False))
    assert not bad.passed and "exceeds the gate approx max_rel" in bad.report["verify"]["failure"]


@pytest.mark.parametrize("gate", ["approx max_abs 0.001", "approx cosine 0.99999"])
def test_every_accepted_approx_gate_is_enforced(ln_linear, gate):
    result = compile_model(load_rules(text=_approx(gate)), ln_linear, RunOptions(write=False))
    v = result.report["verify"]
    assert v["max_abs_err"] > 0.01 and v["min_cosine"] < 0.99999  # the gate is clearly exceeded
    assert not result.passed


def test_f64_replay_keeps_the_rolled_back_sites_out(tmp_path):
    # the float64 replay re-applies every step: the sites rolled back in the run must stay out,
    # or the replay would compare a model with the wrong fold in it
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "lib.nc").write_text(LIB)
    (folder / "main.nc").write_text(MAIN.replace("verify rel 1e-5", "verify rel 1e-5\n  verify dtype f64 rel 1e-10"))
    program = nc.load_rules(folder / "main.nc")
    result = compile_model(program, nc.load(program, "zoo:cnn"), RunOptions(write=False, rollback=True))
    assert result.passed, result.report["verify"]["failure"]
    assert {site_path(c["site"]) for c in result.report["rolled_back"]} == WRONG_SITES
    f64 = [s for s in result.report["steps"] if s["step"] == "verify"][-1]["verify"]
    assert f64["max_rel_err"] <= 1e-10
