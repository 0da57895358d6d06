"""Static checks of a loaded program, before any model is touched.

Unknown op / rule / function names (with the nearest valid name), wrong arity, unbound
variables, and type errors (a `where` that is not a condition, arithmetic on strings,
ops called outside `rewrite`). All errors are collected and reported together.
"""
from __future__ import annotations

import math

from ..ir.builtins import BUILTINS, CONSTANTS, EvalContext, RefuseSite
from ..ir.evaluate import FANOUT_REDUCTION, Evaluator
from ..ir.ops import all_pattern_names, schema_for
from ..passes.registry import PassNotFound, resolve_pass
from . import syntax_tree as T
from .diagnostics import Diagnostic, NcError, did_you_mean
from .literals import finite_number
from .loader import Program

PARAM_TYPES = {"float", "int", "bool", "string", "str"}
VERIFY_OPTIONS = {"max_abs", "rel", "max_rel", "samples", "dtype", "seed", "cosine", "allow_nonfinite", "data"}
APPROX_OPTIONS = {"max_abs", "max_rel", "rel", "cosine", "min_cosine", "mean_cosine"}
EXPORT_FORMATS = {"torch": {"opset"}, "onnx": {"opset", "check", "dynamic", "quantize"}, "tensorrt": {"opset", "fp16", "workspace_gb"},
                  "safetensors": set()}
INPUT_DTYPES = {"f32", "f64", "f16", "bf16", "i64", "i32", "bool"}
KINDS = {"exact", "approximate", "structural"}
VERIFY_DTYPES = {"f32", "f64", "f16", "bf16"}
OPTION_EXAMPLES = {"rel": "rel 1e-4", "max_rel": "max_rel 1e-4", "max_abs": "max_abs 1e-5", "cosine": "cosine 0.999",
                   "samples": "samples 8", "seed": "seed 0", "dtype": "dtype f64",
                   "allow_nonfinite": "allow_nonfinite true"}
MIN_OPSET, MAX_OPSET = 7, 30

BOOL, NUM, TENSOR, STR, SHAPE, ANY, NODE, NONE = "bool", "number", "tensor", "string", "shape", "any", "node", "none"


