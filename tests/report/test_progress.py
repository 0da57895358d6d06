"""Progress reporting: silent off a terminal, plain lines when forced, a live display on a terminal."""
from __future__ import annotations

import io
import re

import torch
from rich.console import Console
from torch import nn

from normc.report import progress as P
from normc.report.progress import progress_reporter, status, track


def _terminal():
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100, color_system=None), buf


def test_not_a_tty_is_completely_silent(capsys):
    with progress_reporter() as say:  # capsys: stderr is not a TTY
        assert not say.enabled
        say("tracing")
        assert list(say.track(range(5), "verifying", total=5)) == [0, 1, 2, 3, 4]
        assert list(track(iter([1, 2]), "calibrating")) == [1, 2]
        status("writing out.pt2")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_forced_on_a_log_prints_plain_lines(capsys):
    with progress_reporter(enabled=True) as say:
        assert say.enabled
        say("tracing")
        items = list(say.track([10, 20, 30], "verifying"))
        assert list(track(range(2), "calibrating", total=2)) == [0, 1]  # the module-level helper finds it
    err = capsys.readouterr().err
    assert items == [10, 20, 30]
    assert re.search(r"^normc: tracing  \d+\.\ds$", err, re.M)  # the stage, with its duration
    assert re.search(r"^normc: verifying: 3 item\(s\)  \d+\.\ds$", err, re.M)
    assert "calibrating: 2 item(s)" in err
    assert err.count("\n") == 3  # one line per stage and per loop, never one per item


def test_terminal_gets_the_live_display():
    console, buf = _terminal()
    with progress_reporter(console=console) as say:
        assert say.enabled
        say("tracing")
        total = sum(say.track(range(50), "verifying", total=50))
        say("applying std.fold_bn_conv")
    out = buf.getvalue()
    assert total == sum(range(50))
    assert "✓ tracing" in out and "✓ applying std.fold_bn_conv" in out
    assert "verifying" in out


def test_disabled_on_a_terminal_is_silent():
    console, buf = _terminal()
    with progress_reporter(enabled=False, console=console) as say:
        say("tracing")
        list(say.track(range(3), "x"))
    assert buf.getvalue() == ""


def test_track_without_a_reporter_is_a_pass_through(capsys):
    gen = (i * i for i in range(4))
    assert list(track(gen, "squares")) == [0, 1, 4, 9]
    status("nobody listens")
    assert capsys.readouterr().err == ""


def test_nested_reporters_share_the_outer_display(capsys):
    with progress_reporter(enabled=True) as outer:
        with progress_reporter() as inner:
            assert inner is outer
            inner("inner step")
    assert "normc: inner step" in capsys.readouterr().err
    assert P._ACTIVE.get() is None


def test_breaking_out_of_a_tracked_loop_on_a_terminal():
    console, _ = _terminal()
    with progress_reporter(console=console) as say:
        for i in say.track(range(100), "long loop"):
            if i == 3:
                break
        say("after")  # the display still works


def test_reporter_drives_the_pipeline(capsys):
    """`say` is a plain callable(str): it plugs into RunOptions.progress."""
    from normc import api
    from normc.frontend.specs import InputSpec, LoadedModel
    from normc.pipeline import RunOptions, compile_model

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    loaded = LoadedModel(m, (x,), {}, [InputSpec.from_example("x", x)], "seq", False)
    program = api.load_rules(text="pipeline {\n  apply std.fold_bn_conv\n}\n")
    with progress_reporter(enabled=True) as say:
        result = compile_model(program, loaded, RunOptions(write=False, verify_inputs=1, progress=say))
    assert result.passed
    err = capsys.readouterr().err
    assert "normc: tracing" in err and "normc: applying std.fold_bn_conv" in err
