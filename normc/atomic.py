"""Atomic output files: write to a temporary file beside the target, then rename.

Temporary files are named `.NAME.PID.XXXX.tmp`: on SIGINT/SIGTERM they are removed before the
signal takes its usual course, and one left by a process that died without cleaning up
(SIGKILL, power loss) is removed by the next write of the same output, once its PID is gone.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_live: set[str] = set()          # temporary files being written by this process
_previous: dict[int, object] = {}  # the handlers ours replaced, restored when the last write ends
_lock = threading.Lock()


def _on_signal(signum, frame):
    for tmp in list(_live):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _live.clear()
    previous = _previous.get(signum)
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python
    _restore()
    if callable(previous):
        previous(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
    else:
        os.kill(os.getpid(), signum)  # die of the signal, as without us


def _install():
    if _previous or threading.current_thread() is not threading.main_thread():
        return  # handlers can only be set from the main thread; elsewhere rely on the stale-file cleanup
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue  # ignored (a background job's SIGINT): the write goes on, so must its file
            _previous[sig] = signal.signal(sig, _on_signal)


def _restore():
    for sig, handler in list(_previous.items()):
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _previous.clear()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove temporary files of `target` whose writing process no longer exists; returns them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            m = pattern.fullmatch(entry.name)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path in the target's folder; rename it onto the target on success.

    On any exception, and on SIGINT/SIGTERM, the temporary file is removed and the target is
    left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    with _lock:
        _install()
        _live.add(tmp)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        with _lock:
            _live.discard(tmp)
            if not _live:
                _restore()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
