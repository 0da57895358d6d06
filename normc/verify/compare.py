"""Numeric equivalence of two models (or of a model and an exported artifact).

Every metric is computed in float64 on CPU:

* ``max_abs``  = max |a - b|
* ``max_rel``  = max |a - b| / max(max |a|, tiny)   (error relative to the output's
  largest magnitude, so a 4e-6 difference on outputs of size 100 reads as 4e-8)
* ``cosine``   = cosine similarity of the flattened outputs

``a`` is always the reference. Non-finite values: positions where both sides hold the
same non-finite value (both NaN, or the same infinity) are equal; any other position
where either side is non-finite makes the errors infinite and the output fail.
Integer and boolean outputs must match exactly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils import _pytree as pytree

from normc.errors import NormcError, VerificationFailed
from normc.report.progress import track

_TINY = 1e-30


# --------------------------------------------------------------------------- tolerance
@dataclass
class Tolerance:
    max_abs: float | None = None  # absolute bound (None = not checked)
    max_rel: float | None = None  # bound on max|a-b| / max|a|

    @staticmethod
    def default_for(dtype: torch.dtype) -> "Tolerance":
        if dtype == torch.float64:
            return Tolerance(max_rel=1e-10)
        if dtype in (torch.float16, torch.bfloat16):
            return Tolerance(max_rel=1e-2)
        return Tolerance(max_rel=1e-5)

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel}

    def __str__(self) -> str:
        parts = []
        if self.max_abs is not None:
            parts.append(f"max_abs {self.max_abs:g}")
        if self.max_rel is not None:
            parts.append(f"rel {self.max_rel:g}")
        return " ".join(parts) or "none"


# --------------------------------------------------------------------------- results
def _json_float(x: float) -> float | str:
    """Strict-JSON friendly float: non-finite values become the strings 'inf', '-inf', 'nan'."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass
class OutputDiff:
    name: str  # pytree path of the output leaf, e.g. "logits", "[0]"
    shape: tuple
    dtype: str
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool
    note: str = ""  # why it failed when the numbers alone do not say (shape, non-finite, ...)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine),
            "passed": bool(self.passed),
            **({"note": self.note} if self.note else {}),
        }


@dataclass
class VerifyResult:
    passed: bool
    max_abs_err: float
    max_rel_err: float
    min_cosine: float
    n_inputs: int
    tolerance: Tolerance
    outputs: list[OutputDiff] = field(default_factory=list)  # worst over inputs, per output leaf
    sites: list | None = None  # a per-site float64 check (normc.verify.sites.SiteResult): one per site, no outputs

    def to_dict(self) -> dict:
        d = {
            "passed": bool(self.passed),
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "min_cosine": _json_float(self.min_cosine),
            "n_inputs": int(self.n_inputs),
            "tolerance": self.tolerance.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
        }
        if self.sites is not None:
            d["mode"] = "per-site float64"
            d["sites_checked"] = sum(1 for s in self.sites if s.reason is None)
            d["sites"] = [s.to_dict(self.tolerance) for s in self.sites]
        return d

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        if self.sites is not None:
            checked = [s for s in self.sites if s.reason is None]
            if not checked:
                return (f"per-site float64 check FAILED: it checked no site ({len(self.sites)} could not be checked); "
                        "a float64 check that covers nothing proves nothing")
            bad = [s for s in self.sites if not s.passed(self.tolerance)]
            named = "; ".join(f"{s.rule} at {s.site}: " + (s.reason or f"rel {s.max_rel_err:.3g}") for s in bad[:5])
            return (f"per-site float64 check {verdict}: worst max_rel {self.max_rel_err:.3g} over {len(checked)} site(s) "
                    f"and {self.n_inputs} input(s) (tolerance {self.tolerance})" + (f"; failing: {named}" if bad else ""))
        return (
            f"verify {verdict}: max_abs {self.max_abs_err:.3g}, max_rel {self.max_rel_err:.3g}, "
            f"min cosine {self.min_cosine:.9f} over {self.n_inputs} input(s) (tolerance {self.tolerance})"
        )


