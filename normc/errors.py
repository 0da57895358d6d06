"""Errors meant for people: one line naming the problem, one naming the fix.

Exit codes (documented in the README):
  0  success
  1  verification failed (nothing was written)
  2  usage or input error (bad .nc file, unloadable model, refused pickle, ...)
  3  a backend is missing (e.g. TensorRT not installed)
  4  internal error in normc (a bug: rerun with --debug and report the traceback)
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_BACKEND_MISSING = 3
EXIT_INTERNAL = 4


class NormcError(Exception):
    """An error the CLI prints without a traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class BackendMissing(NormcError):
    exit_code = EXIT_BACKEND_MISSING


class VerificationFailed(NormcError):
    exit_code = EXIT_VERIFY_FAILED
