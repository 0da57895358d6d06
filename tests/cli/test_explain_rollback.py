"""`normc explain` (why each site is refused), and `normc apply/check --rollback [--strict]` with
--report / --junit on a pipeline with one planted wrong rule."""
from __future__ import annotations

import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from normc.cli import main
from tests.fixtures.wrong_rules import fold_without_mean

REPO = Path(__file__).resolve().parents[2]
BN_FOLD = REPO / "examples" / "bn_fold.nc"
FACTORY = REPO / "tests" / "fixtures" / "cnn_factory.py"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def no_traceback(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def _factory_constants():
    spec = importlib.util.spec_from_file_location("cnn_factory_for_explain", FACTORY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def site_path(site: str) -> str:
    return site.split(" (")[0]


# ------------------------------------------------------------------ explain
@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    report = tmp_path_factory.mktemp("explain") / "r.json"
    result = cli("explain", BN_FOLD, f"{FACTORY}:build", "--report", report)
    return result, json.loads(report.read_text()) if report.exists() else None


def _marks(output: str) -> dict[str, tuple[str, str]]:
    """site path -> (mark, reason) from explain's `    ✓ path (node)[: reason]` lines."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^\s+([✓✗·])\s+(\S+) \([^)]*\)(?::\s*(.*))?$", line)
        if m:
            out[m.group(2)] = (m.group(1), m.group(3) or "")
    return out


def test_explain_names_the_reason_for_every_refused_site(explained):
    result, _ = explained
    no_traceback(result)
    assert result.exit_code == 0, result.output
    fx = _factory_constants()
    marks = _marks(result.output)
    for path in fx.FOLDED_CONV + fx.FOLDED_LINEAR:
        assert marks[path] == ("✓", ""), (path, result.output)
    for path in fx.SKIPPED_FAN_OUT:
        mark, reason = marks[path]
        assert mark == "✗" and "2 users" in reason and "fan" in reason, (path, reason)
    for path in fx.SKIPPED_SHARED:
        mark, reason = marks[path]
        assert mark == "✗" and "shared" in reason and "shared.weight" in reason, (path, reason)
    assert "std.fold_bn_conv: 4 site(s) match, 4 refused" in result.output
    assert "std.fold_bn_linear: 1 site(s) match, 0 refused" in result.output


def test_explain_changes_nothing_and_reports_the_same(explained):
    result, report = explained
    assert report is not None
    fx = _factory_constants()
    conv = next(r for r in report["rules"] if r["name"] == "std.fold_bn_conv")
    assert {site_path(s["site"]) for s in conv["sites"]} == set(fx.FOLDED_CONV)
    assert {site_path(s["site"]) for s in conv["skipped"]} == set(fx.SKIPPED_FAN_OUT + fx.SKIPPED_SHARED)
    # dry run: no rewrite, no verification
    assert report["graph"]["before"]["op_counts"] == report["graph"]["after"]["op_counts"]
    assert all("verify" not in s for s in report["steps"])
    assert "wrote" not in result.output


POST_LN_FACTORY = """
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.pre = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.inp, self.ln = nn.Linear(d, d), nn.LayerNorm(d)
        self.f1 = nn.Linear(d, d)

    def forward(self, x):
        p = self.pre(x)                      # pre-LN: read by q and k only
        x = x + self.q(p) * self.k(p)
        h = self.ln(self.inp(x))             # post-LN: read by f1 and the residual add
        return h + self.f1(h)

def build():
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = Net().eval()
    return m, torch.randn(2, 5, 16, generator=g)
"""


def test_explain_fan_out_rules_with_calibration(tmp_path):
    """Calibrated fan-out rules in a dry run: std.smooth takes the pre-LN norm and names the residual
    add that stops it at the post-LN one; std.smooth_compensated takes both."""
    (tmp_path / "net.py").write_text(POST_LN_FACTORY)
    (tmp_path / "s.nc").write_text('pipeline {\n  calibrate from "random" samples 4\n  apply std.smooth\n'
                                   '  apply std.smooth_compensated\n  verify rel 1e-5\n}\n')
    result = cli("explain", tmp_path / "s.nc", f"{tmp_path / 'net.py'}:build")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    blocks = result.output.split("std.smooth_compensated:")
    assert len(blocks) == 2
    smooth, compensated = _marks(blocks[0]), _marks(blocks[1])
    assert smooth["pre"] == ("✓", "")
    assert smooth["ln"][0] == "✗" and "add" in smooth["ln"][1] and "not linear" in smooth["ln"][1]
    assert compensated["pre"][0] == "✓" and compensated["ln"][0] == "✓"


# ------------------------------------------------------------------ --rollback / --strict / --junit
LIB = fold_without_mean("GLOB")
MAIN = """
use "lib.nc" as lib
pipeline {
  apply lib.fold_wrong
  apply std.bn
  verify rel 1e-5
}
"""


def _rules(folder: Path, glob: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lib.nc").write_text(LIB.replace("GLOB", glob))
    (folder / "main.nc").write_text(MAIN)
    return folder / "main.nc"


def _junit(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag in ("testsuites", "testsuite")
    return root


def _failures(root: ET.Element) -> int:
    return int(root.get("failures", 0))


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory):
    """The planted pipeline on zoo:cnn three ways: plain, --rollback, --rollback --strict."""
    base = tmp_path_factory.mktemp("cnn_rollback")
    rules = _rules(base / "rules", "bn[12]")
    runs = {}
    for name, flags in (("plain", []), ("rollback", ["--rollback"]), ("strict", ["--rollback", "--strict"])):
        d = base / name
        d.mkdir()
        out, report, junit = d / "out.safetensors", d / "r.json", d / "j.xml"
        result = cli("apply", rules, "zoo:cnn", "-o", out, "--report", report, "--junit", junit, *flags)
        runs[name] = (result, out, json.loads(report.read_text()) if report.exists() else None, junit)
    return runs


def test_cli_failing_run_names_culprits_and_writes_nothing(cnn_runs):
    result, out, report, junit = cnn_runs["plain"]
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert not out.exists()
    assert {site_path(c["site"]) for c in report["culprits"]} == {"bn1", "bn2"}
    assert {c["rule"] for c in report["culprits"]} == {"lib.fold_wrong"}
    assert "lib.fold_wrong at bn1" in result.output and "--rollback" in result.output
    root = _junit(junit)
    assert _failures(root) > 0
    failure_msgs = [f.get("message", "") + (f.text or "") for f in root.iter("failure")]
    assert any("lib.fold_wrong" in m or "broke equivalence" in m for m in failure_msgs), failure_msgs


def test_cli_rollback_passes_and_reports_rolled_back_sites(cnn_runs):
    result, out, report, junit = cnn_runs["rollback"]
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert report["verify"]["passed"] and report["verify"]["max_rel_err"] <= 1e-5
    assert {site_path(c["site"]) for c in report["rolled_back"]} == {"bn1", "bn2"}
    root = _junit(junit)
    assert _failures(root) == 0


def test_cli_rollback_strict_fails(cnn_runs):
    result, out, report, junit = cnn_runs["strict"]
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert not out.exists()
    assert "--strict" in report["verify"]["failure"]
    assert {site_path(c["site"]) for c in report["rolled_back"]} == {"bn1", "bn2"}
    assert _failures(_junit(junit)) > 0


def test_cli_check_writes_junit_for_a_failing_run(tmp_path):
    rules = _rules(tmp_path / "rules", "bn1")
    junit, report = tmp_path / "j.xml", tmp_path / "r.json"
    result = cli("check", rules, "zoo:cnn", "--junit", junit, "--report", report)
    no_traceback(result)
    assert result.exit_code == 1
    root = _junit(junit)
    assert _failures(root) > 0
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    assert suites and sum(int(s.get("tests", 0)) for s in suites) >= 1
    assert [site_path(c["site"]) for c in json.loads(report.read_text())["culprits"]] == ["bn1"]


@pytest.mark.slow
def test_cli_rollback_on_resnet18(tmp_path):
    site = "encoder.stages.1.layers.0.shortcut.normalization"
    rules = _rules(tmp_path / "rules", site)
    out, report, junit = tmp_path / "out.pt2", tmp_path / "r.json", tmp_path / "j.xml"
    failed = cli("check", rules, "zoo:resnet18", "--report", report, "--junit", junit)
    no_traceback(failed)
    assert failed.exit_code == 1, failed.output
    rep = json.loads(report.read_text())
    assert [(c["rule"], site_path(c["site"])) for c in rep["culprits"]] == [("lib.fold_wrong", site)]
    assert rep["culprits"][0]["local_error"] > 0
    assert _failures(_junit(junit)) > 0
    result = cli("apply", rules, "zoo:resnet18", "-o", out, "--rollback", "--report", report, "--junit", junit)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert [site_path(c["site"]) for c in rep["rolled_back"]] == [site]
    assert rep["verify"]["passed"] and "batch_norm" not in rep["graph"]["after"]["op_counts"]
    assert out.exists() and _failures(_junit(junit)) == 0


# ------------------------------------------------------------------ prove
def test_prove_tells_the_planted_rule_from_the_correct_one(tmp_path):
    """Without a model: the mean-forgetting fold is unsound (exit 1), the correct fold sound."""
    rules = tmp_path / "p.nc"
    rules.write_text(fold_without_mean() + """
rule fold_right {
  doc "the correct fold"
  exact
  match   c = conv(x, w, b?)
          y = batch_norm(c, mean, var, gamma, beta, eps = eps)
  where   frozen_stats(y) and single_use(c) and not shared(w)
  let     s = gamma / sqrt(var + eps)
  rewrite y = conv(x, w * bcast(s, w, 0), ((b ?? 0) - mean) * s + beta)
}
""")
    result = cli("prove", rules)
    no_traceback(result)
    assert result.exit_code == 1, result.output
    verdicts = {line.split()[0]: line.split()[-1] for line in result.output.splitlines()
                if line.startswith(("fold_wrong ", "fold_right "))}
    assert verdicts == {"fold_wrong": "unsound", "fold_right": "sound"}, result.output
    only_right = cli("prove", rules, "--rule", "fold_right")
    assert only_right.exit_code == 0, only_right.output
