import copy
import json
import math

import pytest
import torch
from torch import nn

from normc.errors import EXIT_VERIFY_FAILED, NormcError, VerificationFailed
from normc.verify import (
    Tolerance,
    cast_inputs,
    compare_outputs,
    flatten_outputs,
    sample_inputs,
    verify_models,
)


# ----------------------------------------------------------------------------- metrics
def test_known_difference_gives_exact_numbers():
    ref = torch.tensor([1.0, -2.0, 4.0])
    new = torch.tensor([1.0, -2.0, 4.5])
    (d,) = compare_outputs(ref, new, Tolerance(max_rel=1e-5))
    assert d.name == "output"
    assert d.shape == (3,)
    assert d.dtype == "float32"
    assert d.max_abs == 0.5
    assert d.max_rel == 0.5 / 4.0  # relative to the largest reference magnitude
    expected_cos = (1 + 4 + 18) / (math.sqrt(1 + 4 + 16) * math.sqrt(1 + 4 + 20.25))
    assert d.cosine == pytest.approx(expected_cos, abs=1e-15)
    assert not d.passed


def test_tolerance_bounds_abs_and_rel():
    ref = torch.tensor([10.0, 0.0])
    new = torch.tensor([10.0, 1e-3])
    (d,) = compare_outputs(ref, new, Tolerance(max_rel=5e-5))
    assert d.max_rel == pytest.approx(1e-4, rel=1e-6) and not d.passed
    assert compare_outputs(ref, new, Tolerance(max_rel=2e-4))[0].passed
    assert not compare_outputs(ref, new, Tolerance(max_abs=1e-4, max_rel=1.0))[0].passed
    assert compare_outputs(ref, new, Tolerance())[0].passed  # nothing checked


def test_errors_computed_in_float64():
    ref = torch.full((4,), 1.0, dtype=torch.float64)
    new = ref + 1e-12
    (d,) = compare_outputs(ref, new, Tolerance.default_for(torch.float64))
    assert d.max_abs == pytest.approx(1e-12, rel=1e-3)
    assert d.passed  # 1e-12 < 1e-10


def test_zero_outputs_cosine():
    z = torch.zeros(3)
    (d,) = compare_outputs(z, z.clone(), Tolerance(max_rel=1e-5))
    assert d.cosine == 1.0 and d.max_rel == 0.0 and d.passed
    (d,) = compare_outputs(z, torch.ones(3), Tolerance(max_abs=10.0))
    assert d.cosine == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_candidate_fails(bad):
    ref = torch.tensor([1.0, 2.0, 3.0])
    new = ref.clone()
    new[1] = bad
    (d,) = compare_outputs(ref, new, Tolerance(max_abs=1e9, max_rel=1e9))
    assert not d.passed
    assert d.max_abs == math.inf and d.max_rel == math.inf
    assert "non-finite" in d.note


def test_matching_nonfinite_in_both_is_equal():
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    (d,) = compare_outputs(ref, ref.clone(), Tolerance(max_rel=1e-5))
    assert d.passed and d.max_abs == 0.0
    new = ref.clone()
    new[2] = -math.inf
    assert not compare_outputs(ref, new, Tolerance(max_rel=1e-5))[0].passed


def test_integer_outputs_compared_exactly():
    ref = torch.tensor([1, 2, 3])
    assert compare_outputs(ref, ref.clone(), Tolerance(max_rel=1.0))[0].passed
    (d,) = compare_outputs(ref, torch.tensor([1, 2, 4]), Tolerance(max_abs=5.0, max_rel=5.0))
    assert not d.passed and d.max_abs == 1.0


def test_shape_change_fails():
    (d,) = compare_outputs(torch.zeros(2, 3), torch.zeros(3, 2), Tolerance(max_rel=1.0))
    assert not d.passed and "shape" in d.note


def test_structure_mismatch_raises():
    with pytest.raises(NormcError, match="output structure differs"):
        compare_outputs((torch.ones(1), torch.ones(1)), (torch.ones(1),), Tolerance())
    with pytest.raises(NormcError, match="output structure differs"):
        compare_outputs({"a": torch.ones(1)}, {"b": torch.ones(1)}, Tolerance())


# ----------------------------------------------------------------------------- flattening
def test_flatten_names_and_order():
    out = {"logits": torch.ones(1), "aux": (torch.zeros(1), [torch.ones(2), 3, None]), "n": None}
    names = [n for n, _ in flatten_outputs(out)]
    assert names == ["logits", "aux[0]", "aux[1][0]"]
    assert [n for n, _ in flatten_outputs((torch.ones(1), torch.ones(1)))] == ["[0]", "[1]"]
    assert [n for n, _ in flatten_outputs(torch.ones(1))] == ["output"]


def test_flatten_hf_model_output():
    mo = pytest.importorskip("transformers.modeling_outputs")
    out = mo.BaseModelOutputWithPooling(last_hidden_state=torch.ones(2, 3), pooler_output=torch.zeros(2))
    assert [n for n, _ in flatten_outputs(out)] == ["last_hidden_state", "pooler_output"]