class Checker:
    def __init__(self, program: Program):
        self.program = program
        self.diags: list[Diagnostic] = []
        self.module: T.Module | None = None

    def error(self, loc, message, hint=None):
        self.diags.append(Diagnostic(loc, message, hint, self.module.source if self.module else None))

    # ------------------------------------------------------------------ entry
    def run(self):
        for module in self.program.modules:
            self.module = module
            for decl in module.inputs:
                if decl.dtype not in INPUT_DTYPES:
                    self.error(decl.loc, f"unknown dtype `{decl.dtype}` in input `{decl.name}`",
                               did_you_mean(decl.dtype, INPUT_DTYPES) or f"use one of {', '.join(sorted(INPUT_DTYPES))}")
            for rule in module.rules:
                self.check_rule(rule)
            for p in module.passes:
                if not p.impl.startswith("normc.passes."):
                    self.error(p.loc, f"pass `{p.name}` must be implemented inside normc.passes",
                               "global passes are part of normc; write a `rule` for your own rewrites")
                    continue
                try:
                    resolve_pass(p.impl)
                except PassNotFound as err:
                    self.error(p.loc, f"pass `{p.name}`: {err.message}", err.hint)
            if module.pipeline is not None:
                self.check_pipeline(module.pipeline)
        if self.diags:
            raise NcError(self.diags, None)

    # ------------------------------------------------------------------ rules
    def check_rule(self, rule: T.Rule):
        self.each_vars: dict[str, dict[str, str]] = {}
        if rule.kind not in KINDS:
            self.error(rule.loc, f"unknown rule kind `{rule.kind}`")
        scope: dict[str, str] = {}
        for p in rule.params:
            if p.type not in PARAM_TYPES:
                self.error(p.loc, f"unknown parameter type `{p.type}`", did_you_mean(p.type, PARAM_TYPES))
            elif p.default is not T.NO_DEFAULT and p.default is not None:
                kind = BOOL if isinstance(p.default, bool) else NUM if isinstance(p.default, (int, float)) else STR
                self.check_param_type(p, kind, p.loc, rule.name)
            scope[p.name] = {"float": NUM, "int": NUM, "bool": BOOL}.get(p.type, STR)
        if not rule.match:
            self.error(rule.loc, f"rule `{rule.name}` has no `match` clause", "add `match y = op(...)`")
            return
        stmt_targets = [s.target for s in rule.match if isinstance(s, T.MatchStmt)]
        for t in set(stmt_targets):
            if stmt_targets.count(t) > 1:
                s = [s for s in rule.match if isinstance(s, T.MatchStmt) and s.target == t][1]
                self.error(s.loc, f"`{t}` is matched twice", "give each statement its own name")
        op_uses: dict[str, int] = {}
        each_vars: dict[str, dict[str, str]] = {}
        for stmt in rule.match:
            if isinstance(stmt, T.MatchStmt):
                self.check_pcall(stmt.call, scope, op_uses, stmt_targets)
                scope[stmt.target] = NODE
        for stmt in rule.match:
            if isinstance(stmt, T.EachStmt):
                if stmt.source not in scope:
                    self.error(stmt.loc, f"`{stmt.source}` is not bound by the match",
                               did_you_mean(stmt.source, scope))
                local: dict[str, str] = {}
                self.check_pcall(stmt.body.call, local, {}, stmt_targets, outer=scope)
                local[stmt.body.target] = NODE
                local[stmt.var] = NODE
                each_vars[stmt.var] = local
                self.each_vars[stmt.var] = local
        for op, count in op_uses.items():
            if count == 1 and op not in scope:
                scope[op] = NODE  # a nested op is named by its op name in guards: single_use(conv)
        if rule.where is not None:
            t = self.expr(rule.where, scope, "where")
            if t not in (BOOL, ANY):
                self.error(rule.where.loc, "the `where` clause is not a condition",
                           "compare values (==, <, ...) or call a guard such as single_use(x)")
        for let in rule.lets:
            if let.name in scope:
                self.error(let.loc, f"`{let.name}` is already bound", "choose another name for the `let`")
            scope[let.name] = self.expr(let.expr, scope, "let")
        if not rule.rewrites and rule.kind != "structural":
            self.error(rule.loc, f"rule `{rule.name}` has no `rewrite` clause", "add `rewrite y = op(...)`")
        for rw in rule.rewrites:
            env = dict(scope)
            if rw.each is not None:
                if rw.each not in each_vars:
                    self.error(rw.loc, f"`each {rw.each}` names no fan-out of the match",
                               did_you_mean(rw.each, each_vars) or "declare it with `each u in users(h): ...` in the match")
                    continue
                env.update(each_vars[rw.each])
            if rw.target in env and env[rw.target] != NODE:
                self.error(rw.loc, f"`{rw.target}` is not a graph value: a rewrite names a matched value or a new one")
                continue
            self.check_rewrite_expr(rw.expr, env)
            if rw.target not in env and rw.each is None:
                later = rule.rewrites[rule.rewrites.index(rw) + 1:]
                if not any(rw.target in _names_in(r.expr) for r in later):
                    self.error(rw.loc, f"`{rw.target}` is not matched by the pattern and no later rewrite reads it",
                               did_you_mean(rw.target, [k for k, v in env.items() if v == NODE])
                               or "rewrite a matched value, or read the new value in a later rewrite")
                scope[rw.target] = NODE  # a new value, usable by the rewrites after it

    def check_pcall(self, pc: T.PCall, scope, op_uses, stmt_targets, outer=None):
        found = schema_for(pc.op)
        if found is None:
            self.error(pc.loc, f"unknown op `{pc.op}`",
                       did_you_mean(pc.op, all_pattern_names()) or "see `normc passes --ops` for the canonical ops")
            return
        schema, _ = found
        op_uses[pc.op] = op_uses.get(pc.op, 0) + 1
        slots = schema.slots
        n_ops = len(schema.operands)
        if len(pc.args) > len(slots):
            self.error(pc.loc, f"`{pc.op}` takes at most {len(slots)} arguments ({', '.join(slots)}); got {len(pc.args)}")
        given = slots[:len(pc.args)] + [k for k, _ in pc.kwargs]
        missing = [o.name for o in schema.operands if o.name not in given]
        if missing:
            self.error(pc.loc, f"`{pc.op}` takes {n_ops} operands ({', '.join(o.name for o in schema.operands)}); "
                               f"{', '.join('`' + m + '`' for m in missing)} not given",
                       "write `name?` for an optional operand or `_` to ignore one")
        for key, _ in pc.kwargs:
            if key not in slots:
                self.error(pc.loc, f"`{pc.op}` has no argument `{key}`", did_you_mean(key, slots) or f"its arguments: {', '.join(slots)}")
        for i, arg in enumerate(list(pc.args) + [v for _, v in pc.kwargs]):
            if isinstance(arg, T.PCall):
                self.check_pcall(arg, scope, op_uses, stmt_targets, outer)
            elif isinstance(arg, T.PVar):
                if arg.name in CONSTANTS:
                    self.error(arg.loc, f"`{arg.name}` is a built-in name", "choose another variable name")
                if arg.name not in stmt_targets:
                    scope.setdefault(arg.name, NODE)

    # ------------------------------------------------------------------ expressions
    def expr(self, e, scope, where: str) -> str:
        if isinstance(e, T.Num):
            return NUM
        if isinstance(e, T.Str):
            return STR
        if isinstance(e, T.Const):
            return BOOL if isinstance(e.value, bool) else NONE
        if isinstance(e, T.ListLit):
            for i in e.items:
                self.expr(i, scope, where)
            return SHAPE
        if isinstance(e, T.Name):
            if e.id in scope:
                return scope[e.id]
            if e.id in CONSTANTS:
                return STR
            self.error(e.loc, f"`{e.id}` is not bound", did_you_mean(e.id, list(scope) + list(CONSTANTS))
                       or "bind it in the `match` or a `let`")
            return ANY
        if isinstance(e, T.Unary):
            t = self.expr(e.operand, scope, where)
            if e.op == "not":
                if t not in (BOOL, ANY, NODE):
                    self.error(e.loc, "`not` needs a condition")
                return BOOL
            if t in (STR, BOOL):
                self.error(e.loc, f"cannot negate a {t}")
            return t
        if isinstance(e, T.Binary):
            lt, rt = self.expr(e.left, scope, where), self.expr(e.right, scope, where)
            if e.op in ("and", "or"):
                for side, t in ((e.left, lt), (e.right, rt)):
                    if t not in (BOOL, ANY):
                        self.error(side.loc, f"`{e.op}` needs conditions on both sides; this is a {t}")
                return BOOL
            if e.op in ("==", "!=", "<", "<=", ">", ">="):
                return BOOL
            if e.op == "??":
                return rt if lt in (NODE, NONE) else lt
            for side, t in ((e.left, lt), (e.right, rt)):
                if t in (STR, BOOL, SHAPE):
                    self.error(side.loc, f"`{e.op}` cannot take a {t}")
            return TENSOR if TENSOR in (lt, rt) or NODE in (lt, rt) else (ANY if ANY in (lt, rt) else NUM)
        if isinstance(e, T.Index):
            self.expr(e.value, scope, where)
            for it in e.items:
                if isinstance(it, T.Slice):
                    for p in (it.start, it.stop, it.step):
                        if p is not None:
                            self.expr(p, scope, where)
                elif not isinstance(it, T.Ellipsis_):
                    self.expr(it, scope, where)
            return ANY
        if isinstance(e, T.Call):
            return self.call(e, scope, where)
        return ANY

    def call(self, e: T.Call, scope, where):
        red = FANOUT_REDUCTION.fullmatch(e.func)
        if red and red.group(2) in getattr(self, "each_vars", {}) and e.func not in BUILTINS:
            if len(e.args) != 1 or e.kwargs:
                self.error(e.loc, f"`{e.func}` takes one expression, evaluated for every user of the fan-out")
                return TENSOR
            inner = dict(scope)
            inner.update(self.each_vars[red.group(2)])
            self.expr(e.args[0], inner, where)
            return TENSOR
        if schema_for(e.func) is not None:
            self.error(e.loc, f"op `{e.func}` cannot be called in `{where}`",
                       "ops build graph nodes only in `rewrite`; use a function such as sqrt or absmax here")
            return ANY
        b = BUILTINS.get(e.func)
        if b is None:
            self.error(e.loc, f"unknown function `{e.func}`", did_you_mean(e.func, list(BUILTINS) + all_pattern_names())
                       or "see the language reference in the README")
            return ANY
        if not (b.min_args <= len(e.args) <= b.max_args):
            n = f"{b.min_args}" if b.min_args == b.max_args else f"{b.min_args} to {b.max_args}"
            self.error(e.loc, f"`{e.func}` takes {n} arguments; got {len(e.args)}")
        for k, _ in e.kwargs:
            if k not in b.kwargs:
                self.error(e.loc, f"`{e.func}` has no keyword `{k}`", did_you_mean(k, b.kwargs))
        for a in list(e.args) + [v for _, v in e.kwargs]:
            self.expr(a, scope, where)
        if b.guard and where != "where":
            self.error(e.loc, f"`{e.func}` is a guard: it belongs in `where`")
        return b.returns if b.returns != "tensor" else TENSOR

    def check_rewrite_expr(self, e, scope):
        if isinstance(e, T.Name):
            if scope.get(e.id) != NODE:
                self.error(e.loc, f"`{e.id}` is not a matched value", "a rewrite produces an op call or a matched value")
            return
        if not (isinstance(e, T.Call) and schema_for(e.func) is not None):
            self.error(e.loc, "a rewrite must produce an op call (e.g. `conv(x, w2, b2)`) or a matched value")
            return
        self.check_op_call(e, scope)

    def check_op_call(self, e: T.Call, scope):
        schema, _ = schema_for(e.func)
        slots = schema.slots
        if len(e.args) > len(slots):
            self.error(e.loc, f"`{e.func}` takes at most {len(slots)} arguments ({', '.join(slots)}); got {len(e.args)}")
        given = slots[:len(e.args)] + [k for k, _ in e.kwargs]
        missing = [o.name for o in schema.operands if not o.optional and o.name not in given]
        if missing:
            self.error(e.loc, f"`{e.func}` needs {', '.join('`' + m + '`' for m in missing)}")
        for k, _ in e.kwargs:
            if k not in slots:
                self.error(e.loc, f"`{e.func}` has no argument `{k}`", did_you_mean(k, slots))
        for a in list(e.args) + [v for _, v in e.kwargs]:
            if isinstance(a, T.Call) and schema_for(a.func) is not None:
                self.check_op_call(a, scope)
            else:
                self.expr(a, scope, "rewrite")

    _TYPE_OF = {"float": (NUM,), "int": (NUM,), "bool": (BOOL,), "string": (STR,), "str": (STR,)}

    def check_param_type(self, param: T.Param, t: str, loc, rule: str):
        allowed = self._TYPE_OF.get(param.type, ())
        if t not in allowed + (ANY,):
            self.error(loc, f"`{param.name}` of `{rule}` is a {param.type}; this is a {t}")

    # ------------------------------------------------------------------ pipeline
    def check_pipeline(self, pipe: T.Pipeline):
        for step in pipe.steps:
            if isinstance(step, T.Apply):
                names = self.program.resolve(step.rule)
                if not names:
                    self.error(step.loc, f"unknown rule `{step.rule}`",
                               did_you_mean(step.rule, self.program.names()) or "run `normc passes` to list the rules")
                    continue
                if len(names) == 1:
                    rule = self.program.rules[names[0]]
                    params = {p.name: p for p in rule.params}
                    if len(step.args) > len(rule.params):
                        self.error(step.loc, f"`{step.rule}` takes {len(rule.params)} parameters; got {len(step.args)}")
                    given = {p.name: a for p, a in zip(rule.params, step.args)}
                    for k, v in step.kwargs:
                        if k not in params:
                            self.error(v.loc, f"`{step.rule}` has no parameter `{k}`",
                                       did_you_mean(k, params) or f"its parameters: {', '.join(params) or 'none'}")
                        else:
                            given[k] = v
                    for p in rule.params:
                        if p.default is T.NO_DEFAULT and p.name not in given:
                            self.error(step.loc, f"`{step.rule}` needs a value for `{p.name}`",
                                       f"write `apply {step.rule}({p.name} = ...)`")
                    for name, a in given.items():
                        before = len(self.diags)
                        t = self.expr(a, {}, "apply")
                        self.check_param_type(params[name], t, a.loc, step.rule)
                        if len(self.diags) == before:
                            self.check_constant(a, name, step.rule)
                elif step.args:
                    self.error(step.loc, f"`{step.rule}` is a group of rules: pass parameters by name")
                else:
                    for k, v in step.kwargs:
                        lacking = [n for n in names if k not in {p.name for p in self.program.rules[n].params}]
                        if lacking:
                            self.error(v.loc, f"`{lacking[0]}` in group `{step.rule}` has no parameter `{k}`")
            elif isinstance(step, T.Verify):
                for k, v in step.options.items():
                    if k not in VERIFY_OPTIONS:
                        self.error(step.loc, f"unknown verify option `{k}`", did_you_mean(k, VERIFY_OPTIONS))
                    else:
                        self.check_option_value("verify", k, v, step.loc)
                for k, v in step.approx.items():
                    if k not in APPROX_OPTIONS:
                        self.error(step.loc, f"unknown approx gate `{k}`", did_you_mean(k, APPROX_OPTIONS))
                    else:
                        self.check_option_value("verify approx", k, v, step.loc)
            elif isinstance(step, T.Calibrate):
                if "\0" in step.source:
                    self.error(step.loc, "a path cannot contain a NUL character (\\0)", "remove it from the path")
                if step.samples is not None and step.samples < 1:
                    self.error(step.loc, f"`calibrate ... samples {step.samples}` must be at least 1",
                               "give the number of calibration samples to use")
            elif isinstance(step, T.Quantize):
                self.check_quantize(step)
            elif isinstance(step, T.Export):
                if step.format not in EXPORT_FORMATS:
                    self.error(step.loc, f"unknown export format `{step.format}`",
                               did_you_mean(step.format, EXPORT_FORMATS) or f"use one of {', '.join(EXPORT_FORMATS)}")
                else:
                    if step.path is not None and "\0" in step.path:
                        self.error(step.loc, "a path cannot contain a NUL character (\\0)", "remove it from the path")
                    for k, v in step.options.items():
                        if k not in EXPORT_FORMATS[step.format]:
                            self.error(step.loc, f"`export {step.format}` has no option `{k}`",
                                       did_you_mean(k, EXPORT_FORMATS[step.format]))
                        elif k == "opset" and (type(v) is not int or not MIN_OPSET <= v <= MAX_OPSET):
                            self.error(step.loc, f"`opset {v}` is not an ONNX opset",
                                       f"give an integer from {MIN_OPSET} to {MAX_OPSET}")
                        elif k == "workspace_gb" and finite_number(v, positive=True):
                            self.error(step.loc, f"`workspace_gb` {finite_number(v, positive=True)}")

    def check_option_value(self, step: str, key: str, value, loc):
        """Tolerances are finite and positive, counts are positive integers: `verify rel nan` or
        `verify rel -1` would make verification meaningless, so they are refused here."""
        problem = None
        if key in ("rel", "max_rel"):
            problem = finite_number(value, positive=True)
        elif key == "max_abs":
            problem = finite_number(value, non_negative=True)
        elif key in ("cosine", "min_cosine", "mean_cosine"):
            problem = finite_number(value) or (None if -1 <= value <= 1 else f"must be between -1 and 1 (got {value})")
        elif key == "samples":
            problem = None if type(value) is int and value >= 1 else f"must be a positive integer (got `{value}`)"
        elif key == "seed":
            problem = None if type(value) is int else f"must be an integer (got `{value}`)"
        elif key == "allow_nonfinite":
            problem = None if isinstance(value, bool) else f"must be true or false (got `{value}`)"
        elif key == "dtype":
            problem = None if value in VERIFY_DTYPES else f"must be one of {', '.join(sorted(VERIFY_DTYPES))} (got `{value}`)"
        if problem:
            self.error(loc, f"`{step} {key}` {problem}", f"for example `{step} {OPTION_EXAMPLES.get(key, key)}`")

    def check_constant(self, e, name: str, rule: str):
        """An `apply` argument is computed once, before the run: a failure is the program's error, found now."""
        try:
            value = Evaluator(EvalContext(None), {}).eval(e)
        except RefuseSite as err:
            self.error(e.loc, f"cannot compute `{name}` of `{rule}`: {err}")
            return
        except Exception as err:  # noqa: BLE001 - the user's expression: "" < 2, rank(1), ...
            self.error(e.loc, f"cannot compute `{name}` of `{rule}`: {type(err).__name__}: {str(err)[:200]}",
                       "an argument of `apply` is a constant: numbers, strings, true/false and arithmetic")
            return
        if isinstance(value, float) and not math.isfinite(value):
            self.error(e.loc, f"`{name}` of `{rule}` is not finite ({value})")


    # ------------------------------------------------------------------ quantize step (owner: int8, issue 14)
    def check_quantize(self, step: T.Quantize):
        from ..quantize.settings import check_entries
        for e in check_entries(step):
            self.error(e.loc, e.message, e.hint)
        for entry in step.entries:
            if entry.kind != "match":
                continue
            pc = entry.pattern
            if schema_for(pc.op) is not None and schema_for(pc.op)[0].name != "linear":
                self.error(pc.loc, f"a quantize pattern selects linears: its root op is `{pc.op}`",
                           "write `match linear(...)`, e.g. `match linear(gelu(x), w, b?)`")
            scope: dict[str, str] = {}
            op_uses: dict[str, int] = {}
            self.each_vars = {}
            self.check_pcall(pc, scope, op_uses, [])
            for op, count in op_uses.items():
                if count == 1 and op not in scope:
                    scope[op] = NODE
            if entry.where is not None:
                t = self.expr(entry.where, scope, "where")
                if t not in (BOOL, ANY):
                    self.error(entry.where.loc, "the `where` clause is not a condition",
                               "compare values (==, <, ...) or call a guard such as single_use(x)")
    # ------------------------------------------------------------------ end of quantize step


