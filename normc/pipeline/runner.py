"""The pipeline runner: the one place where rules, verification and backends meet.

    model --trace--> fx graph --canonicalize--> canonical graph
    pipeline: apply ... (each step verified) -> verify (gates) -> export (only if verified)

Nothing is written unless every verification passed.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from ..errors import NormcError
from ..frontend import LoadedModel, trace_model
from ..frontend.shapes import inputs_at_other_shapes
from ..frontend.specs import InputSpec
from ..grammar import syntax_tree as T
from ..grammar.checker import check_data_paths, check_export_paths
from ..grammar.loader import Program
from ..ir.builtins import DTYPE_NAMES, EvalContext
from ..ir.canonicalize import canonicalize, resolve_with_shapes, run_recognizers
from ..ir.evaluate import Evaluator
from ..ir.graph import annotate_shapes, op_counts
from ..ir.rewrite import RuleReport, apply_rule
from ..passes.registry import resolve_pass
from ..verify import CachedReference, Tolerance, VerifyResult, sample_inputs, verify_models
from ..verify.compare import nonfinite_reference, run_model
from ..verify.inputs import cast_inputs
from ..verify.sites import SiteChecker, SiteResult
from .outputs import format_of, write_outputs


@dataclass
class RunOptions:
    output: Path | None = None          # -o: .pt2, .onnx or .safetensors
    verify_inputs: int = 4              # random inputs drawn from the input specs (plus the example)
    seed: int = 0
    write: bool = True                  # False for `normc check`: verify only
    dry_run: bool = False               # `normc explain`: match and report, change nothing
    opset: int | None = None           # ONNX opset; None: 23 when the graph has rms_norm (RMSNormalization), else 18
    progress: object = None             # callable(str) for status lines, or None
    rollback: bool = False              # roll back the sites that broke verification and go on
    strict: bool = False                # with rollback: a rollback still fails the run
    keep_before: bool = False           # keep the canonical graph before the pipeline (for --diff)
    allow_outside_writes: bool = False  # `export ... to` paths outside the current and -o folders
    allow_outside_reads: bool = False   # `calibrate from` paths outside the rules file's and the current folder
    static: bool = False                # --static: trace and export at the example shape only
    require_applied: bool = False       # --require-applied: a run that rewrote no site fails


@dataclass
class StepRecord:
    step: str
    rules: list[RuleReport] = field(default_factory=list)
    verify: VerifyResult | None = None
    seconds: float = 0.0
    approximate: bool = False

    culprits: list = field(default_factory=list)
    rolled_back: list = field(default_factory=list)
    bisection_tests: int = 0
    verify_calibration: VerifyResult | None = None  # approximate steps: error on the calibration inputs
    checker: SiteChecker | None = None   # records the step's sites for the per-site float64 check
    site_checks: list[SiteResult] = field(default_factory=list)  # each exact site in float64
    unchecked: list[str] = field(default_factory=list)  # rules of this step whose sites nothing checks
    note: str = ""  # why the step checked nothing

    def to_dict(self):
        d = {"step": self.step, "seconds": round(self.seconds, 4), "approximate": self.approximate}
        if self.note:
            d["note"] = self.note
        if self.verify_calibration is not None:
            d["verify_calibration"] = self.verify_calibration.to_dict()
        if self.culprits:
            d["culprits"] = self.culprits
            d["bisection_tests"] = self.bisection_tests
        if self.rolled_back:
            d["rolled_back"] = self.rolled_back
        if self.verify is not None:
            d["verify"] = self.verify.to_dict()
        if self.site_checks:
            d["float64_sites"] = [c.to_dict() for c in self.site_checks]
        d["rules"] = [r.name for r in self.rules]
        return d


@dataclass
class CompileResult:
    graph_module: fx.GraphModule
    reference: torch.nn.Module
    loaded: LoadedModel
    report: dict
    passed: bool
    outputs: list[str] = field(default_factory=list)
    before: fx.GraphModule | None = None  # the canonical graph before the pipeline (RunOptions.keep_before)


def input_specs_from_decls(decls: list[T.InputDecl]) -> list[InputSpec]:
    specs = []
    for d in decls:
        lo, hi = d.range if d.range else (None, None)
        specs.append(InputSpec(d.name, tuple(d.shape), DTYPE_NAMES[d.dtype], lo, hi))
    return specs


def prepare_graph(loaded: LoadedModel, dynamic: bool = True) -> tuple[fx.GraphModule, dict]:
    """Trace and canonicalize a private copy of the model (the user's module is never mutated): its own
    module objects, the user's weight tensors (rewrites create new tensors, never write into one)."""
    if loaded.exported_program is None:
        loaded = dataclasses.replace(loaded, module=share_weights_copy(loaded.module))
    traced = trace_model(loaded, copy_weights=False, dynamic=dynamic)
    gm = traced.graph_module
    canonicalize(gm, recognize=False)
    annotate_shapes(gm, loaded.example_args, loaded.example_kwargs)  # recognizers read shapes
    resolve_with_shapes(gm)  # no-op casts, shapes read from tensors, shape-only readers
    if run_recognizers(gm):
        annotate_shapes(gm, loaded.example_args, loaded.example_kwargs)
    return gm, {"method": traced.method, "notes": list(loaded.notes) + list(traced.notes)}  # how it was loaded, traced


def _tolerance(step: T.Verify | None, dtype: torch.dtype) -> Tolerance:
    tol = Tolerance.default_for(dtype)
    if step is None:
        return tol
    opts = step.options
    if "max_abs" in opts or "rel" in opts or "max_rel" in opts:
        tol = Tolerance(max_abs=opts.get("max_abs"), max_rel=opts.get("rel", opts.get("max_rel")))
    return tol


class _Runner:
    def __init__(self, program: Program, loaded: LoadedModel, options: RunOptions):
        self.program, self.loaded, self.options = program, loaded, options
        self.say = options.progress or (lambda msg: None)
        self.steps: list[StepRecord] = []
        self.exports: list[T.Export] = []
        self.stats = None
        # apply steps run so far, with the statistics in force and the sites rolled back:
        # replayed for a verify in another dtype, and to rebuild the graph before a failing step
        self.applied: list[list] = []
        self.calib_inputs: list = []
        self.warnings: list[str] = []
        self.quantized = None  # normc.quantize.run.Quantized after a `quantize` step
        self.quant_report: dict = {}

    def inputs(self, n: int, dtype: torch.dtype | None = None):
        specs = self.loaded.input_specs
        drawn = sample_inputs(specs, n, seed=self.options.seed) if n > 0 and specs else []
        n_pos = len(self.loaded.example_args)
        if len(specs) > n_pos:  # the specs past the positional ones are keyword inputs (LoadedModel)
            drawn = [(a[:n_pos], {s.name: t for s, t in zip(specs[n_pos:], a[n_pos:])}) for a, _ in drawn]
        inputs = [(tuple(self.loaded.example_args), dict(self.loaded.example_kwargs))] + list(drawn)
        return cast_inputs(inputs, dtype) if dtype is not None else inputs

    def _writes_hf_dir(self) -> bool:
        """A checkpoint directory output maps the rewritten graph onto the graph before the pipeline: that
        one is kept (its structure; the weights are shared), so the model is not traced a second time."""
        pipeline = self.program.main.pipeline
        formats = [s.format for s in (pipeline.steps if pipeline else []) if isinstance(s, T.Export)]
        if self.options.output is not None:
            try:
                formats.append(format_of(self.options.output))
            except NormcError:  # said when the outputs are written
                pass
        return "hf" in formats

    def run(self) -> CompileResult:
        t0 = time.perf_counter()
        self.say("tracing")
        gm, trace_info = self.trace()
        self.warnings += gm.meta.get("normc_trace_warnings", [])
        before = op_counts(gm)
        before_gm = share_weights_copy(gm) if self.options.keep_before or self._writes_hf_dir() else None
        # the original's outputs on the verification inputs are computed once for every step
        reference = CachedReference(self.loaded.module)
        self.verify_set = self.inputs(self.options.verify_inputs) + self.other_shapes(gm, reference, trace_info)
        pipeline = self.program.main.pipeline
        steps = list(pipeline.steps) if pipeline else []
        verifies = [s for s in steps if isinstance(s, T.Verify)]
        # `verify dtype f64`: each exact site is checked in float64 right after its step (its boundary
        # values come from the step's fp32 graph); the verify step gates on those checks
        f64_steps = [s for s in verifies if DTYPE_NAMES.get(str(s.options.get("dtype", ""))) == torch.float64]
        self.site_checks_on = not self.options.dry_run and bool(f64_steps)
        # the sites are checked on the boundary values of the first verification inputs: the example and
        # one drawn input (each is a float64 run of every site), or `verify dtype f64 samples N`
        n_site = max((int(s.options["samples"]) for s in f64_steps if "samples" in s.options), default=2)
        self.site_inputs = self.verify_set[:max(1, n_site)]
        out_dtype = self._output_dtype(self.loaded.module)
        passed = True
        failure = None
        if not self.options.dry_run and not any(s.options.get("allow_nonfinite") for s in verifies):
            failure = nonfinite_reference(reference, self.verify_set)
            if failure is not None:  # nothing can be verified against it: run no step
                passed, steps = False, []
                failure += "; check the inputs (`input x: f32[...] in LO .. HI`), or add `verify allow_nonfinite true`"
        for i, step in enumerate(steps):
            ts = time.perf_counter()
            if isinstance(step, T.Apply):
                # exact steps after an approximation are checked against the model just before them,
                # so that one is kept; otherwise it is rebuilt (deterministically) only if the step fails
                approximated = any(s.approximate for s in self.steps)
                snapshot = share_weights_copy(gm) if approximated and not self.options.dry_run else None
                record = self.apply(gm, step, check=self.site_checks_on)
                self.applied.append([step, self.stats, frozenset()])
                # tolerance in force: the next explicit verify step's, else the dtype default
                nxt = next((s for s in steps[i:] if isinstance(s, T.Verify)
                            and DTYPE_NAMES.get(str(s.options.get("dtype", "")), out_dtype) == out_dtype), None)
                tol = _tolerance(nxt, out_dtype)
                # after an approximation, an exact step must keep the model as it was before the step
                step_ref = snapshot if approximated and not record.approximate else reference
                if not self.options.dry_run and any(r.applied for r in record.rules):
                    self.say(f"verifying after `apply {step.rule}`")
                    record.verify = verify_models(step_ref, gm, self.verify_set, tol)
                    if record.approximate and self.calib_inputs:
                        # the error on the data the statistics came from, next to held-apart inputs
                        record.verify_calibration = verify_models(reference, gm, self.calib_inputs[:16], tol)
                    if not record.verify.passed and not record.approximate:
                        broken = record.verify.summary()
                        snapshot = snapshot if snapshot is not None else self.rebuild_before_last()
                        culprits = self.bisect(snapshot, step, record, step_ref, tol)
                        record.culprits = culprits
                        named = "; ".join(f"{c['rule']} at {c['site']}" for c in culprits) or "no single site"
                        if self.options.rollback and culprits:
                            gm = self.roll_back(snapshot, step, record, culprits, step_ref, tol)
                            self.applied[-1][2] = frozenset(f"{c['rule']}@{c['key']}" for c in culprits)
                            if not record.verify.passed:
                                passed = False
                                failure = failure or f"`apply {step.rule}` still fails after rolling back {named}"
                            elif self.options.strict:
                                passed = False
                                failure = failure or f"--strict: rolled back {named} (they broke equivalence: {broken})"
                        else:
                            passed = False
                            failure = failure or (f"`apply {step.rule}` broke equivalence ({broken}); responsible: {named}"
                                                  + ("" if self.options.rollback else "; rerun with --rollback to drop them"))
                        if not passed:  # later steps would only repeat this failure
                            record.seconds = time.perf_counter() - ts
                            self.steps.append(record)
                            break
                if record.checker is not None:
                    self.say(f"checking the sites of `apply {step.rule}` in float64")
                    record.site_checks = record.checker.check(gm)
                    record.checker = None
            elif isinstance(step, T.Quantize):  # INT8 (normc/quantize): planned and simulated, graph unchanged
                record = StepRecord(f"quantize {step.precision}")
                if not self.options.dry_run:
                    from ..quantize.step import run_quantize
                    self.say("quantizing (plan, calibration, simulation)")
                    self.quantized, self.quant_report = run_quantize(self, gm, step)
            elif isinstance(step, T.Verify) and self.quantized is not None:
                record = StepRecord("verify int8")
                if not self.options.dry_run:
                    from ..quantize.step import verify_quantized
                    self.say("verifying the INT8 model on held-apart inputs")
                    ok, why, measured = verify_quantized(self, self.quantized, step)
                    self.quant_report.setdefault("verify", []).append(measured)
                    if not ok:
                        passed = False
                        failure = failure or why
            elif isinstance(step, T.Verify):
                record = StepRecord("verify")
                f64 = DTYPE_NAMES.get(str(step.options.get("dtype", ""))) == torch.float64
                if f64 and not self.options.dry_run and not any(
                        r.applied for s in self.steps for r in s.rules if r.kind == "exact"):
                    # the model is unchanged by exact rewrites: nothing to check, and no pass is claimed
                    record.note = "no exact site was rewritten: nothing to check in float64"
                elif not self.options.dry_run:
                    last = self.steps[-1] if self.steps else None
                    if last is not None and last.verify is not None and last.verify.sites is None and \
                            last.step.startswith("apply") and not any(s.approximate for s in self.steps) and \
                            self._same_check(step, last.verify, out_dtype):
                        # the graph has not changed since the step's own check, on the same inputs, with this
                        # step's tolerance (a step is checked with the next verify's): the same result
                        record.verify = last.verify
                    else:
                        record.verify = self.verify_step(reference, gm, step, out_dtype)
                    if record.verify.sites is not None:  # per-site float64: the failing sites are the culprits
                        record.culprits = [{"rule": c.rule, "site": c.site, "key": c.key,
                                            "local_error": None if c.reason else c.max_rel_err}
                                           | ({"reason": c.reason} if c.reason else {})
                                           for c in record.verify.sites if not c.passed(record.verify.tolerance)]
                    approximated = any(s.approximate for s in self.steps)
                    # after an approximate rewrite the exact tolerance cannot hold; its gate decides
                    if not record.verify.passed and not approximated:
                        passed = False
                        failure = failure or f"verify failed: {record.verify.summary()}"
                    gate = self.approx_gate(step, record.verify)
                    if gate is not None and not gate[0]:
                        passed = False
                        failure = failure or gate[1]
                    elif approximated and gate is None:
                        passed = False
                        failure = failure or ("an approximate rewrite ran but no gate bounds its error: "
                                              "add `verify approx max_rel X`")
            elif isinstance(step, T.Export):
                record = StepRecord(f"export {step.format}")
                self.exports.append(step)
            elif isinstance(step, T.Calibrate):
                record = StepRecord("calibrate")
                self.calibrate(gm, step)
            else:  # pragma: no cover - the checker knows every step
                raise NormcError(f"unknown step {type(step).__name__}")
            record.seconds = time.perf_counter() - ts
            self.steps.append(record)
        final = None
        if not verifies and not self.options.dry_run:
            self.say("verifying")
            final = verify_models(reference, gm, self.verify_set, _tolerance(None, out_dtype))
            approx_steps = any(s.approximate for s in self.steps)
            if not final.passed and not approx_steps:
                passed = False
                failure = failure or f"verification failed: {final.summary()}"
        last_gate = max((i for i, s in enumerate(steps) if isinstance(s, T.Verify) and s.approx), default=-1)
        ungated = [s for i, s in enumerate(steps) if isinstance(s, T.Apply) and i > last_gate
                   and any(self.program.rules[n].kind == "approximate" for n in self.program.resolve(s.rule))]
        if ungated and passed and not self.options.dry_run:
            passed = False
            failure = failure or (f"`apply {ungated[0].rule}` is approximate and no gate after it bounds its error: "
                                  "add `verify approx max_rel X` after it")
        last_verify = final or next((s.verify for s in reversed(self.steps) if s.verify is not None), None)
        rules = [r for s in self.steps for r in s.rules]
        nothing = None
        if any(isinstance(s, T.Apply) for s in steps) and not any(r.applied for r in rules) and not self.options.dry_run:
            nothing = nothing_rewritten(rules)
            if self.options.require_applied and passed:
                passed = False
                failure = f"{nothing['message']} (--require-applied)"
        report = {
            "normc_version": _version(),
            "rules_file": self.program.main.file,
            "model": self.loaded.source,
            "trace": trace_info,
            "rules": [r.to_dict() for r in rules],
            "steps": [s.to_dict() for s in self.steps],
            "verify": _verify_summary(last_verify, passed, failure),
            "warnings": list(self.warnings),
            "graph": {"before": {"op_counts": before}, "after": {"op_counts": op_counts(gm)}},
            "outputs": [],
            "seconds": 0.0,
        }
        if nothing is not None:
            report["nothing_rewritten"] = nothing
        if self.quant_report:
            report["quantize"] = self.quant_report
        report["rolled_back"] = [c for s in self.steps for c in getattr(s, "rolled_back", [])]
        report["culprits"] = [c for s in self.steps for c in getattr(s, "culprits", [])]
        result = CompileResult(gm, self.loaded.module, self.loaded, report, passed, before=before_gm)
        if passed and self.options.write and not self.options.dry_run:
            write_outputs(self, result)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return result

    def trace(self) -> tuple[fx.GraphModule, dict]:
        """The canonical graph the pipeline rewrites, and how it was traced (the streaming executor hands
        in the one it traced already)."""
        return prepare_graph(self.loaded, dynamic=not self.options.static)

    def other_shapes(self, gm, reference, trace_info: dict):
        """Verification inputs at two shapes other than the example's, when the graph is dynamic; the
        original runs there first (cached for verification): a shape it refuses is not used. A
        symbolic_trace graph keeps symbolic only the dims verified this way."""
        dyn = gm.meta.get("normc_dynamic")
        trace_info["dynamic"] = dyn.describe() if dyn is not None else {}
        if dyn is None:
            return []
        notes = trace_info["notes"]
        def runs(args, kwargs):
            """The original takes the shape, and so does its trace (torch.export's guards may fix a
            relation between sizes that the eager model computes around, e.g. DINOv2's patch count)."""
            reference.outputs(args, kwargs)
            try:
                run_model(gm, args, kwargs)
            except Exception as e:
                raise RuntimeError(f"its trace refuses it: {type(e).__name__}: {str(e).strip()[:160]}") from e
        found, varied = inputs_at_other_shapes(dyn, tuple(self.loaded.example_args), dict(self.loaded.example_kwargs),
                                               specs=self.loaded.input_specs, seed=self.options.seed,
                                               check=runs, notes=notes)
        if not dyn.confirmed:
            dyn = dyn.restrict(varied)
            gm.meta["normc_dynamic"] = dyn if dyn.symbolic else None
            trace_info["dynamic"] = dyn.describe()
        example = (tuple(self.loaded.example_args), dict(self.loaded.example_kwargs))
        trace_info["verified_shapes"] = [_shapes(a, k, dyn.names) for a, k in [example] + found]
        return found

    # -------------------------------------------------------------- steps
    def apply(self, gm, step: T.Apply, loaded: LoadedModel | None = None, stats="current",
              exclude: set = frozenset(), check: bool = False) -> StepRecord:
        """`check`: record the step's sites for the per-site float64 check (record.checker)."""
        loaded = loaded or self.loaded
        record = StepRecord(f"apply {step.rule}" + (f" on \"{step.scope}\"" if step.scope else ""))
        ctx = EvalContext(gm, self.stats if stats == "current" else stats)
        checker = record.checker = SiteChecker(self.site_inputs) if check and not self.options.dry_run else None
        for name in self.program.resolve(step.rule):
            rule = self.program.rules[name]
            args = self._args(rule, step)
            self.say(f"applying {name}")
            if isinstance(rule, T.ExternPass):
                rep = _run_extern(rule, gm, ctx, args, step.scope, self, loaded, checker)
                if checker is not None and rule.kind == "exact" and rep.applied and not _observes(rule):
                    record.unchecked.append(rule.qualname)
            else:
                mine = {k.split("@", 1)[1] for k in exclude if k.split("@", 1)[0] == name}
                rep = apply_rule(gm, rule, args, step.scope, ctx, exclude=mine, dry_run=self.options.dry_run,
                                 observer=checker)
            record.rules.append(rep)
            record.approximate |= rule.kind == "approximate"
            if not self.options.dry_run and rep.applied:
                annotate_shapes(gm, loaded.example_args, loaded.example_kwargs)
        return record

    def _args(self, rule, step: T.Apply) -> dict:
        ev = Evaluator(EvalContext(None), {})
        args = {}
        for p, a in zip(rule.params, step.args):
            args[p.name] = ev.eval(a)
        names = {p.name for p in rule.params}
        for k, v in step.kwargs:
            if k in names:
                args[k] = ev.eval(v)
        return args

    # -------------------------------------------------------------- bisection and rollback
    def rebuild_before_last(self) -> fx.GraphModule:
        """The graph as it was before the last apply step: traced again and every earlier step
        replayed (tracing and rules are deterministic, so node names and sites are the same)."""
        self.say("rebuilding the graph before the failing step")
        gm, _ = prepare_graph(self.loaded, dynamic=not self.options.static)
        for step, stats, exclude in self.applied[:-1]:
            self.apply(gm, step, stats=stats, exclude=exclude)
        return gm

    def _retry(self, snapshot, step, exclude: set, reference, tol, inputs, check: bool = False):
        gm = share_weights_copy(snapshot)
        record = self.apply(gm, step, exclude=exclude, check=check)
        return gm, record, verify_models(reference, gm, inputs, tol)

    def bisect(self, snapshot, step, record, reference, tol) -> list[dict]:
        """The sites of this step that break equivalence: bisection over the recorded sites
        (each test re-applies the step from the snapshot with some sites excluded)."""
        sites = [(r.name, s) for r in record.rules for s in r.sites]
        if not sites:
            return []
        inputs = self.verify_set[:2]
        keys = [f"{rule}@{s.key}" for rule, s in sites]
        self.say(f"bisecting {len(keys)} sites of `apply {step.rule}`")
        tests = 0

        def fails(kept: list[str]) -> bool:
            nonlocal tests
            tests += 1
            _, _, v = self._retry(snapshot, step, set(keys) - set(kept), reference, tol, inputs)
            return not v.passed

        def search(cands: list[str]) -> list[str]:
            if len(cands) == 1:
                return cands
            half = len(cands) // 2
            a, b = cands[:half], cands[half:]
            found = (search(a) if fails(a) else []) + (search(b) if fails(b) else [])
            return found or cands  # only together: report the whole group

        if fails([]):  # broken with none of this step's sites: the failure came before this step
            return []
        if not fails(keys):  # flaky: the full re-application passes
            return []
        bad = search(keys)
        by_key = dict(zip(keys, sites))
        culprits = []
        for i, k in enumerate(bad):
            rule, site = by_key[k]
            culprits.append({"rule": rule, "site": site.site, "key": site.key,
                             # error at the site's own boundary, with only this site applied (first few sites)
                             "local_error": self.local_error(snapshot, k, set(keys), step, reference) if i < 8 else None})
        record.bisection_tests = tests
        return culprits

    def local_error(self, snapshot, key, all_keys: set, step, reference) -> float | None:
        """Error at the site's boundary: the replaced value before vs after, on one input, only this site applied."""
        try:
            gm, record, _ = self._retry(snapshot, step, all_keys - {key}, reference, Tolerance(max_rel=1.0), self.verify_set[:1])
            pairs = {o: n for r in record.rules for s in r.sites if f"{r.name}@{s.key}" == key for o, n in s.replaced.items()}
            if not pairs:
                return None
            args, kwargs = self.verify_set[0]
            got_old, got_new = {}, {}
            from ..ir.graph import run_recording
            run_recording(snapshot, args, kwargs, lambda n, v: got_old.__setitem__(n.name, v) if n.name in pairs else None)
            run_recording(gm, args, kwargs, lambda n, v: got_new.__setitem__(n.name, v) if n.name in pairs.values() else None)
            worst = 0.0
            for old, new in pairs.items():
                a, b = got_old.get(old), got_new.get(new)
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                    a64, b64 = a.double(), b.double()
                    worst = max(worst, float((a64 - b64).abs().max() / a64.abs().max().clamp_min(1e-30)))
            return worst
        except Exception:  # attribution is a diagnostic: never let it mask the real failure
            return None

    def roll_back(self, snapshot, step, record, culprits, reference, tol):
        exclude = {f"{c['rule']}@{c['key']}" for c in culprits}
        self.say(f"rolling back {len(exclude)} site(s)")
        gm, again, v = self._retry(snapshot, step, exclude, reference, tol, self.verify_set, check=self.site_checks_on)
        record.rules, record.verify, record.checker, record.unchecked = again.rules, v, again.checker, again.unchecked
        record.rolled_back = culprits
        return gm

    def verify_step(self, reference, gm, step: T.Verify, out_dtype) -> VerifyResult:
        opts = step.options
        n = int(opts.get("samples", self.options.verify_inputs))
        dtype = DTYPE_NAMES.get(str(opts.get("dtype", "")), None)
        inputs = self.inputs(n) if n != self.options.verify_inputs else self.verify_set
        if dtype == torch.float64:
            return self.sites_in_f64(_tolerance(step, dtype))
        if dtype is not None and dtype != out_dtype:
            return self.replay_in(dtype, inputs, _tolerance(step, dtype))
        return verify_models(reference, gm, inputs, _tolerance(step, out_dtype))

    def _same_check(self, step: T.Verify, done: VerifyResult, out_dtype) -> bool:
        opts = step.options
        dtype = DTYPE_NAMES.get(str(opts.get("dtype", "")), out_dtype)
        samples = int(opts.get("samples", self.options.verify_inputs))
        return dtype == out_dtype and samples == self.options.verify_inputs and \
            done.n_inputs == len(self.verify_set) and done.tolerance == _tolerance(step, out_dtype)

    def sites_in_f64(self, tol: Tolerance) -> VerifyResult:
        """`verify dtype f64`: the float64 checks of every exact site rewritten so far (each site's original
        and replacement evaluated in float64 on the boundary values of the fp32 run). A site that could not
        be checked fails it, and so does a check that covered no site."""
        results = [c for s in self.steps for c in s.site_checks]
        for s in self.steps:
            for rule in s.unchecked:
                results.append(SiteResult(rule, "(whole pass)", rule, "", math.nan, math.nan, False, 0,
                                          reason="this pass does not record its sites for a per-site check"))
        checked = [r for r in results if r.reason is None]
        worst_rel = max((r.max_rel_err for r in checked), default=0.0)
        worst_abs = max((r.max_abs_err for r in checked), default=0.0)
        passed = bool(checked) and all(r.passed(tol) for r in results)
        n_inputs = max((r.n_inputs for r in checked), default=0)
        return VerifyResult(passed, worst_abs, worst_rel, 1.0, n_inputs, tol, [], sites=results)

    def replay_in(self, dtype, inputs, tol) -> VerifyResult:
        """Run the conversion itself in `dtype`: a copy of the model in that dtype, traced anew
        (so graph constants have that dtype too), with every apply step so far replayed."""
        self.say(f"replaying the pipeline in {dtype}")
        loaded = dataclasses.replace(
            self.loaded, module=copy.deepcopy(self.loaded.module).to(dtype), exported_program=None,
            example_args=cast_inputs([(tuple(self.loaded.example_args), {})], dtype)[0][0],
            example_kwargs=cast_inputs([((), dict(self.loaded.example_kwargs))], dtype)[0][1],
            input_specs=[dataclasses.replace(s, dtype=dtype) if s.dtype.is_floating_point else s
                         for s in self.loaded.input_specs])
        gm, _ = prepare_graph(loaded, dynamic=not self.options.static)
        applied_here = applied_there = 0
        for step, stats, exclude in self.applied:  # a fresh trace has the same node names: statistics still apply
            replayed = self.apply(gm, step, loaded=loaded, stats=stats, exclude=exclude)
            applied_here += sum(r.applied for r in replayed.rules)
        applied_there = sum(r.applied for s in self.steps for r in s.rules)
        result = verify_models(loaded.module, gm, cast_inputs(inputs, dtype), tol)
        if applied_here != applied_there:
            # e.g. HF RMSNorm upcasts to float32 inside: in a float64 copy that cast is real, the
            # chain is not an RMSNorm any more, and the fold does not apply. Say so; claim nothing.
            self.warnings.append(f"the {dtype} replay rewrote {applied_here} of the run's {applied_there} site(s): "
                                 f"its error ({result.max_rel_err:.3g}) covers only those")
        return result

    def approx_gate(self, step: T.Verify, now: VerifyResult):
        approx_steps = [s for s in self.steps if s.approximate and s.verify is not None]
        if not step.approx or not approx_steps:
            return None
        # the model as it is now against the original: every approximation so far
        rel = step.approx.get("max_rel", step.approx.get("rel"))
        if rel is not None and now.max_rel_err > float(rel):
            return False, f"approximate rewrite error {now.max_rel_err:.3g} (relative) exceeds the gate approx max_rel {rel}"
        if "max_abs" in step.approx and now.max_abs_err > float(step.approx["max_abs"]):
            return False, (f"approximate rewrite error {now.max_abs_err:.3g} (absolute) exceeds the gate "
                           f"approx max_abs {step.approx['max_abs']}")
        if "cosine" in step.approx and now.min_cosine < float(step.approx["cosine"]):
            return False, f"cosine {now.min_cosine:.6f} is below the gate approx cosine {step.approx['cosine']}"
        return True, ""

    def calibrate(self, gm, step: T.Calibrate):
        from ..verify.calibrate import calibration_inputs, collect
        self.say(f"calibrating on {step.source}")
        inputs = calibration_inputs(self.loaded, step.source, step.samples, Path(self.program.main.file).parent,
                                    seed=self.options.seed + 1)  # random calibration inputs differ from verification's
        if not inputs:
            raise NormcError(f"calibration data `{step.source}` holds no samples")
        self.stats = collect(gm, inputs)
        self.stats.source = step.source
        self.calib_inputs = inputs

    @staticmethod
    def _output_dtype(module) -> torch.dtype:
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def _extern_fn(rule: T.ExternPass):
    return resolve_pass(rule.impl)  # checked with the program; only a declared pass runs


def _observes(rule: T.ExternPass) -> bool:
    """Whether a global pass records its sites (blocks) for the per-site float64 check."""
    return "observer" in inspect.signature(_extern_fn(rule)).parameters


def _run_extern(rule: T.ExternPass, gm, ctx, args, scope, runner, loaded, observer=None) -> RuleReport:
    fn = _extern_fn(rule)
    extra = {"observer": observer} if observer is not None and _observes(rule) else {}
    report = fn(gm, ctx=ctx, scope=scope, loaded=loaded, dry_run=runner.options.dry_run, **args, **extra)
    report.name, report.kind = rule.qualname, rule.kind
    return report


def share_weights_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a module (a graph module, a model) that shares its parameters and buffers: rewrites create
    new tensors and never write into existing ones, so a snapshot needs no copy of the weights."""
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def _shapes(args, kwargs, names) -> dict:
    from ..frontend.shapes import tensor_leaves
    leaves, _ = tensor_leaves(args, kwargs)
    names = list(names) + [f"input_{i}" for i in range(len(names), len(leaves))]
    return {n: list(t.shape) for n, t in zip(names, leaves) if isinstance(t, torch.Tensor)}


def nothing_rewritten(rules) -> dict:
    """The report of a run whose rules rewrote no site: the main reasons, most frequent first."""
    from collections import Counter
    reasons: Counter = Counter()
    for r in rules:
        for s in r.skipped:
            reasons[f"{r.name}: {s.reason}"] += 1
    if not reasons:
        for r in rules:
            for note in r.notes:
                reasons[f"{r.name}: {note}"] += 1
    if not reasons:
        for r in rules:
            for s in r.near_misses:
                reasons[f"{r.name}: near miss: {s.reason}"] += 1
    if not reasons:
        reasons.update({f"{r.name}: its pattern matches nowhere in the model": 1 for r in rules})
    top = [{"reason": k, "sites": n} for k, n in reasons.most_common(3)]
    return {"message": "no site was rewritten", "reasons": top,
            "skipped": sum(len(r.skipped) for r in rules), "near_misses": sum(len(r.near_misses) for r in rules)}


def _verify_summary(v: VerifyResult | None, passed: bool, failure: str | None) -> dict:
    d = {"passed": passed, "failure": failure}
    if v is not None:
        vd = v.to_dict()
        d.update({"max_abs_err": vd.get("max_abs_err"), "max_rel_err": vd.get("max_rel_err"),
                  "min_cosine": vd.get("min_cosine"), "n_inputs": vd.get("n_inputs"),
                  "tolerance": vd.get("tolerance"), "outputs": vd.get("outputs")})
    return d


def _version() -> str:
    from .. import __version__
    return __version__


def compile_model(program: Program, loaded: LoadedModel, options: RunOptions | None = None) -> CompileResult:
    """Run `program`'s pipeline on `loaded` (load it with the program's `input` declarations as its specs)."""
    options = options or RunOptions()
    if options.write:
        check_export_paths(program, options.output, options.allow_outside_writes)  # before any work
    check_data_paths(program, options.allow_outside_reads)
    return _Runner(program, loaded, options).run()
