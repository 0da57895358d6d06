"""normc.verify.sites: `verify dtype f64` checks each exact site (Pre-RMSNorm: each block) in float64 on the
boundary values of the fp32 run, whatever the model casts to elsewhere; a wrong rule is caught and named per
site; a check that covered no site fails."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normc.api as nc
from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir.rewrite import apply_rule
from normc.pipeline import RunOptions, compile_model
from normc.pipeline.runner import prepare_graph
from normc.verify.sites import SiteChecker
from tests.fixtures.wrong_rules import fold_without_mean

FOLD_F64 = "pipeline {\n  apply std.fold_norm_affine\n  verify rel 1e-5\n  verify dtype f64\n}"


class UpcastRMSNorm(nn.Module):
    """LLaMA / OLMo style: the norm computes in float32 whatever the model's dtype, then casts back."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = UpcastRMSNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h) * torch.sigmoid(self.k(h))


class Upcast(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _upcast_model() -> LoadedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = Upcast().eval()
        with torch.no_grad():
            for b in m.blocks:
                b.norm.weight.uniform_(0.5, 2.0)
        x = torch.randn(2, 5, 16)
    return LoadedModel(m, (x,), {}, [InputSpec.from_example("x", x)], "upcast", False)


def _f64(report) -> dict:
    return [s for s in report["steps"] if s["step"] == "verify"][-1]["verify"]


def _assert_exact_per_site(result, rule: str, n_sites: int):
    report = result.report
    assert result.passed, report["verify"]["failure"]
    f64 = _f64(report)
    assert f64["mode"] == "per-site float64" and f64["passed"]
    sites = f64["sites"]
    assert f64["sites_checked"] == len(sites) == n_sites
    assert all(s["rule"] == rule and s["max_rel_err"] <= 1e-12 and s["passed"] for s in sites), sites
    assert all(s["n_inputs"] == f64["n_inputs"] >= 2 for s in sites)
    assert not report["warnings"], report["warnings"]


def test_upcasting_norm_checks_every_site_in_float64():
    result = compile_model(load_rules(text=FOLD_F64), _upcast_model(), RunOptions(write=False, verify_inputs=2))
    rules = {r["name"]: r for r in result.report["rules"]}
    assert rules["std.fold_rms_norm_affine"]["applied"] == 2
    _assert_exact_per_site(result, "std.fold_rms_norm_affine", 2)
    assert {s["path"] for s in _f64(result.report)["sites"]} == {"blocks.0.norm", "blocks.1.norm"}


@pytest.mark.slow
def test_tiny_llama_checks_every_site_in_float64():
    from tests.archs.test_matrix import loaded
    result = compile_model(load_rules(text=FOLD_F64), loaded("llama"), RunOptions(write=False, verify_inputs=2))
    n = result.report["graph"]["before"]["op_counts"]["rms_norm"]
    _assert_exact_per_site(result, "std.fold_rms_norm_affine", n)


def test_prenorm_checks_every_block_in_float64():
    program = nc.load_rules(text="pipeline {\n  apply std.prenorm_to_rmsnorm\n  verify rel 1e-4\n  verify dtype f64\n}")
    result = compile_model(program, nc.load(program, "zoo:gpt2"), RunOptions(write=False, verify_inputs=2))
    n_ln = result.report["graph"]["before"]["op_counts"]["layer_norm"]
    _assert_exact_per_site(result, "std.prenorm_to_rmsnorm", n_ln)  # one block per value its LayerNorms read


@pytest.fixture(scope="module")
def cnn_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("sites")


def _cnn_run(folder, lib: str, main: str, **opts):
    (folder / "lib.nc").write_text(lib)
    (folder / "main.nc").write_text(main)
    program = nc.load_rules(folder / "main.nc")
    return compile_model(program, nc.load(program, "zoo:cnn"), RunOptions(write=False, **opts))


def test_planted_wrong_rule_is_caught_and_named_per_site(cnn_folder):
    # the fp32 gate is loose enough to let the wrong fold through: only the float64 check catches it
    main = ('use "lib.nc" as lib\npipeline {\n  apply lib.fold_wrong\n  apply std.fold_bn_conv\n'
            '  verify rel 1.0\n  verify dtype f64\n}\n')
    result = _cnn_run(cnn_folder, fold_without_mean("bn1"), main)
    report = result.report
    assert not result.passed
    f64 = _f64(report)
    bad = [s for s in f64["sites"] if not s["passed"]]
    assert [(s["rule"], s["path"]) for s in bad] == [("lib.fold_wrong", "bn1")]
    assert bad[0]["max_rel_err"] > 1e-3
    assert all(s["max_rel_err"] <= 1e-12 for s in f64["sites"] if s["rule"] == "std.fold_bn_conv")
    assert "lib.fold_wrong at bn1" in report["verify"]["failure"]
    assert [(c["rule"], c["site"].split(" (")[0]) for c in report["culprits"]] == [("lib.fold_wrong", "bn1")]


def test_wrong_rule_below_fp32_rounding_is_caught_in_float64(cnn_folder):
    # a fold off by 1e-9 relative passes any fp32 check; the float64 check sees it at its own site
    lib = fold_without_mean().replace("w * bcast(s, w, 0)", "w * bcast(s * 1.000000001, w, 0)") \
        .replace("(b ?? 0) * s + (beta ?? 0)", "((b ?? 0) - mean) * s + (beta ?? 0)")
    main = 'use "lib.nc" as lib\npipeline {\n  apply lib.fold_wrong\n  verify rel 1e-5\n  verify dtype f64\n}\n'
    result = _cnn_run(cnn_folder, lib, main)
    steps = result.report["steps"]
    assert steps[0]["verify"]["passed"]  # fp32
    f64 = _f64(result.report)
    assert not result.passed and not f64["passed"] and f64["sites_checked"] >= 4
    assert all(1e-11 < s["max_rel_err"] < 1e-7 and not s["passed"] for s in f64["sites"]), f64["sites"]


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ (self.w * 2)


def test_f64_check_of_no_site_is_a_failure(monkeypatch):
    # a pass that rewrites the model but records no site for the float64 check (std.fold_constants
    # stripped of its observer): the float64 check covers nothing, and that is no pass
    from normc.passes import constants
    fold = constants.fold_constants

    def silent_fold(gm, *, ctx=None, scope=None, loaded=None, dry_run=False):
        return fold(gm, ctx=ctx, scope=scope, loaded=loaded, dry_run=dry_run)
    from normc.passes import registry  # `impl` resolves through the registry of declared passes
    monkeypatch.setitem(registry._PASSES, "normc.passes.constants:fold_constants", silent_fold)
    program = load_rules(text="pipeline {\n  apply std.fold_constants\n  verify rel 1e-5\n  verify dtype f64\n}")
    x = torch.randn(3, 4)
    result = compile_model(program, LoadedModel(Scaled().eval(), (x,), {}, [InputSpec.from_example("x", x)], "s", False),
                           RunOptions(write=False, verify_inputs=1))
    assert result.report["rules"][0]["applied"] == 1 and result.report["steps"][1]["verify"]["passed"]  # fp32
    assert not result.passed
    f64 = _f64(result.report)
    assert f64["sites_checked"] == 0 and not f64["passed"]
    assert "checked no site" in result.report["verify"]["failure"]
    assert "does not record its sites" in f64["sites"][0]["reason"]


def test_folded_constants_are_checked_per_site():
    program = load_rules(text="pipeline {\n  apply std.fold_constants\n  verify rel 1e-5\n  verify dtype f64\n}")
    x = torch.randn(3, 4)
    result = compile_model(program, LoadedModel(Scaled().eval(), (x,), {}, [InputSpec.from_example("x", x)], "s", False),
                           RunOptions(write=False, verify_inputs=1))
    _assert_exact_per_site(result, "std.fold_constants", 1)


def test_crms_checks_every_block_in_float64():
    program = nc.load_rules(text="pipeline {\n  apply std.prenorm_to_crmsnorm\n  verify rel 1e-4\n  verify dtype f64\n}")
    result = compile_model(program, nc.load(program, "zoo:gpt2"), RunOptions(write=False, verify_inputs=2))
    assert result.passed, result.report["verify"]["failure"]
    sites = _f64(result.report)["sites"]
    rules = {s["rule"] for s in sites}
    assert rules == {"std.prenorm_to_crmsnorm", "std.compress_crms_readers"}, rules
    assert all(s["max_rel_err"] <= 1e-12 for s in sites), sites


def test_f64_check_after_no_rewrite_claims_nothing():
    program = load_rules(text="pipeline {\n  apply std.fold_bn_conv\n  verify dtype f64\n}")
    result = compile_model(program, _upcast_model(), RunOptions(write=False))
    assert result.passed  # the model is unchanged
    step = result.report["steps"][-1]
    assert step["step"] == "verify" and "verify" not in step and "nothing to check" in step["note"]


def test_checker_references_weights_and_keeps_no_activation_of_its_own():
    """The recorded sites hold the graph's own parameter tensors (no copy) until the step's check."""
    lm = nc.load(nc.load_rules(text="pipeline {\n  apply std.fold_bn_conv\n}"), "zoo:cnn")
    gm, _ = prepare_graph(lm)
    before = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
    checker = SiteChecker([(tuple(lm.example_args), dict(lm.example_kwargs))])
    rep = apply_rule(gm, load_rules(text="").rules["std.fold_bn_conv"], observer=checker)
    assert rep.applied >= 2 and len(checker.cases) == rep.applied
    held = [t for c in checker.cases for t in c.original.params.values() if isinstance(t, torch.Tensor)]
    assert held and all(id(t) in before for t in held)
    results = checker.check(gm)
    assert len(results) == rep.applied and all(r.max_rel_err <= 1e-12 for r in results)
    assert checker.cases == [] and checker.exact == {}  # released after the check


def test_run_shares_the_models_weights_and_leaves_the_model_untouched():
    """No copy of the weights for the graph or for verification: the tensors a run did not rewrite are the
    model's own, and the model (modules and tensors) is exactly as it was."""
    program = nc.load_rules(text="pipeline {\n  apply std.fold_bn_conv\n  verify dtype f64\n}")
    lm = nc.load(program, "zoo:cnn")
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    keys = {v.untyped_storage().data_ptr() for v in lm.module.state_dict().values() if v.numel()}
    result = compile_model(program, lm, RunOptions(write=False))
    assert result.passed, result.report["verify"]["failure"]
    after = lm.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    gm = result.graph_module
    shared = [t for t in gm.parameters() if t.untyped_storage().data_ptr() in keys]
    assert shared, "the graph holds copies of the model's weights"
