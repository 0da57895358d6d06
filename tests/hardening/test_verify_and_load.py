"""A reference that is not finite fails verification unless allowed; a factory's sys.exit is an
error, not a silent exit 0 (issue 13)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normc.api import load_rules
from normc.cli import main
from normc.errors import NormcError
from normc.frontend import load_model
from normc.pipeline import RunOptions, compile_model
from tests.conftest import loaded_model


class LogOfLinear(nn.Module):
    """log of a linear map: NaN wherever the linear output is negative."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).log()


class Finite(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


def run(model, rules: str):
    torch.manual_seed(0)
    return compile_model(load_rules(text=rules), loaded_model(model.eval(), torch.randn(8, 4)), RunOptions(write=False))


def test_nonfinite_reference_fails_verification():
    torch.manual_seed(0)
    result = run(LogOfLinear(), "pipeline { verify rel 1e-5 }")
    assert not result.passed
    failure = result.report["verify"]["failure"]
    assert "is not finite on verification input 0" in failure and "NaN" in failure
    assert "allow_nonfinite true" in failure


def test_nonfinite_reference_fails_without_a_verify_step():
    assert not run(LogOfLinear(), "").passed


def test_allow_nonfinite_lets_it_pass():
    result = run(LogOfLinear(), "pipeline { verify rel 1e-5 allow_nonfinite true }")
    assert result.passed, result.report["verify"]


def test_finite_reference_passes():
    assert run(Finite(), "pipeline { verify rel 1e-5 }").passed


def test_allow_nonfinite_takes_a_boolean():
    with pytest.raises(NormcError, match="must be true or false"):
        load_rules(text="pipeline { verify allow_nonfinite 1 }")


def test_cli_exit_1_on_a_nonfinite_reference(tmp_path):
    factory = tmp_path / "m.py"
    factory.write_text("import torch\n"
                       "class M(torch.nn.Module):\n"
                       "    def forward(self, x):\n"
                       "        return (x - 10.0).log()\n"
                       "def build():\n"
                       "    return M(), (torch.ones(2, 4),)\n")
    rules = tmp_path / "r.nc"
    rules.write_text("pipeline { verify rel 1e-5 }\n")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["check", str(rules), f"{factory}:build", "--report", str(report)])
    assert result.exit_code == 1, result.output
    assert "not finite" in json.loads(report.read_text())["verify"]["failure"]


# ------------------------------------------------------------------ factories that exit
@pytest.mark.parametrize("body", ["import sys\ndef build():\n    sys.exit(0)\n",
                                  "import sys\ndef build():\n    raise SystemExit('bye')\n"])
def test_factory_calling_sys_exit_is_an_error(tmp_path, body):
    factory = tmp_path / "f.py"
    factory.write_text(body)
    with pytest.raises(NormcError, match="called sys.exit"):
        load_model(f"{factory}:build")
    result = CliRunner().invoke(main, ["check", "examples/bn_fold.nc", f"{factory}:build"])
    assert result.exit_code == 2 and "called sys.exit" in result.output


def test_module_exiting_at_import_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(NormcError, match="called sys.exit"):
        load_model("exits_on_import:build")
