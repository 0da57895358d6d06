"""The typed AST of a `.nc` file. Every node carries its source location."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    column: int
    end_line: int = 0
    end_column: int = 0


# ---------------------------------------------------------------- expressions
@dataclass
class Num:
    value: float | int
    loc: Loc


@dataclass
class Str:
    value: str
    loc: Loc


@dataclass
class Const:
    """true / false / none."""
    value: object
    loc: Loc


@dataclass
class Name:
    id: str
    loc: Loc


@dataclass
class Unary:
    op: str  # "-" or "not"
    operand: "Expr"
    loc: Loc


@dataclass
class Binary:
    op: str  # + - * / ** == != < <= > >= and or ??
    left: "Expr"
    right: "Expr"
    loc: Loc


@dataclass
class Call:
    func: str
    args: list["Expr"]
    kwargs: list[tuple[str, "Expr"]]
    loc: Loc


@dataclass
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    step: "Expr | None"
    loc: Loc


@dataclass
class Ellipsis_:
    loc: Loc


@dataclass
class Index:
    value: "Expr"
    items: list["Expr | Slice | Ellipsis_"]
    loc: Loc


@dataclass
class ListLit:
    items: list["Expr"]
    loc: Loc


Expr = Union[Num, Str, Const, Name, Unary, Binary, Call, Index, ListLit]


# ---------------------------------------------------------------- patterns
@dataclass
class PVar:
    """A pattern variable; `optional` for `b?` (binds none when the operand is absent)."""
    name: str
    optional: bool
    loc: Loc


@dataclass
class PWild:
    loc: Loc


@dataclass
class PLit:
    value: object
    loc: Loc


@dataclass
class PCall:
    op: str
    args: list["PArg"]
    kwargs: list[tuple[str, "PArg"]]
    loc: Loc


PArg = Union[PVar, PWild, PLit, PCall]


@dataclass
class MatchStmt:
    target: str
    call: PCall
    loc: Loc


@dataclass
class EachStmt:
    """`each u in users(h): y = linear(h, w, b?)`: fan-out over every user of h (all must match).
    `each u in any users(h): ...`: over the users that match; the others are left alone."""
    var: str
    source: str
    body: MatchStmt
    loc: Loc
    partial: bool = False


@dataclass
class Let:
    name: str
    expr: Expr
    loc: Loc


@dataclass
class Rewrite:
    target: str
    expr: Expr
    loc: Loc
    each: str | None = None  # set for `each u: y_u = ...` rewrites


NO_DEFAULT = object()  # a parameter declared without `= value`: the caller must give it


@dataclass
class Param:
    name: str
    type: str
    default: object
    loc: Loc


@dataclass
class Rule:
    name: str
    params: list[Param]
    doc: str
    kind: str  # exact | approximate | structural
    match: list["MatchStmt | EachStmt"]
    where: Expr | None
    lets: list[Let]
    rewrites: list[Rewrite]
    loc: Loc
    module: "Module | None" = field(default=None, repr=False, compare=False)
    qualname: str = ""


@dataclass
class ExternPass:
    """A global pass implemented in Python inside normc, declared in the language."""
    name: str
    params: list[Param]
    doc: str
    kind: str
    impl: str
    loc: Loc
    module: "Module | None" = field(default=None, repr=False, compare=False)
    qualname: str = ""


@dataclass
class Use:
    target: str  # dotted name (std.bn) or a path string
    alias: str | None
    is_path: bool
    loc: Loc


@dataclass
class InputDecl:
    name: str
    dtype: str
    shape: list[int]
    range: tuple[float, float] | None
    loc: Loc


@dataclass
class Apply:
    rule: str
    args: list[Expr]
    kwargs: list[tuple[str, Expr]]
    scope: str | None
    loc: Loc


@dataclass
class Verify:
    options: dict[str, object]        # max_abs, rel, samples, dtype, ...
    approx: dict[str, object]         # gates for approximate rules
    loc: Loc


@dataclass
class Export:
    format: str
    options: dict[str, object]
    path: str | None
    loc: Loc


@dataclass
class Calibrate:
    source: str
    samples: int | None
    loc: Loc


# ---------------------------------------------------------------- quantize step (owner: int8, issue 14)
@dataclass
class QuantSetting:
    """One `subject word word ...` of a quantize entry (`activations per_token dynamic`)."""
    subject: str
    words: list[object]          # names (str) and numbers, in order
    locs: list[Loc]              # one per word
    loc: Loc                     # the subject


@dataclass
class QuantEntry:
    """`default: ...`, `on "glob": ...` or `match linear(...) where guard: ...`."""
    kind: str                    # default | on | match
    settings: list[QuantSetting]
    loc: Loc
    glob: str | None = None
    pattern: PCall | None = None
    where: Expr | None = None


@dataclass
class Quantize:
    precision: str               # int8
    entries: list[QuantEntry]
    loc: Loc
    precision_loc: Loc | None = None
# ---------------------------------------------------------------- end of quantize step


Step = Union[Apply, Verify, Export, Calibrate, Quantize]


@dataclass
class Pipeline:
    steps: list[Step]
    loc: Loc


@dataclass
class Module:
    file: str
    source: str
    uses: list[Use] = field(default_factory=list)
    inputs: list[InputDecl] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    passes: list[ExternPass] = field(default_factory=list)
    pipeline: Pipeline | None = None
