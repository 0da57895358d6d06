"""The module system and output containment (issue 13): `use` is transitive with cycle detection,
reads only .nc files inside the importing file's folder, the standard library and --rules-path
folders, and never echoes a file that is not a rules file; `export ... to` writes only under the
current folder or the -o folder unless --allow-outside-writes."""
from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normc.api import load_rules
from normc.cli import main
from normc.errors import NormcError
from normc.grammar.checker import check_export_paths
from normc.grammar.diagnostics import NcError
from normc.pipeline import RunOptions, compile_model
from tests.conftest import loaded_model

RELU = "rule {name} {{ match y = relu(relu(x)) rewrite y = relu(x) }}\n"
SECRET = "TOP-SECRET-LINE not a rules file\n"


def write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def located(path, **kw) -> NcError:
    with pytest.raises(NcError) as info:
        load_rules(path, **kw)
    return info.value


def test_use_is_transitive(tmp_path):
    write(tmp_path, "lib/base.nc", RELU.format(name="base_rule"))
    write(tmp_path, "lib/mid.nc", 'use "base.nc"\n' + RELU.format(name="mid_rule"))
    main_nc = write(tmp_path, "main.nc", 'use "lib/mid.nc"\npipeline { apply base.base_rule apply mid }')
    program = load_rules(main_nc)
    assert {"mid.mid_rule", "base.base_rule"} <= set(program.rules)


def test_wrong_path_in_an_imported_file_is_located(tmp_path):
    write(tmp_path, "lib.nc", '# lib\nuse "nosuch.nc"\n')
    e = located(write(tmp_path, "main.nc", 'use "lib.nc"\n'))
    d = e.diagnostics[0]
    assert d.loc.file.endswith("lib.nc") and d.loc.line == 2 and "cannot find `nosuch.nc`" in d.message


def test_cycle_is_located_and_named(tmp_path):
    write(tmp_path, "a.nc", 'use "b.nc"\n')
    write(tmp_path, "b.nc", '# b\nuse "a.nc"\n')
    e = located(write(tmp_path, "main.nc", 'use "a.nc"\n'))
    d = e.diagnostics[0]
    assert d.message == "`use` makes a cycle: a.nc -> b.nc -> a.nc"
    assert d.loc.file.endswith("b.nc") and d.loc.line == 2 and "^" in e.render()


def test_self_use_is_a_cycle(tmp_path):
    path = write(tmp_path, "main.nc", 'use "main.nc"\n')
    assert "cycle: main.nc -> main.nc" in located(path).diagnostics[0].message


def test_diamond_loads_a_file_once(tmp_path):
    write(tmp_path, "common.nc", RELU.format(name="c"))
    write(tmp_path, "a.nc", 'use "common.nc"\n')
    write(tmp_path, "b.nc", 'use "common.nc"\n')
    program = load_rules(write(tmp_path, "main.nc", 'use "a.nc"\nuse "b.nc"\n'))
    assert [n for n in program.rules if n.endswith(".c")] == ["common.c"]


@pytest.mark.parametrize("target", ["/etc/passwd", "secret.txt", "../secret.txt"])
def test_non_rules_files_are_never_read_or_echoed(tmp_path, target):
    write(tmp_path, "secret.txt", SECRET)
    write(tmp_path.parent, "secret.txt", SECRET)
    e = located(write(tmp_path, "main.nc", f'use "{target}"\n'))
    assert "is not a rules file" in e.diagnostics[0].message
    assert "SECRET" not in e.render() and "root:" not in e.render()


def test_link_named_nc_to_a_non_rules_file_is_refused(tmp_path):
    write(tmp_path, "secret.txt", SECRET)
    os.symlink(tmp_path / "secret.txt", tmp_path / "lib.nc")
    e = located(write(tmp_path, "main.nc", 'use "lib.nc"\n'))
    assert "not a rules file" in e.diagnostics[0].message and "SECRET" not in e.render()


def test_rules_outside_the_folder_are_refused_unless_on_the_rules_path(tmp_path):
    shared = tmp_path / "shared"
    write(shared, "lib.nc", RELU.format(name="r"))
    project = tmp_path / "project"
    main_nc = write(project, "main.nc", 'use "../shared/lib.nc"\n')
    assert "outside the folders" in located(main_nc).diagnostics[0].message
    os.symlink(shared / "lib.nc", project / "link.nc")  # a link does not get around it
    assert "outside the folders" in located(write(project, "m2.nc", 'use "link.nc"\n')).diagnostics[0].message
    assert "lib.r" in load_rules(main_nc, rules_path=[shared]).rules
    # a --rules-path folder is also searched by name
    assert "lib.r" in load_rules(write(project, "m3.nc", 'use "lib.nc"\n'), rules_path=[shared]).rules


