"""JUnit XML from a normc report, for CI test dashboards (GitHub, GitLab, Jenkins, Azure).

    write_junit(result.report, "results.xml")

Layout (the Apache Ant / Jenkins JUnit structure every CI reader accepts)::

    <testsuites name tests failures errors skipped time>
      <testsuite name tests failures errors skipped time timestamp hostname>
        <properties> normc version, model, rules file </properties>
        <testcase classname="RULE" name="OUTPUT">           one per (rule x output)
          <failure message="..."> per-output numbers </failure>   when it failed
          <system-out> skipped sites and their reasons </system-out>
        </testcase>
        <testcase classname="SUITE.steps" name="verify #1 (step 3)"/>   one per verify step
        <testcase classname="SUITE" name="pipeline"/>                  the overall verdict
      </testsuite>
    </testsuites>

A (rule, output) case fails when that output failed the verification that
followed the rule's `apply` step, failed the final verification, or when the
pipeline as a whole failed (then its message carries the pipeline's reason).
A rule that was never verified (dry run, `explain`) gets a `<skipped>` case.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ..atomic import atomic_path

__all__ = ["junit_tree", "write_junit"]

# Characters XML 1.0 cannot carry, even escaped.
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: Any) -> str:
    return _ILLEGAL_XML.sub("?", "" if text is None else str(text))


def _num(x: Any) -> float | None:
    """A report number (floats, or 'inf'/'nan' strings) as a float; None when absent."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _fmt(x: Any, spec: str = ".3g") -> str:
    v = _num(x)
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _tol_text(tol: dict | None) -> str:
    if not tol:
        return "default"
    parts = []
    if tol.get("max_abs") is not None:
        parts.append(f"max_abs {_fmt(tol['max_abs'], 'g')}")
    if tol.get("max_rel") is not None:
        parts.append(f"rel {_fmt(tol['max_rel'], 'g')}")
    return " ".join(parts) or "none"


def _output_line(o: dict) -> str:
    status = "passed" if o.get("passed") else "FAILED"
    line = (f"{o.get('name')}: {status}  max_abs {_fmt(o.get('max_abs'))}  max_rel {_fmt(o.get('max_rel'))}  "
            f"cosine {_fmt(o.get('cosine'), '.9f')}  shape {o.get('shape')}  {o.get('dtype', '')}")
    if o.get("note"):
        line += f"  ({o['note']})"
    return line


def _verify_text(v: dict | None) -> str:
    if not v:
        return ""
    lines = [f"verify {'passed' if v.get('passed') else 'FAILED'}: max_abs {_fmt(v.get('max_abs_err'))}, "
             f"max_rel {_fmt(v.get('max_rel_err'))}, min cosine {_fmt(v.get('min_cosine'), '.9f')} "
             f"over {v.get('n_inputs', '?')} input(s) (tolerance {_tol_text(v.get('tolerance'))})"]
    lines += ["  " + _output_line(o) for o in v.get("outputs") or []]
    return "\n".join(lines)


def _by_name(outputs: list[dict] | None) -> dict[str, dict]:
    return {o.get("name"): o for o in outputs or []}


def _rules_with_steps(report: dict) -> list[tuple[str, dict, dict]]:
    """(case class name, rule report, the step that applied it) for every rule run.

    `report["rules"]` lists the rules of every step in step order, so the two are walked
    together. A rule applied by several steps gets "name #2", "name #3" for its later runs.
    """
    rules = list(report.get("rules") or [])
    steps = report.get("steps") or []
    paired: list[tuple[dict, dict]] = []
    i = 0
    for step in steps:
        for name in step.get("rules") or []:
            if i < len(rules) and rules[i].get("name") == name:
                paired.append((rules[i], step))
                i += 1
    if i != len(rules):  # not the runner's layout: pair each rule with the first step naming it
        first = {}
        for step in steps:
            for name in step.get("rules") or []:
                first.setdefault(name, step)
        paired = [(r, first.get(r.get("name"), {})) for r in rules]
    seen: dict[str, int] = {}
    out = []
    for rule, step in paired:
        name = str(rule.get("name", "?"))
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name} #{seen[name]}", rule, step))
    return out


def _rule_out(rule: dict) -> str:
    lines = [f"{rule.get('name')}: applied at {rule.get('applied', 0)} site(s)"]
    skipped = rule.get("skipped") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} site(s):")
        lines += [f"  {s.get('site')}: {s.get('reason')}" for s in skipped]
    near = rule.get("near_misses") or []
    if near:
        total = rule.get("near_miss_count", len(near))
        lines.append(f"near misses ({total}): sites that almost matched")
        lines += [f"  {s.get('site')}: {s.get('reason')}" for s in near]
    return "\n".join(lines)


