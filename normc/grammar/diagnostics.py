"""Located errors for `.nc` files: file:line:col, the source line, a caret, a fix."""
from __future__ import annotations

import difflib

from ..errors import NormcError
from .syntax_tree import Loc


def nearest(name: str, candidates) -> str | None:
    found = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(name: str, candidates) -> str | None:
    best = nearest(name, candidates)
    return f"did you mean `{best}`?" if best else None


_MAX_SHOWN = 160  # characters of a source line shown under an error


class Diagnostic:
    def __init__(self, loc: Loc, message: str, hint: str | None = None, source: str | None = None):
        self.loc, self.message, self.hint, self.source = loc, message, hint, source

    def render(self, source: str | None) -> str:
        loc = self.loc
        text = f"{loc.file}:{loc.line}:{loc.column}: error: {self.message}"
        lines = (source or "").splitlines()
        if 1 <= loc.line <= len(lines):
            line = lines[loc.line - 1]
            width = 1
            if loc.end_line == loc.line and loc.end_column > loc.column:
                width = loc.end_column - loc.column
            column = loc.column
            if len(line) > _MAX_SHOWN:  # a window around the caret, not a 20,000-character line
                start = max(0, column - 1 - _MAX_SHOWN // 2)
                line = ("…" if start else "") + line[start:start + _MAX_SHOWN] + ("…" if start + _MAX_SHOWN < len(line) else "")
                column = column - start + (1 if start else 0)
                width = max(1, min(width, _MAX_SHOWN // 2))
            gutter = f"{loc.line:>4} | "
            text += f"\n{gutter}{line}\n{' ' * (len(gutter) + column - 1)}{'^' * width}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class NcError(NormcError):
    """One or more located errors in a `.nc` file (exit code 2)."""

    def __init__(self, diagnostics: list[Diagnostic], source: str | None):
        self.diagnostics = diagnostics
        self.source = source
        first = diagnostics[0]
        super().__init__(f"{first.loc.file}:{first.loc.line}:{first.loc.column}: {first.message}", first.hint)

    def render(self) -> str:
        return "\n".join(d.render(d.source if d.source is not None else self.source) for d in self.diagnostics)