def test_rules_path_must_be_a_folder(tmp_path):
    with pytest.raises(NormcError, match="is not a folder"):
        load_rules(write(tmp_path, "m.nc", ""), rules_path=[tmp_path / "nosuch"])


def test_cli_rules_path(tmp_path):
    write(tmp_path / "shared", "lib.nc", RELU.format(name="r"))
    main_nc = write(tmp_path / "p", "main.nc", 'use "lib.nc"\npipeline { apply lib.r }\n')
    refused = CliRunner().invoke(main, ["prove", str(main_nc)])
    assert refused.exit_code == 2 and "cannot find `lib.nc`" in refused.output
    ok = CliRunner().invoke(main, ["prove", str(main_nc), "--rules-path", str(tmp_path / "shared")])
    assert ok.exit_code == 0, ok.output


# ------------------------------------------------------------------ export containment
def program_exporting(path: str):
    return load_rules(text=f'pipeline {{\n  export torch to "{path}"\n}}')


def test_export_outside_the_current_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NcError) as info:
        check_export_paths(program_exporting("../../../x.pt2"))
    d = info.value.diagnostics[0]
    assert d.loc.line == 2 and "writes outside the current folder" in d.message and "--allow-outside-writes" in d.hint
    with pytest.raises(NcError):
        check_export_paths(program_exporting("/tmp/elsewhere/x.pt2"))
    check_export_paths(program_exporting("out/x.pt2"))  # under the current folder
    check_export_paths(program_exporting("../../../x.pt2"), allow_outside_writes=True)


def test_export_under_the_output_folder_is_allowed(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "outdir" / "model.pt2"
    check_export_paths(program_exporting(str(tmp_path / "outdir" / "extra.onnx")), output=out)
    with pytest.raises(NcError):
        check_export_paths(program_exporting(str(tmp_path / "x.onnx")), output=out)


def test_compile_refuses_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(NcError):
        compile_model(program_exporting("../escaped.pt2"), loaded_model(model, torch.randn(2, 4)), RunOptions())
    assert not (tmp_path.parent / "escaped.pt2").exists()


def test_cli_export_containment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    rules = write(tmp_path, "r.nc", 'pipeline {\n  export safetensors to "../escaped.safetensors"\n}\n')
    monkeypatch.chdir(tmp_path / "work")
    refused = CliRunner().invoke(main, ["apply", str(rules), "zoo:cnn", "--samples", "1"])
    assert refused.exit_code == 2 and "r.nc:2:3" in refused.output
    assert not (tmp_path / "escaped.safetensors").exists()
    allowed = CliRunner().invoke(main, ["apply", str(rules), "zoo:cnn", "--samples", "1", "--allow-outside-writes"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "escaped.safetensors").exists()


@pytest.mark.parametrize("source", ['use "a\\0b.nc"\n', 'pipeline {\n  export torch to "x\\0.pt2"\n}\n',
                                    'pipeline {\n  calibrate from "x\\0.pt"\n}\n'])
def test_nul_in_a_path_is_located(source):
    # found by tools/fuzz_nc.py: Path.resolve raised ValueError (embedded null byte)
    with pytest.raises(NcError) as info:
        load_rules(text=source)
    assert "cannot contain a NUL character" in info.value.diagnostics[0].message


def test_calibration_data_outside_the_rules_and_current_folders_is_refused(tmp_path, monkeypatch):
    from normc.grammar.checker import check_data_paths
    (tmp_path / "project").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    secret = write(tmp_path, "secret.txt", SECRET)
    beside = write(tmp_path / "project", "calib.txt", "a sentence\n")
    here = write(tmp_path / "cwd", "here.txt", "a sentence\n")

    def rules(source):
        return load_rules(write(tmp_path / "project", "r.nc", f'pipeline {{\n  calibrate from "{source}"\n}}\n'))
    for ok in ("calib.txt", str(beside), "here.txt", str(here), "random", "builtin:sentences"):
        check_data_paths(rules(ok))
    for bad in ("../secret.txt", str(secret), "/etc/hostname"):
        with pytest.raises(NcError) as info:
            check_data_paths(rules(bad))
        d = info.value.diagnostics[0]
        assert d.loc.line == 2 and "reads outside" in d.message and "--allow-outside-reads" in d.hint
        assert "TOP-SECRET" not in str(info.value)
        check_data_paths(rules(bad), allow_outside_reads=True)


def test_cli_calibration_containment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    write(tmp_path, "outside.txt", "the quick brown fox\n")
    rules = write(tmp_path / "work", "r.nc", 'pipeline {\n  calibrate from "../outside.txt"\n}\n')
    monkeypatch.chdir(tmp_path / "work")
    refused = CliRunner().invoke(main, ["check", str(rules), "zoo:cnn", "--samples", "1"])
    assert refused.exit_code == 2 and "r.nc:2:3" in refused.output and "reads outside" in refused.output
