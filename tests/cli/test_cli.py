"""The `normc` command end to end: apply/check on a user factory and the zoo, located .nc errors, safety."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from normc.cli import main
from normc.frontend import ZOO, load_model
from tests.fixtures.wrong_rules import fold_without_mean

REPO = Path(__file__).resolve().parents[2]
BN_FOLD = REPO / "examples" / "bn_fold.nc"
FACTORY = REPO / "tests" / "fixtures" / "cnn_factory.py"
FACTORY_MODEL = f"{FACTORY}:build"

WRONG_FOLD = fold_without_mean() + """
pipeline {
  apply fold_wrong on "bn1"    # one broken site keeps the failure's bisection short
  export torch to "EXPORT_PATH"
}
"""


def cli(*args):
    """Run `normc ARGS` in-process; returns click's Result (exit_code, stdout, stderr, output)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def no_traceback(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def max_rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_pt2_matches(path: Path, module: torch.nn.Module, x: torch.Tensor, tol: float = 1e-5):
    program = torch.export.load(str(path))
    with torch.no_grad():
        ref, got = module(x), program.module()(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert ref.shape == got.shape
    assert max_rel(ref, got) <= tol


def site_path(record: dict) -> str:
    return record["site"].split(" (")[0]


# ------------------------------------------------------------------ the user factory (acceptance 1)
@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("factory")
    out, report = out_dir / "OUT.pt2", out_dir / "r.json"
    result = cli("apply", BN_FOLD, FACTORY_MODEL, "-o", out, "--report", report)
    return result, out, json.loads(report.read_text()) if report.exists() else None


@pytest.fixture(scope="module")
def factory():
    import importlib.util
    spec = importlib.util.spec_from_file_location("cnn_factory_under_test", FACTORY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_factory_apply_exits_0(factory_run):
    result, out, report = factory_run
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert out.is_file() and report is not None
    assert report["verify"]["passed"] is True
    assert str(out) in result.output  # "wrote OUT.pt2"


def test_factory_report_folds_exactly_the_foldable_sites(factory_run, factory):
    _, _, report = factory_run
    rules = {r["name"]: r for r in report["rules"]}
    assert set(rules) == {"std.fold_bn_conv", "std.fold_bn_conv_transpose", "std.fold_bn_linear"}
    assert rules["std.fold_bn_conv_transpose"]["applied"] == 0
    conv, linear = rules["std.fold_bn_conv"], rules["std.fold_bn_linear"]
    assert conv["applied"] == len(factory.FOLDED_CONV) == 4
    assert sorted(site_path(s) for s in conv["sites"]) == sorted(factory.FOLDED_CONV)
    assert linear["applied"] == len(factory.FOLDED_LINEAR) == 1
    assert [site_path(s) for s in linear["sites"]] == list(factory.FOLDED_LINEAR)
    before, after = report["graph"]["before"]["op_counts"], report["graph"]["after"]["op_counts"]
    assert before["batch_norm"] == 9 and after["batch_norm"] == 4
    assert before["conv"] == after["conv"] == 7 and before["linear"] == after["linear"] == 2


def test_factory_report_skips_fan_out_and_shared_weight_with_reasons(factory_run, factory):
    _, _, report = factory_run
    skipped = {site_path(s): s["reason"] for r in report["rules"] for s in r["skipped"]}
    assert set(skipped) == set(factory.SKIPPED_FAN_OUT) | set(factory.SKIPPED_SHARED)
    for site in factory.SKIPPED_FAN_OUT:
        assert "2 users" in skipped[site] and "fan" in skipped[site]
    for site in factory.SKIPPED_SHARED:
        assert "shared" in skipped[site] and "shared.weight" in skipped[site]
    conv = next(r for r in report["rules"] if r["name"] == "std.fold_bn_conv")
    assert len(conv["skipped"]) == 4


def test_factory_verify_within_tolerance(factory_run):
    _, _, report = factory_run
    v = report["verify"]
    assert v["max_rel_err"] <= 1e-5 and v["min_cosine"] > 0.99999
    assert v["n_inputs"] >= 2 and v["tolerance"]["max_rel"] == 1e-5


def test_factory_output_loads_and_matches_original_on_a_fresh_input(factory_run, factory):
    _, out, _ = factory_run
    module, _ = factory.build()
    fresh = torch.randn(*factory.INPUT_SHAPE, generator=torch.Generator().manual_seed(1234))
    assert_pt2_matches(out, module, fresh)
    # the exported program no longer has the folded batch norms
    program = torch.export.load(str(out))
    bn = [n for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    assert len(bn) == 4


def test_factory_is_deterministic(factory):
    (m1, x1), (m2, x2) = factory.build(), factory.build()
    assert torch.equal(x1, x2)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    state = torch.random.get_rng_state()
    factory.build()
    assert torch.equal(state, torch.random.get_rng_state())


# ------------------------------------------------------------------ the zoo (acceptance 2)
def _zoo_apply(tmp_path, name):
    out, report = tmp_path / "out.pt2", tmp_path / "r.json"
    result = cli("apply", BN_FOLD, f"zoo:{name}", "-o", out, "--report", report)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())


def test_zoo_cnn_bn_fold(tmp_path):
    out, r = _zoo_apply(tmp_path, "cnn")
    assert r["graph"]["before"]["op_counts"]["batch_norm"] == 6
    assert r["graph"]["after"]["op_counts"].get("batch_norm", 0) == 0
    assert r["verify"]["passed"] and r["verify"]["max_rel_err"] <= 1e-5
    assert sum(rule["applied"] for rule in r["rules"]) == 6
    loaded = load_model("zoo:cnn")
    fresh = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    assert_pt2_matches(out, loaded.module, fresh)


@pytest.mark.slow
def test_zoo_resnet18_bn_fold(tmp_path):
    out, r = _zoo_apply(tmp_path, "resnet18")
    assert r["graph"]["before"]["op_counts"]["batch_norm"] == 20
    assert r["graph"]["after"]["op_counts"].get("batch_norm", 0) == 0
    assert r["verify"]["passed"] and r["verify"]["max_rel_err"] <= 1e-5
    loaded = load_model("zoo:resnet18")
    fresh = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    program = torch.export.load(str(out))
    with torch.no_grad():
        ref, got = loaded.module(fresh), program.module()(fresh)
    ref_t, got_t = ref.last_hidden_state, got[0] if isinstance(got, (tuple, list)) else got
    if not isinstance(got_t, torch.Tensor):
        got_t = got_t["last_hidden_state"] if isinstance(got_t, dict) else got_t.last_hidden_state
    assert max_rel(ref_t, got_t) <= 1e-5


# ------------------------------------------------------------------ malformed .nc files (acceptance 3)
MALFORMED = {
    # name: (source, line, offending token, message fragment, hint fragment)
    "bad_token": ("rule r {\n  match y = relu(x) $\n  rewrite y = relu(x)\n}\n", 2, "$",
                  "unexpected character `$`", None),
    "unknown_op": ("use std.bn\nrule r {\n  match c = conv(x, w, b?)\n        y = batch_nrom(c, m?, v?, g?, be?)\n"
                   "  rewrite y = conv(x, w, b)\n}\n", 4, "batch_nrom", "unknown op `batch_nrom`",
                   "did you mean `batch_norm`?"),
    "wrong_arity": ("rule r {\n  match y = relu(x, z, q)\n  rewrite y = relu(x)\n}\n", 2, "relu",
                    "`relu` takes at most 1", None),
    "unbound_name": ("rule r {\n  match c = conv(x, w, b?)\n        y = batch_norm(c, mean, var, gamma, beta, eps = eps)\n"
                     "  let s = gama / sqrt(var + eps)\n  rewrite y = conv(x, w * bcast(s, w, 0), b)\n}\n", 4, "gama",
                     "`gama` is not bound", "did you mean `gamma`?"),
    "type_error": ("rule r {\n  match y = relu(x)\n  where 3\n  rewrite y = relu(x)\n}\n", 3, "3",
                   "the `where` clause is not a condition", None),
    "unknown_rule": ("use std.bn\n\npipeline {\n  apply std.fold_bn_cnv\n}\n", 4, "apply std.fold_bn_cnv",
                     "unknown rule `std.fold_bn_cnv`", "did you mean `std.fold_bn_conv`?"),
}


def check_located(text: str, path: Path, source: str, line: int, token: str, message: str, hint: str | None):
    src_line = source.splitlines()[line - 1]
    column = src_line.index(token) + 1
    assert f"{path}:{line}:{column}: error: {message}" in text
    lines = text.splitlines()
    shown = next(i for i, l in enumerate(lines[:-1]) if l.endswith(src_line) and "^" in lines[i + 1])
    caret = lines[shown + 1]
    assert set(caret.strip()) == {"^"}
    offset = len(lines[shown]) - len(src_line)  # the gutter before the source line
    assert caret.index("^") == offset + column - 1
    assert len(caret.strip()) == len(token)
    if hint:
        assert hint in text
    assert "Traceback" not in text


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_rules_exit_2_with_located_error(tmp_path, name):
    source, line, token, message, hint = MALFORMED[name]
    path = tmp_path / f"{name}.nc"
    path.write_text(source)
    out = tmp_path / "out.pt2"
    result = cli("apply", path, "zoo:cnn", "-o", out)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    check_located(result.stderr, path, source, line, token, message, hint)
    assert result.stdout == ""
    assert not out.exists()


def test_malformed_rules_through_the_real_command(tmp_path):
    source, line, token, message, hint = MALFORMED["unknown_op"]
    path = tmp_path / "bad.nc"
    path.write_text(source)
    proc = subprocess.run([sys.executable, "-m", "normc.cli", "apply", str(path), "zoo:cnn"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    check_located(proc.stderr, path, source, line, token, message, hint)
    assert "Traceback" not in proc.stdout


def test_missing_rules_file_exits_2(tmp_path):
    result = cli("apply", tmp_path / "nope.nc", "zoo:cnn")
    no_traceback(result)
    assert result.exit_code == 2
    assert "cannot read rules file" in result.stderr


# ------------------------------------------------------------------ pickles are refused (acceptance 4)
class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickled_module_is_refused_without_running_it(tmp_path):
    # the payload is live: unpickling it for real creates its marker
    canary, canary_marker = tmp_path / "canary.pt", tmp_path / "canary_ran"
    torch.save(_Evil(canary_marker), canary)
    torch.load(canary, weights_only=False)
    assert canary_marker.exists()

    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save(_Evil(marker), evil)
    out = tmp_path / "out.pt2"
    result = cli("apply", BN_FOLD, evil, "-o", out)
    no_traceback(result)
    assert result.exit_code == 2, result.output
    assert not marker.exists()
    assert "--allow-pickle" in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------ passes, zoo, check (acceptance 6)
def test_passes_lists_std_rules_with_docs():
    from normc.grammar.loader import load_std
    result = cli("passes")
    assert result.exit_code == 0
    std = load_std()
    assert "std.bn" in result.output and "std.recognize" in result.output
    for name, rule in std.rules.items():
        line = next(l for l in result.output.splitlines()
                    if l.startswith("  ") and l.split()[0].split("(")[0] == name)  # rules are indented under groups
        assert rule.doc in line and f"[{rule.kind}]" in line


def test_passes_ops_lists_canonical_ops():
    result = cli("passes", "--ops")
    assert result.exit_code == 0
    assert "batch_norm(x, mean?, var?, weight?, bias?" in result.output
    assert "conv2d  = conv with a 4-d weight" in result.output


def test_zoo_lists_models():
    result = cli("zoo")
    assert result.exit_code == 0
    for name, entry in ZOO.items():
        assert f"zoo:{name}" in result.output
    assert "resnet18" in result.output and "cnn" in result.output


def test_check_passes_with_the_correct_rules(tmp_path):
    report = tmp_path / "r.json"
    result = cli("check", BN_FOLD, FACTORY_MODEL, "--report", report, "--samples", "2")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())
    assert r["verify"]["passed"] and r["outputs"] == []


def test_check_fails_on_a_wrong_rule_and_writes_nothing(tmp_path):
    exported = tmp_path / "should_not_exist.pt2"
    rules = tmp_path / "wrong.nc"
    rules.write_text(WRONG_FOLD.replace("EXPORT_PATH", str(exported)))
    report = tmp_path / "r.json"
    result = cli("check", rules, FACTORY_MODEL, "--report", report, "--samples", "2")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert "nothing was written" in result.output
    r = json.loads(report.read_text())
    assert r["verify"]["passed"] is False and "fold_wrong" in r["verify"]["failure"]
    assert r["rules"][0]["applied"] == 1
    assert not exported.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "wrong.nc"]


def test_apply_with_a_wrong_rule_exits_1_and_writes_no_output(tmp_path):
    exported = tmp_path / "pipeline_export.pt2"
    rules = tmp_path / "wrong.nc"
    rules.write_text(WRONG_FOLD.replace("EXPORT_PATH", str(exported)))
    out = tmp_path / "OUT.pt2"
    result = cli("apply", rules, FACTORY_MODEL, "-o", out, "--samples", "2")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert not out.exists() and not exported.exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("wrong.nc",)]


def test_export_without_rules_writes_a_verified_onnx(tmp_path):
    from click.testing import CliRunner

    from normc.backends.onnx_backend import onnx_op_counts
    from normc.cli import main
    out = tmp_path / "cnn.onnx"
    result = CliRunner().invoke(main, ["export", "zoo:cnn", "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert out.is_file() and onnx_op_counts(out).get("Conv", 0) >= 4
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rules"] == [] and report["onnx_check"][0]["passed"]