class _Suite:
    def __init__(self, suite: ET.Element):
        self.suite = suite
        self.tests = self.failures = self.errors = self.skipped = 0

    def case(self, classname: str, name: str, seconds: float = 0.0, *, failure: tuple[str, str] | None = None,
             skipped: str | None = None, out: str | None = None) -> ET.Element:
        tc = ET.SubElement(self.suite, "testcase", classname=_clean(classname), name=_clean(name),
                           time=f"{max(float(seconds or 0.0), 0.0):.4f}")
        self.tests += 1
        if skipped is not None:
            ET.SubElement(tc, "skipped", message=_clean(skipped))
            self.skipped += 1
        elif failure is not None:
            message, text = failure
            el = ET.SubElement(tc, "failure", message=_clean(message), type="VerificationFailed")
            el.text = _clean(text)
            self.failures += 1
        if out:
            ET.SubElement(tc, "system-out").text = _clean(out)
        return tc


def junit_tree(report: dict, suite_name: str = "normc") -> ET.ElementTree:
    """The JUnit XML tree for `report` (the dict `compile_model` returns as `.report`)."""
    verify = report.get("verify") or {}
    pipeline_ok = bool(verify.get("passed", False))
    pipeline_reason = verify.get("failure") or "the pipeline failed verification"
    final_outputs = _by_name(verify.get("outputs"))
    steps = report.get("steps") or []
    total_seconds = float(report.get("seconds") or sum(float(s.get("seconds") or 0) for s in steps))

    root = ET.Element("testsuites", name=_clean(suite_name))
    suite_el = ET.SubElement(
        root, "testsuite", name=_clean(suite_name),
        timestamp=_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None, microsecond=0).isoformat(),
        hostname=_clean(socket.gethostname() or "localhost"))
    props = ET.SubElement(suite_el, "properties")
    for key in ("normc_version", "model", "rules_file"):
        if report.get(key) is not None:
            ET.SubElement(props, "property", name=key, value=_clean(report[key]))
    suite = _Suite(suite_el)

    # ---- one case per (rule x output)
    for name, rule, step in _rules_with_steps(report):
        step_v = step.get("verify") or None
        step_outputs = _by_name(step_v.get("outputs") if step_v else None)
        names = list(final_outputs) or list(step_outputs)
        has_notes = rule.get("skipped") or rule.get("near_misses")
        out = _rule_out(rule) if has_notes else None
        step_label = step.get("step", f"apply {rule.get('name', '?')}")
        n_cases = max(len(names), 1)
        seconds = float(step.get("seconds") or 0.0) / n_cases
        if not names:
            suite.case(name, "verify", seconds, out=out,
                       skipped="not verified (dry run, or the pipeline has no verification)")
            continue
        for out_name in names:
            mine = step_outputs.get(out_name)
            final = final_outputs.get(out_name)
            failure = None
            if mine is not None and not mine.get("passed", True):
                failure = (f"output `{out_name}` failed verification after `{step_label}`",
                           f"after `{step_label}` (applied at {rule.get('applied', 0)} site(s)):\n"
                           f"{_verify_text(step_v)}")
            elif final is not None and not final.get("passed", True):
                failure = (f"output `{out_name}` failed the final verification",
                           f"{pipeline_reason}\n{_verify_text(verify)}")
            elif not pipeline_ok:
                failure = (f"pipeline failed: {pipeline_reason}", f"{pipeline_reason}\n{_verify_text(verify)}")
            suite.case(name, out_name, seconds, failure=failure, out=out)

    # ---- one case per verify step
    n_verify = 0
    for i, step in enumerate(steps, 1):
        if step.get("step") != "verify":
            continue
        n_verify += 1
        v = step.get("verify")
        label = f"verify #{n_verify} (step {i})"
        if v is None:
            suite.case(f"{suite_name}.steps", label, step.get("seconds", 0.0), skipped="not run (dry run)")
            continue
        failure = None
        if not v.get("passed", True):
            failure = (f"{label} failed: max_rel {_fmt(v.get('max_rel_err'))}, max_abs {_fmt(v.get('max_abs_err'))} "
                       f"(tolerance {_tol_text(v.get('tolerance'))})", _verify_text(v))
        suite.case(f"{suite_name}.steps", label, step.get("seconds", 0.0), failure=failure, out=_verify_text(v))

    # ---- the overall verdict (also covers pipelines without rules or verify steps)
    failure = None if pipeline_ok else (f"pipeline failed: {pipeline_reason}", f"{pipeline_reason}\n{_verify_text(verify)}")
    summary = _verify_text(verify) if verify.get("outputs") is not None else None
    suite.case(suite_name, "pipeline", total_seconds, failure=failure, out=summary)

    for el in (root, suite_el):
        el.set("tests", str(suite.tests))
        el.set("failures", str(suite.failures))
        el.set("errors", str(suite.errors))
        el.set("skipped", str(suite.skipped))
        el.set("time", f"{total_seconds:.4f}")
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(report: dict, path: str | Path, suite_name: str = "normc") -> None:
    """Write `report` as JUnit XML to `path` (atomically: a reader never sees half a file)."""
    tree = junit_tree(report, suite_name)
    with atomic_path(path) as tmp:
        tree.write(tmp, encoding="utf-8", xml_declaration=True)