def _names_in(e) -> set[str]:
    if isinstance(e, T.Name):
        return {e.id}
    out = set()
    for v in vars(e).values() if hasattr(e, "__dict__") else ():
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, tuple):
                item = item[1]
            if hasattr(item, "loc") and not isinstance(item, T.Loc):
                out |= _names_in(item)
    return out


def check_program(program: Program) -> Program:
    Checker(program).run()
    return program


def check_export_paths(program: Program, output=None, allow_outside_writes: bool = False) -> None:
    """`export ... to PATH` in a rules file writes only under the current folder or the `-o` folder.

    A rules file is shared like source code; where it writes is the user's choice, not the file's.
    Relative paths are relative to the current folder, as before; `..` and links are resolved first.
    """
    if allow_outside_writes or program.main.pipeline is None:
        return
    from pathlib import Path
    roots = [Path.cwd().resolve()] + ([Path(output).resolve().parent] if output is not None else [])
    diags = []
    for step in program.main.pipeline.steps:
        if isinstance(step, T.Export) and step.path is not None and "\0" not in step.path:  # NUL: a check error
            target = Path(step.path).resolve()
            if not any(target.is_relative_to(root) for root in roots):
                diags.append(Diagnostic(step.loc, f"`export ... to \"{step.path}\"` writes outside the current folder"
                                        + (" and the -o folder" if output is not None else ""),
                                        "write under the current folder, or pass --allow-outside-writes"))
    if diags:
        raise NcError(diags, program.main.source)