# --------------------------------------------------------------------------- flattening
def _key_name(entry: Any) -> tuple[str, bool]:
    """(text, is_index) for one pytree key entry."""
    if isinstance(entry, pytree.SequenceKey):
        return f"[{entry.idx}]", True
    if isinstance(entry, pytree.MappingKey):
        return str(entry.key), False
    if isinstance(entry, pytree.GetAttrKey):
        return str(entry.name), False
    return str(entry), False


def _path_name(path: Sequence[Any], prefix: str = "") -> str:
    name = prefix
    for entry in path:
        text, is_index = _key_name(entry)
        if is_index or not name:
            name += text
        else:
            name += "." + text
    return name


def _flatten(obj: Any, prefix: str, out: list[tuple[str, torch.Tensor]]) -> None:
    try:
        leaves = pytree.tree_flatten_with_path(obj)[0]
    except Exception:  # a registered node without key support: fall back to plain flatten
        leaves = [((pytree.SequenceKey(i),), leaf) for i, leaf in enumerate(pytree.tree_leaves(obj))]
    for path, leaf in leaves:
        name = _path_name(path, prefix)
        if isinstance(leaf, torch.Tensor):
            out.append((name or "output", leaf))
        elif isinstance(leaf, dict) and leaf is not obj:  # e.g. an unregistered Mapping subclass
            _flatten(dict(leaf), name, out)
        elif hasattr(leaf, "to_tuple") and hasattr(leaf, "keys") and leaf is not obj:  # HF ModelOutput
            _flatten({k: leaf[k] for k in leaf.keys()}, name, out)
        # other leaves (None, ints, strings, ...) are not outputs we compare


def flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of a model output with readable names, in torch pytree order.

    The order is the one ``torch.export`` (and therefore the ONNX exporter) uses for
    graph outputs, so the i-th leaf here is the i-th output of an exported graph.
    """
    leaves: list[tuple[str, torch.Tensor]] = []
    _flatten(out, "", leaves)
    return leaves


# --------------------------------------------------------------------------- metrics
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _within(tol: Tolerance, max_abs: float, max_rel: float) -> bool:
    if tol.max_abs is not None and not max_abs <= tol.max_abs:
        return False
    if tol.max_rel is not None and not max_rel <= tol.max_rel:
        return False
    return True


def diff_tensors(name: str, ref: torch.Tensor, new: torch.Tensor, tol: Tolerance) -> OutputDiff:
    """Compare one output leaf (reference ``ref`` vs candidate ``new``)."""
    dtype = _dtype_name(ref.dtype)
    if new.dtype != ref.dtype:
        dtype = f"{dtype} vs {_dtype_name(new.dtype)}"
    shape = tuple(ref.shape)
    if tuple(new.shape) != shape:
        return OutputDiff(name, shape, dtype, math.inf, math.inf, math.nan, False,
                          note=f"shape {shape} became {tuple(new.shape)}")

    a = ref.detach().to("cpu", torch.float64).reshape(-1)
    b = new.detach().to("cpu", torch.float64).reshape(-1)
    exact = not (ref.is_floating_point() or ref.is_complex())

    if bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()):  # the usual case: no masks, no copies
        af, bf, n_bad = a, b, 0
    else:
        finite = torch.isfinite(a) & torch.isfinite(b)
        same_nonfinite = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & torch.isinf(b) & (a == b))
        n_bad = int((~finite & ~same_nonfinite).sum())
        af, bf = a[finite], b[finite]
    if af.numel():
        err = (af - bf).abs()
        max_abs = float(err.max())
        scale = max(float(af.abs().max()), _TINY)
        max_rel = max_abs / scale
        na, nb = float(af.norm()), float(bf.norm())
        if na == 0.0 and nb == 0.0:
            cosine = 1.0
        elif na == 0.0 or nb == 0.0:
            cosine = 0.0
        else:
            cosine = float(torch.dot(af, bf)) / (na * nb)
            cosine = max(-1.0, min(1.0, cosine))
    else:
        max_abs, max_rel, cosine = 0.0, 0.0, 1.0

    if max_abs == 0.0 and not n_bad:
        cosine = 1.0  # identical: no rounding noise in the report
    note = ""
    if n_bad:
        max_abs, max_rel = math.inf, math.inf
        n_new = int((~torch.isfinite(b) & torch.isfinite(a)).sum())
        note = (f"{n_new} non-finite value(s) where the reference is finite" if n_new
                else f"{n_bad} position(s) where the reference is non-finite and the candidate differs")
        passed = False
    elif exact:
        passed = max_abs == 0.0
        if not passed:
            note = "integer output differs"
    else:
        passed = _within(tol, max_abs, max_rel)
    return OutputDiff(name, shape, dtype, max_abs, max_rel, cosine, passed, note)


def compare_leaves(
    ref_leaves: Sequence[tuple[str, torch.Tensor]],
    new_leaves: Sequence[tuple[str, torch.Tensor]],
    tol: Tolerance,
    *,
    match_names: bool = True,
) -> list[OutputDiff]:
    """Compare two lists of named leaves position by position."""
    if len(ref_leaves) != len(new_leaves):
        raise NormcError(
            f"output structure differs: the reference has {len(ref_leaves)} tensor output(s) "
            f"({_names(ref_leaves)}), the candidate {len(new_leaves)} ({_names(new_leaves)})",
            hint="a rewrite must keep the model's outputs; check the rules that touch output nodes",
        )
    diffs = []
    for (rname, r), (nname, n) in zip(ref_leaves, new_leaves):
        if match_names and rname != nname:
            raise NormcError(
                f"output structure differs: reference output '{rname}' is '{nname}' in the candidate",
                hint="a rewrite must keep the model's outputs; check the rules that touch output nodes",
            )
        diffs.append(diff_tensors(rname, r, n, tol))
    return diffs


def _names(leaves: Sequence[tuple[str, Any]], limit: int = 6) -> str:
    names = [n for n, _ in leaves[:limit]]
    return ", ".join(names) + (", ..." if len(leaves) > limit else "")


def compare_outputs(ref: Any, new: Any, tol: Tolerance) -> list[OutputDiff]:
    """Compare two raw model outputs leaf by leaf; a different structure is a NormcError."""
    return compare_leaves(flatten_outputs(ref), flatten_outputs(new), tol)


# --------------------------------------------------------------------------- aggregation
def merge_worst(per_input: Iterable[list[OutputDiff]]) -> list[OutputDiff]:
    """Per output leaf, the worst numbers over all inputs."""
    worst: list[OutputDiff] | None = None
    for diffs in per_input:
        if worst is None:
            worst = [OutputDiff(**d.__dict__) for d in diffs]
            continue
        for w, d in zip(worst, diffs):
            w.max_abs = _nanmax(w.max_abs, d.max_abs)
            w.max_rel = _nanmax(w.max_rel, d.max_rel)
            w.cosine = _nanmin(w.cosine, d.cosine)
            if w.passed and not d.passed:
                w.note = d.note
            w.passed = w.passed and d.passed
    return worst or []


def _nanmax(x: float, y: float) -> float:
    """Maximum where NaN (undefined) counts as the worst value."""
    if math.isnan(x) or math.isnan(y):
        return math.nan
    return max(x, y)


def _nanmin(x: float, y: float) -> float:
    """Minimum where NaN (undefined cosine) counts as the worst value."""
    if math.isnan(x) or math.isnan(y):
        return math.nan
    return min(x, y)


def summarize(outputs: list[OutputDiff], n_inputs: int, tol: Tolerance) -> VerifyResult:
    if outputs:
        max_abs = functools.reduce(_nanmax, (o.max_abs for o in outputs))
        max_rel = functools.reduce(_nanmax, (o.max_rel for o in outputs))
        min_cos = _reduce_min(o.cosine for o in outputs)
    else:
        max_abs, max_rel, min_cos = 0.0, 0.0, 1.0
    return VerifyResult(
        passed=all(o.passed for o in outputs),
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        min_cosine=min_cos,
        n_inputs=n_inputs,
        tolerance=tol,
        outputs=outputs,
    )


def _reduce_min(values: Iterable[float]) -> float:
    out = math.inf
    for v in values:
        out = _nanmin(out, v)
    return out if out != math.inf else 1.0


def first_floating_dtype(leaves: Sequence[tuple[str, torch.Tensor]]) -> torch.dtype:
    for _, t in leaves:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# --------------------------------------------------------------------------- models
def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _clone_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh copies, so a model that writes into its inputs cannot affect the other run."""
    clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
    return pytree.tree_map(clone, tuple(args)), pytree.tree_map(clone, dict(kwargs or {}))


