"""Reports for people and CI: JUnit XML, a before/after HTML graph diff, terminal progress.

    from normc.report import write_junit, render_diff_html, progress_reporter

Names are imported on first use, so `normc.report.progress` and `normc.report.junit`
load without torch (the CLI can show progress before torch is imported). The page as a
string is `normc.report.diff_html.diff_html(before, after, report)` (the package attribute
`diff_html` is the submodule).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "render_diff_html": "normc.report.diff_html",
    "render_result_diff": "normc.report.diff_html",
    "junit_tree": "normc.report.junit",
    "write_junit": "normc.report.junit",
    "ProgressReporter": "normc.report.progress",
    "progress_reporter": "normc.report.progress",
    "status": "normc.report.progress",
    "track": "normc.report.progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normc.report' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
