"""`normc explain` shows each refusal with its real cause and the node (op and module path) it is about."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from normc.cli import main

REPO = Path(__file__).resolve().parents[2]
FACTORY = REPO / "tests" / "fixtures" / "refusals_factory.py"


@pytest.mark.parametrize("example, factory, needles", [
    ("prenorm_to_rmsnorm", "raw_stream", ["✗", "the model output `hidden` is the residual stream itself", "(`add"]),
    ("bn_fold", "conv_two_readers", ["✗ bn (", "conv `conv` output has 2 users: batch_norm `bn (", "add `"]),
    ("prenorm_to_rmsnorm", "weightless_ln", ["✗ ln (", "layer_norm `ln (", "has no affine to fold"]),
    ("fold_norm_affine", "channels_first_ln", ["✗ norm (", "`norm` normalizes dim 1 of its input (through a permute)",
                                               "is permute, not linear", "reaches conv `down`"]),
])
def test_explain_names_cause_and_node(example, factory, needles, tmp_path):
    rules = REPO / "examples" / f"{example}.nc"
    if not rules.exists():  # a std module without an example file: a one-line program applying it
        rules = tmp_path / f"{example}.nc"
        rules.write_text(f"use std.{example}\npipeline {{ apply std.{example} verify rel 1e-4 }}\n")
    result = CliRunner().invoke(main, ["explain", str(rules), f"{FACTORY}:{factory}"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