# ----------------------------------------------------------------------------- tolerances
def test_default_tolerances():
    assert Tolerance.default_for(torch.float64) == Tolerance(max_abs=None, max_rel=1e-10)
    assert Tolerance.default_for(torch.float32) == Tolerance(max_abs=None, max_rel=1e-5)
    assert Tolerance.default_for(torch.float16) == Tolerance(max_abs=None, max_rel=1e-2)
    assert Tolerance.default_for(torch.bfloat16) == Tolerance(max_abs=None, max_rel=1e-2)


# ----------------------------------------------------------------------------- models
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x, scale=None):
        h = torch.relu(self.fc1(x))
        if scale is not None:
            h = h * scale
        return {"logits": self.fc2(h), "hidden": h}


class Spec:
    def __init__(self, shape, dtype=torch.float32):
        self.shape, self.dtype = shape, dtype

    def sample(self, g):
        return torch.randn(self.shape, generator=g, dtype=self.dtype)


def test_verify_models_pass_and_fail():
    torch.manual_seed(0)
    ref = Tiny().eval()
    inputs = sample_inputs([Spec((2, 8))], n=3)
    res = verify_models(ref, copy.deepcopy(ref), inputs)
    assert res.passed and res.max_abs_err == 0.0 and res.min_cosine == pytest.approx(1.0)
    assert res.n_inputs == 3 and res.tolerance == Tolerance(max_rel=1e-5)
    assert [o.name for o in res.outputs] == ["logits", "hidden"]

    bad = copy.deepcopy(ref)
    with torch.no_grad():
        bad.fc2.bias += 1e-2
    res = verify_models(ref, bad, inputs)
    assert not res.passed
    by_name = {o.name: o for o in res.outputs}
    assert by_name["hidden"].passed and not by_name["logits"].passed
    assert by_name["logits"].max_abs == pytest.approx(1e-2, rel=1e-3)
    json.dumps(res.to_dict(), allow_nan=False)  # JSON-ready


def test_verify_models_kwargs_and_float64_default():
    ref = Tiny().double().eval()
    inputs = [((torch.randn(2, 8, dtype=torch.float64),), {"scale": torch.tensor(2.0, dtype=torch.float64)})]
    res = verify_models(ref, copy.deepcopy(ref), inputs)
    assert res.passed and res.tolerance.max_rel == 1e-10


def test_verify_nan_candidate_result_is_json_safe():
    ref = Tiny().eval()

    class Broken(nn.Module):
        def forward(self, x):
            out = ref(x)
            return {"logits": out["logits"] * float("nan"), "hidden": out["hidden"]}

    res = verify_models(ref, Broken(), [((torch.randn(1, 8),), {})])
    assert not res.passed and res.max_abs_err == math.inf
    d = res.to_dict()
    assert d["max_abs_err"] == "inf"
    json.dumps(d, allow_nan=False)


def test_verify_models_crashing_models():
    class Crash(nn.Module):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\nmore detail")

    inputs = [((torch.randn(1, 8),), {})]
    with pytest.raises(VerificationFailed, match="rewritten model failed on verification input 0") as info:
        verify_models(Tiny(), Crash(), inputs)
    assert info.value.exit_code == EXIT_VERIFY_FAILED and "\n" not in info.value.message
    with pytest.raises(NormcError, match="reference model failed"):
        verify_models(Crash(), Tiny(), inputs)


def test_verify_models_needs_inputs():
    with pytest.raises(NormcError):
        verify_models(Tiny(), Tiny(), [])


# ----------------------------------------------------------------------------- inputs
def test_sample_inputs_deterministic():
    specs = [Spec((2, 3)), Spec((4,))]
    a = sample_inputs(specs, n=3, seed=7)
    b = sample_inputs(specs, n=3, seed=7)
    c = sample_inputs(specs, n=3, seed=8)
    assert len(a) == 3 and all(len(args) == 2 and kw == {} for args, kw in a)
    for (xa, _), (xb, _) in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not torch.equal(a[0][0][0], c[0][0][0])
    assert not torch.equal(a[0][0][0], a[1][0][0])  # samples differ from one another
    assert torch.equal(sample_inputs(specs, n=1, seed=7)[0][0][0], a[0][0][0])  # prefix-stable


def test_sample_inputs_mapping_gives_kwargs():
    (args, kwargs), = sample_inputs({"x": Spec((2,))}, n=1)
    assert args == () and set(kwargs) == {"x"}


def test_cast_inputs():
    inputs = [((torch.ones(2), torch.tensor([1, 2])), {"m": [torch.zeros(1)]})]
    ((x, ids), kw), = cast_inputs(inputs, torch.float64)
    assert x.dtype == torch.float64 and ids.dtype == torch.int64 and kw["m"][0].dtype == torch.float64
    assert inputs[0][0][0].dtype == torch.float32  # original untouched