def run_model(model: Callable, args: tuple, kwargs: dict) -> Any:
    a, k = _clone_inputs(args, kwargs)
    with torch.no_grad():
        return model(*a, **k)


class CachedReference:
    """A reference model whose outputs are computed once per input object.

    A pipeline verifies the same inputs after every step (and bisection re-verifies them many
    times); the original model's outputs do not change, so they are kept. Entries are matched
    by the identity of the (args, kwargs) objects, which the cache holds on to.
    """

    def __init__(self, model: Callable):
        self.model = model
        self._outputs: list[tuple[tuple, dict, Any]] = []

    def outputs(self, args: tuple, kwargs: dict) -> Any:
        for a, k, out in self._outputs:
            if a is args and k is kwargs:
                return out
        out = run_model(self.model, args, kwargs)
        self._outputs.append((args, kwargs, out))
        return out


def verify_models(
    reference: Callable,
    candidate: Callable,
    inputs: list[tuple[tuple, dict]],
    tol: Tolerance | None = None,
) -> VerifyResult:
    """Run both models on every (args, kwargs) and compare every output leaf.

    ``tol`` None: ``Tolerance.default_for`` the dtype of the reference's first floating output.
    """
    if not inputs:
        raise NormcError("no inputs to verify with", hint="declare an `input` shape or pass calibration data")
    per_input: list[list[OutputDiff]] = []
    for i, (args, kwargs) in enumerate(track(inputs, "verifying", len(inputs))):
        try:
            ref_out = reference.outputs(args, kwargs) if isinstance(reference, CachedReference) \
                else run_model(reference, args, kwargs)
        except Exception as exc:
            raise NormcError(
                f"the reference model failed on verification input {i}: {type(exc).__name__}: {_first_line(exc)}",
                hint="check the declared input shapes and dtypes against the model's forward",
            ) from exc
        try:
            new_out = run_model(candidate, args, kwargs)
        except Exception as exc:
            raise VerificationFailed(
                f"the rewritten model failed on verification input {i}: {type(exc).__name__}: {_first_line(exc)}",
                hint="a rewrite produced a graph that does not run; check the rules applied last",
            ) from exc
        ref_leaves = flatten_outputs(ref_out)
        new_leaves = flatten_outputs(new_out)
        if tol is None:
            tol = Tolerance.default_for(first_floating_dtype(ref_leaves))
        per_input.append(compare_leaves(ref_leaves, new_leaves, tol))
    return summarize(merge_worst(per_input), len(inputs), tol)


def nonfinite_reference(reference: Callable, inputs: list[tuple[tuple, dict]]) -> str | None:
    """None when the original model's outputs are finite on every input, else what is not.

    A comparison against NaN or Inf proves nothing (NaN == NaN counts as agreement), so a
    reference that is not finite must fail verification unless the user allows it.
    """
    for i, (args, kwargs) in enumerate(inputs):
        try:
            out = reference.outputs(args, kwargs) if isinstance(reference, CachedReference) \
                else run_model(reference, args, kwargs)
        except Exception:  # noqa: BLE001 - verify_models reports the failure with its message
            return None
        for name, leaf in flatten_outputs(out):
            if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex()):
                bad = int((~torch.isfinite(leaf)).sum())
                if bad:
                    nan = int(torch.isnan(leaf).sum())
                    return (f"the original model's output `{name}` is not finite on verification input {i} "
                            f"({nan} NaN, {bad - nan} Inf of {leaf.numel()} values): comparing against it proves nothing")
    return None
