"""Temporary output files never outlive a write: removed on error, on SIGINT and SIGTERM, and a
stale one left by a killed process is removed at the next write of the same output (issue 13)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normc.atomic import atomic_path, remove_stale, write_text

REPO = Path(__file__).resolve().parents[2]


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_temp_name_carries_the_pid(tmp_path):
    with atomic_path(tmp_path / "m.pt2") as tmp:
        assert tmp.name.startswith(f".m.pt2.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_text("x")
    assert (tmp_path / "m.pt2").read_text() == "x" and temps(tmp_path) == []


def test_error_removes_the_temp_and_keeps_the_target(tmp_path):
    (tmp_path / "m.onnx").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "m.onnx") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert (tmp_path / "m.onnx").read_text() == "old" and temps(tmp_path) == []


def test_handlers_are_restored_after_a_write(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    write_text(tmp_path / "r.json", "{}")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has it (pids are not reused this soon)


def test_stale_temp_of_a_dead_process_is_removed_at_the_next_write(tmp_path):
    stale = tmp_path / f".m.pt2.{dead_pid()}.abc123.tmp"
    stale.write_text("left by a SIGKILL")
    alive = tmp_path / f".m.pt2.{os.getppid()}.def456.tmp"  # a running process: not touched
    alive.write_text("being written")
    other = tmp_path / f".other.pt2.{dead_pid()}.xyz.tmp"     # another output's: not touched
    other.write_text("x")
    write_text(tmp_path / "m.pt2", "new")
    assert not stale.exists() and alive.exists() and other.exists()
    assert remove_stale(tmp_path / "other.pt2") == [other]


WRITER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from normc.atomic import atomic_path
    {setup}
    with atomic_path({target!r}) as tmp:
        tmp.write_text("half")
        print(tmp, flush=True)
        os.kill(os.getpid(), getattr(signal, {sig!r}))
        time.sleep(5)
    print("not reached", flush=True)
""")


# SIGTERM: the process dies of it; SIGINT: KeyboardInterrupt (Python >= 3.11 then exits by SIGINT too)
@pytest.mark.parametrize("sig, status", [("SIGTERM", {-signal.SIGTERM}), ("SIGINT", {1, -signal.SIGINT})])
def test_signal_removes_the_temp(tmp_path, sig, status):
    target = tmp_path / "model.pt2"
    # the child's SIGINT as an interactive Python has it, whatever this process inherited (a background
    # job's SIGINT is ignored, and a child inherits that)
    setup = "signal.signal(signal.SIGINT, signal.default_int_handler)"
    code = WRITER.format(repo=str(REPO), target=str(target), sig=sig, setup=setup)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode in status, proc.stderr
    assert proc.stdout.strip().endswith(".tmp") and "not reached" not in proc.stdout
    assert temps(tmp_path) == [] and not target.exists()
    if sig == "SIGINT":
        assert "KeyboardInterrupt" in proc.stderr


def test_an_ignored_signal_stays_ignored_and_the_write_completes(tmp_path):
    """A background job (`cmd &` in a script) has SIGINT ignored: a Ctrl-C meant for the shell must
    neither stop the write nor delete the file being written."""
    target = tmp_path / "model.pt2"
    setup = "signal.signal(signal.SIGINT, signal.SIG_IGN)"
    code = WRITER.format(repo=str(REPO), target=str(target), sig="SIGINT", setup=setup).replace("time.sleep(5)", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "not reached" in proc.stdout  # the write went on past the signal
    assert target.read_text() == "half" and temps(tmp_path) == []
