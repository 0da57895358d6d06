"""std.fixed_norm (sink below token indexing, fold into the next linears, fold into the previous
linear) on the UnifiedNorm zoo models and on toys; ONNX export of the folded model; and the
approximate LayerNorm -> BN-style fixed norm (std.ln_to_bn) with its measured error and gates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normc.api as nc
from normc.api import load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir.graph import get_param, op_name
from normc.nn import UnifiedNorm
from normc.pipeline import RunOptions, compile_model

REPO = Path(__file__).resolve().parents[2]
UN_FOLD = REPO / "examples" / "un_fold.nc"
LN_TO_BN = REPO / "examples" / "ln_to_bn.nc"
NORM_OPS = {"LayerNormalization", "BatchNormalization", "RMSNormalization", "GroupNormalization",
            "InstanceNormalization", "SimplifiedLayerNormalization"}

FIXED = load_rules(text="pipeline {\n  apply std.fixed_norm\n  verify rel 1e-5\n}")


def loaded(module: nn.Module, x: torch.Tensor, name: str = "toy") -> LoadedModel:
    return LoadedModel(module.eval(), (x,), {}, [InputSpec.from_example("x", x)], name, False)


def max_rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref.double() - got.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def applied(result) -> dict[str, int]:
    return {r["name"]: r["applied"] for r in result.report["rules"]}


def _randomize_un(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, UnifiedNorm):
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 1.5 + 0.5)
    return m.eval()  # eval refreshes the folded scale / shift


# ------------------------------------------------------------------ zoo:un-vit, zoo:un-gpt
@pytest.fixture(scope="module")
def un_folded():
    program = nc.load_rules(UN_FOLD)
    out = {}
    for name in ("un-vit", "un-gpt"):
        lm = nc.load(program, f"zoo:{name}")
        out[name] = (lm, compile_model(program, lm, RunOptions(write=False)))
    return out


@pytest.mark.parametrize("name", ["un-vit", "un-gpt"])
def test_un_fold_removes_every_fixed_norm_exactly(un_folded, name):
    lm, result = un_folded[name]
    assert result.passed, result.report["verify"]
    assert result.report["verify"]["max_rel_err"] <= 1e-5
    before, after = result.report["graph"]["before"]["op_counts"], result.report["graph"]["after"]["op_counts"]
    assert before.get("fixed_norm", 0) >= 5
    assert after.get("fixed_norm", 0) == 0
    assert after.get("linear") == before.get("linear")  # folded, no linear added or lost
    assert sum(applied(result).values()) >= before["fixed_norm"]
    with torch.no_grad():
        ref = lm.module(*lm.example_args)
        got = result.graph_module(*lm.example_args)
    assert max_rel(ref, got) <= 1e-5


def test_un_vit_sinks_the_final_norm_below_the_cls_index(un_folded):
    _, result = un_folded["un-vit"]
    counts = applied(result)
    assert counts["std.sink_fixed_norm"] == 1
    assert counts["std.fold_fixed_norm_next"] == result.report["graph"]["before"]["op_counts"]["fixed_norm"]


def _onnx_counts(program_text_or_path, lm, path):
    from normc.backends.onnx_backend import onnx_op_counts
    result = nc.apply(program_text_or_path, lm, path)
    assert result.passed, result.report["verify"]
    assert Path(path).is_file()
    assert result.report["onnx_check"][0]["passed"]
    return onnx_op_counts(path)


@pytest.mark.parametrize("name", ["un-vit", pytest.param("un-gpt", marks=pytest.mark.slow)])
def test_folded_onnx_has_no_norm_and_fewer_mul_add(un_folded, name, tmp_path):
    lm, _ = un_folded[name]
    folded = _onnx_counts(nc.load_rules(UN_FOLD), lm, tmp_path / "folded.onnx")
    plain = _onnx_counts(load_rules(text="pipeline {\n  verify rel 1e-5\n}"), lm, tmp_path / "plain.onnx")
    assert not NORM_OPS & set(folded), folded
    mul_add = lambda c: c.get("Mul", 0) + c.get("Add", 0)  # noqa: E731
    assert mul_add(folded) < mul_add(plain), (folded, plain)
    assert folded.get("Mul", 0) < plain.get("Mul", 0)


# ------------------------------------------------------------------ toys
class PostNorm(nn.Module):
    """linear -> UnifiedNorm (post-norm) -> residual add: the norm can only fold backwards."""

    def __init__(self, d=12):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.un = UnifiedNorm(d)

    def forward(self, x):
        return F.gelu(x + self.un(self.lin(x)))


def test_fold_fixed_norm_prev_into_the_linear_before():
    m = _randomize_un(PostNorm(), seed=1)
    x = torch.randn(2, 5, 12)
    result = compile_model(FIXED, loaded(m, x), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    counts = applied(result)
    assert counts["std.fold_fixed_norm_prev"] == 1 and counts["std.fold_fixed_norm_next"] == 0
    assert result.report["graph"]["after"].get("op_counts", {}).get("fixed_norm", 0) == 0
    gm = result.graph_module
    (lin,) = [n for n in gm.graph.nodes if op_name(n, gm) == "linear"]
    a, c = m.un.scale.double(), m.un.shift.double()
    torch.testing.assert_close(get_param(gm, lin.args[1]).double(), a[:, None] * m.lin.weight.double(),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(get_param(gm, lin.args[2]).double(), a * m.lin.bias.double() + c,
                               rtol=1e-6, atol=1e-7)
    x2 = torch.randn(3, 12)
    with torch.no_grad():
        assert max_rel(m(x2), gm(x2)) <= 1e-5


def test_fold_fixed_norm_prev_refuses_a_linear_with_two_users():
    class TwoUsers(PostNorm):
        def forward(self, x):
            y = self.lin(x)
            return self.un(y) + y

    m = _randomize_un(TwoUsers(), seed=2)
    x = torch.randn(2, 12)
    result = compile_model(FIXED, loaded(m, x), RunOptions(write=False))
    assert result.passed
    assert result.report["graph"]["after"]["op_counts"].get("fixed_norm") == 1
    rule = next(r for r in result.report["rules"] if r["name"] == "std.fold_fixed_norm_prev")
    assert rule["applied"] == 0
    assert any("single_use" in s["reason"] or "user" in s["reason"] for s in rule["skipped"]), rule


class ClsHead(nn.Module):
    """tokens -> UnifiedNorm -> h[:, 0] -> linear (a ViT-style CLS head)."""

    def __init__(self, d=12, index="cls"):
        super().__init__()
        self.un = UnifiedNorm(d)
        self.head = nn.Linear(d if index == "cls" else 4, 3)
        self.index = index

    def forward(self, x):
        h = self.un(x)
        h = h[:, 0] if self.index == "cls" else h[..., :4]
        return self.head(h)


def test_sink_below_cls_index_then_fold():
    m = _randomize_un(ClsHead(), seed=3)
    x = torch.randn(2, 6, 12)
    result = compile_model(FIXED, loaded(m, x), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    counts = applied(result)
    assert counts["std.sink_fixed_norm"] == 1 and counts["std.fold_fixed_norm_next"] == 1
    assert result.report["graph"]["after"]["op_counts"].get("fixed_norm", 0) == 0
    x2 = torch.randn(2, 6, 12)
    with torch.no_grad():
        assert max_rel(m(x2), result.graph_module(x2)) <= 1e-5


def test_sink_refuses_an_index_that_cuts_the_channels():
    m = _randomize_un(ClsHead(index="slice"), seed=4)
    x = torch.randn(2, 6, 12)
    result = compile_model(FIXED, loaded(m, x), RunOptions(write=False))
    assert result.passed
    assert result.report["graph"]["after"]["op_counts"].get("fixed_norm") == 1
    sink = next(r for r in result.report["rules"] if r["name"] == "std.sink_fixed_norm")
    assert sink["applied"] == 0
    assert any("last dim" in s["reason"] for s in sink["skipped"]), sink


# ------------------------------------------------------------------ LN -> BN (approximate)
@pytest.fixture(scope="module")
def vit():
    return nc.load(nc.load_rules(LN_TO_BN), "zoo:vit")


@pytest.fixture(scope="module")
def ln_to_bn_result(vit):
    return compile_model(nc.load_rules(LN_TO_BN), vit, RunOptions(write=False))


def test_ln_to_bn_reports_its_error_and_passes_its_gate(ln_to_bn_result):
    r = ln_to_bn_result.report
    assert ln_to_bn_result.passed, r["verify"]
    step = next(s for s in r["steps"] if s["step"] == "apply std.ln_to_bn")
    assert step["approximate"] is True
    assert step["verify"]["max_rel_err"] > 0
    assert "verify_calibration" in step and step["verify_calibration"]["max_rel_err"] > 0
    assert r["verify"]["max_rel_err"] > 0 and r["verify"]["max_rel_err"] <= 1.0
    ln_rule = next(x for x in r["rules"] if x["name"] == "std.ln_to_bn")
    assert ln_rule["kind"] == "approximate" and ln_rule["applied"] == r["graph"]["before"]["op_counts"]["layer_norm"]
    assert "layer_norm" not in r["graph"]["after"]["op_counts"]
    # the exact fold after it is verified against the model as it was before the fold
    fold = next(s for s in r["steps"] if s["step"] == "apply std.fixed_norm")
    assert fold["verify"]["passed"] and fold["verify"]["max_rel_err"] <= 1e-5
    assert r["graph"]["after"]["op_counts"].get("fixed_norm", 0) < r["graph"]["before"]["op_counts"]["layer_norm"]


def test_ln_to_bn_gate_below_the_measured_error_fails(vit, ln_to_bn_result):
    measured = ln_to_bn_result.report["verify"]["max_rel_err"]
    assert measured > 0.01
    text = LN_TO_BN.read_text().replace("verify approx max_rel 1.0", "verify approx max_rel 0.01")
    assert "max_rel 0.01" in text
    result = compile_model(load_rules(text=text), vit, RunOptions(write=False))
    assert not result.passed
    failure = result.report["verify"]["failure"]
    assert "approx max_rel 0.01" in failure and "exceeds" in failure


class PreLN(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(self.ln(x))


@pytest.fixture(scope="module")
def pre_ln():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = PreLN()
    x = torch.randn(2, 5, 16)
    return loaded(m, x, "pre_ln")


def test_approximate_rule_without_gate_fails_asking_for_one(pre_ln):
    text = """
pipeline {
  calibrate from "random" samples 8
  apply std.ln_to_bn
  verify rel 1e-5
}"""
    result = compile_model(load_rules(text=text), pre_ln, RunOptions(write=False))
    assert not result.passed
    assert "verify approx max_rel" in result.report["verify"]["failure"]
    step = next(s for s in result.report["steps"] if s["step"] == "apply std.ln_to_bn")
    assert step["approximate"] and step["verify"]["max_rel_err"] > 1e-3


@pytest.mark.parametrize("text", [
    'pipeline {\n  calibrate from "random" samples 8\n  apply std.ln_to_bn\n}',
    'pipeline {\n  verify rel 1e-5\n  calibrate from "random" samples 8\n  apply std.ln_to_bn\n}',
], ids=["no_verify_step", "verify_before_the_approximation"])
def test_ungated_approximation_fails_however_the_pipeline_is_written(pre_ln, text):
    result = compile_model(load_rules(text=text), pre_ln, RunOptions(write=False))
    assert result.report["rules"][0]["applied"] == 1
    assert not result.passed
    assert "verify approx max_rel" in (result.report["verify"]["failure"] or "")
