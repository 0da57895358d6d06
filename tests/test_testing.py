"""normc.testing: assert_equivalent and assert_rewrite_verifies, on passing and failing paths."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from normc import api
from normc.errors import NormcError
from normc.grammar.diagnostics import NcError
from normc.testing import assert_equivalent, assert_rewrite_verifies, format_outputs, normalize_inputs
from tests.fixtures.wrong_rules import fold_without_beta

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

FOLD = "pipeline {\n  apply std.fold_bn_conv\n  verify rel 1e-5\n}\n"

# BatchNorm folding that forgets beta: it matches, applies, and changes the function.
WRONG = fold_without_beta() + """
pipeline {
  apply fold_wrong
  verify rel 1e-5
}
"""


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.bias.normal_()
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Scaled(nn.Module):
    def forward(self, x, scale=None):
        return x * (1.0 if scale is None else scale)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return ConvBN().eval()


X = torch.randn(2, 3, 8, 8)


# --------------------------------------------------------------------------- inputs
def test_normalize_inputs_forms():
    x, y = torch.zeros(1), torch.ones(1)
    assert normalize_inputs(x) == [((x,), {})]
    assert normalize_inputs((x, y)) == [((x, y), {})]
    assert normalize_inputs({"x": x}) == [((), {"x": x})]
    assert normalize_inputs(((x,), {"s": y})) == [((x,), {"s": y})]
    assert normalize_inputs([x, (x, y), ((x,), {"s": y})]) == [((x,), {}), ((x, y), {}), ((x,), {"s": y})]
    with pytest.raises(ValueError):
        normalize_inputs([])
    with pytest.raises(TypeError):
        normalize_inputs("x")


# --------------------------------------------------------------------------- assert_equivalent
def test_equivalent_models_pass(model):
    res = assert_equivalent(model, model, [X, (X,), {"x": X}])
    assert res.passed and res.n_inputs == 3
    assert_equivalent(Scaled(), lambda x, scale=None: x * scale, ((X,), {"scale": torch.tensor(2.0)}))
    assert_equivalent(model, lambda x: model(x) + 1e-9, X, rtol=None, atol=1e-6)


def test_a_different_model_fails_with_a_table(model):
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, lambda x: model(x) * 1.001, X, rtol=1e-5)
    msg = str(info.value)
    assert "not equivalent" in msg
    assert "output" in msg and "max_rel" in msg and "FAIL" in msg
    assert "tolerance rel 1e-05" in msg


def test_structure_change_and_crash_are_assertion_errors(model):
    with pytest.raises(AssertionError, match="output structure differs"):
        assert_equivalent(model, lambda x: (model(x), model(x)), X)
    with pytest.raises(AssertionError, match="failed on verification input 0"):
        assert_equivalent(model, lambda x: x[7], X)


def test_a_broken_reference_is_not_an_assertion(model):
    with pytest.raises(NormcError) as info:
        assert_equivalent(model, model, torch.randn(2, 5))  # wrong channel count for the reference
    assert not isinstance(info.value, AssertionError)
    assert "reference model failed" in str(info.value)


def test_format_outputs_aligns_columns():
    text = format_outputs([{"name": "logits", "shape": [2, 10], "dtype": "float32", "max_abs": 1e-8,
                            "max_rel": "inf", "cosine": 1.0, "passed": False, "note": "shape changed"}])
    header, row = text.splitlines()
    assert header.split()[:3] == ["output", "shape", "dtype"]
    assert "inf" in row and "FAIL (shape changed)" in row


# --------------------------------------------------------------------------- assert_rewrite_verifies
def test_rewrite_verifies_on_a_module(model):
    result = assert_rewrite_verifies(FOLD, model, example_inputs=X, samples=1)
    assert result.passed
    assert result.report["rules"][0]["applied"] == 1


def test_rewrite_verifies_from_a_path_and_a_program(model, tmp_path):
    path = tmp_path / "fold.nc"
    path.write_text(FOLD)
    assert_rewrite_verifies(str(path), model, example_inputs=(X,), samples=1)
    assert_rewrite_verifies(path, model, example_inputs=X, samples=1)
    assert_rewrite_verifies(api.load_rules(text=FOLD), model, example_inputs=X, samples=1)


def test_rewrite_verifies_on_a_model_source():
    assert_rewrite_verifies(EXAMPLES / "bn_fold.nc", "zoo:cnn", samples=1)


def test_inputs_from_the_rules_declarations(model):
    text = "input x: f32[2, 3, 8, 8]\n" + FOLD
    assert_rewrite_verifies(text, model, samples=1)


def test_a_wrong_rule_fails_naming_the_rule_and_step(model):
    with pytest.raises(AssertionError) as info:
        assert_rewrite_verifies(WRONG, model, example_inputs=X, samples=1)
    msg = str(info.value)
    assert "rewrite does not verify on ConvBN" in msg
    assert "failing step: `apply fold_wrong`" in msg
    assert "fold_wrong applied at 1 site(s): bn (batch_norm)" in msg
    assert "FAIL" in msg and "max_rel" in msg


def test_nothing_applied_is_a_failure_unless_allowed(model):
    text = "pipeline {\n  apply std.fold_bn_linear\n}\n"
    with pytest.raises(AssertionError) as info:
        assert_rewrite_verifies(text, model, example_inputs=X, samples=1)
    assert "no rule applied anywhere" in str(info.value)
    assert "near misses" in str(info.value) and "is conv, not linear" in str(info.value)
    assert assert_rewrite_verifies(text, model, example_inputs=X, samples=1, require_applied=False).passed


def test_rules_without_a_pipeline_say_so(model):
    with pytest.raises(AssertionError, match="applies no rules"):
        assert_rewrite_verifies("rule r {\n  match y = relu(x)\n  rewrite y = relu(x)\n}\n", model,
                                example_inputs=X, samples=1)


def test_a_syntax_error_keeps_its_located_error(model):
    with pytest.raises(NcError) as info:
        assert_rewrite_verifies("pipeline {\n  aply std.bn\n}\n", model, example_inputs=X)
    assert "<string>:2" in str(info.value)


def test_the_callers_module_is_not_touched():
    torch.manual_seed(0)
    m = ConvBN().train()
    assert_rewrite_verifies(FOLD, m, example_inputs=X, samples=1)
    assert m.training  # verified on an eval copy; the caller's module keeps its mode


def test_a_module_needs_example_inputs(model):
    with pytest.raises(TypeError, match="example_inputs"):
        assert_rewrite_verifies(FOLD, model)
