"""The issue's one-line reproductions, through the `normc` command: each is a located exit-2
error with a fix, never an internal error (exit 4) or a traceback (issue 13)."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from normc.cli import main

LET = "rule r {{\n  match y = relu(x)\n  let v = {}\n  rewrite y = relu(x)\n}}\n"

CASES = {
    "10,000 unary minus": (LET.format("-" * 10_000 + "1"), 3, "nested too deeply (limit 100)"),
    "5,000 not": (LET.format("not " * 5_000 + "true"), 3, "nested too deeply (limit 100)"),
    "20,000-term chain": (LET.format("+".join(["1"] * 20_000)), 3, "nested too deeply (limit 100)"),
    "unknown \\N name": (LET.format('"\\N{NO SUCH NAME}"'), 3, "no Unicode character is named"),
    "short \\x": (LET.format('"\\x4"'), 3, "needs exactly 2 hexadecimal digits"),
    "5,000-digit integer": (LET.format("7" * 5_000), 3, "is too large"),
    "verify rel nan": ("pipeline {\n  verify rel nan\n}\n", 2, "`verify rel` is not a number"),
    "verify rel -1": ("pipeline {\n  verify rel -1\n}\n", 2, "`verify rel` must be greater than 0"),
    "impl attribute": ('pass p {\n  impl "normc.passes.prenorm:importlib"\n}\n', 1, "pass `p`:"),
    "impl module": ('pass p {\n  impl "normc.passes.nosuch:run"\n}\n', 1, "no module `normc.passes.nosuch`"),
    "use /etc/passwd": ('use "/etc/passwd"\n', 1, "is not a rules file"),
    "non-UTF-8 in a string": (b'pipeline {\n  calibrate from "\xff\xfe"\n}\n', 2, "is not UTF-8"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue_case_is_a_located_exit_2(tmp_path, name):
    source, line, words = CASES[name]
    rules = tmp_path / "case.nc"
    rules.write_bytes(source if isinstance(source, bytes) else source.encode())
    result = CliRunner().invoke(main, ["check", str(rules), "zoo:cnn"])
    assert result.exit_code == 2, result.output
    assert re.search(rf"case\.nc:{line}:\d+: error: ", result.output), result.output[:500]
    assert words in result.output and "fix:" in result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert "root:" not in result.output  # nothing of /etc/passwd is shown