def check_data_paths(program: Program, allow_outside_reads: bool = False) -> None:
    """`calibrate from "PATH"` in a rules file reads only under the rules file's folder or the current
    folder (resolved as the calibration step resolves it: beside the .nc file, then the current folder;
    `..` and links resolved first). A shared rules file must not read the user's other files."""
    if allow_outside_reads or program.main.pipeline is None:
        return
    from pathlib import Path
    file = program.main.file or ""
    base = Path(file).parent if file and not file.startswith("<") else None
    roots = [Path.cwd().resolve()] + ([base.resolve()] if base is not None else [])
    diags = []
    for step in program.main.pipeline.steps:
        src = step.source if isinstance(step, T.Calibrate) else None
        if not src or src == "random" or src.startswith("builtin:") or "\0" in src:
            continue
        candidates = ([base / src] if base is not None else []) + [Path(src)]
        target = next((c for c in candidates if c.exists()), candidates[0]).resolve()
        if not any(target.is_relative_to(root) for root in roots):
            diags.append(Diagnostic(step.loc, f"`calibrate from \"{src}\"` reads outside the rules file's folder "
                                    "and the current folder",
                                    "put the data there, or pass --allow-outside-reads"))
    if diags:
        raise NcError(diags, program.main.source)


def load_and_check(path=None, text=None, file="<string>", rules_path=()) -> Program:
    from .loader import load_program
    return check_program(load_program(path, text, file, rules_path=rules_path))
