"""Parse `.nc` source text into the typed AST (syntax_tree), with located errors."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from . import syntax_tree as T
from .diagnostics import Diagnostic, NcError
from .literals import LiteralError, decode_number, decode_string

# How deep expressions and patterns may nest. The builder, the checker and the evaluator
# recurse once per level; a limit far below Python's stack keeps every stage safe.
MAX_DEPTH = 100
# tree nodes that are one level of an expression or a pattern (call_args, kwarg... are not)
_NESTING = {"coalesce_op", "or_op", "and_op", "not_op", "compare", "binop", "neg", "pow_op", "index", "call",
            "list_lit", "slice", "pcall", "pkw", "neg_number"}

GRAMMAR = Path(__file__).with_name("normc.lark")

# How terminals are named to people in "expected ..." messages.
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "LPAR": "`(`", "RPAR": "`)`", "LBRACE": "`{`", "RBRACE": "`}`", "LSQB": "`[`", "RSQB": "`]`",
    "COMMA": "`,`", "COLON": "`:`", "SEMICOLON": "`;`", "EQUAL": "`=`", "DOT": "`.`", "KIND": "`exact`/`approximate`",
    "$END": "end of file", "OPTIONAL": "`?`", "MINUS": "`-`", "COMP_OP": "a comparison", "ADD_OP": "`+`/`-`",
    "MUL_OP": "`*`/`/`", "TRUE": "`true`", "FALSE": "`false`", "NONE": "`none`",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _word(terminal: str) -> str:
    if terminal in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[terminal]
    if terminal.startswith("__ANON") or terminal.isupper():
        pattern = _lark().get_terminal(terminal).pattern.value if terminal in {t.name for t in _lark().terminals} else terminal
        return f"`{pattern}`"
    return terminal


class _Literal:
    """A parsed default value (so `= none` differs from no default at all)."""

    def __init__(self, value):
        self.value = value


class _Build(Transformer):
    def __init__(self, file: str, source: str = ""):
        super().__init__(visit_tokens=True)
        self.file, self.source = file, source

    def _literal_error(self, tok: Token, e: LiteralError) -> NcError:
        column = tok.column + e.offset
        loc = T.Loc(self.file, tok.line, column, tok.line, column + max(1, e.width))
        return NcError([Diagnostic(loc, e.message, e.hint)], self.source)

    def _loc(self, meta_or_tok) -> T.Loc:
        m = meta_or_tok
        if isinstance(m, Token):
            return T.Loc(self.file, m.line, m.column, m.end_line or m.line, m.end_column or m.column + len(m))
        if getattr(m, "empty", False):
            return T.Loc(self.file, 0, 0)
        return T.Loc(self.file, m.line, m.column, m.end_line, m.end_column)

    # ---------------------------------------------------------- tokens
    def NUMBER(self, tok):
        try:
            value = decode_number(str(tok))
        except LiteralError as e:
            raise self._literal_error(tok, e) from None
        return Token("NUMBER", value, tok.start_pos, tok.line, tok.column, tok.end_line, tok.end_column, tok.end_pos)

    def INT(self, tok):
        try:
            value = decode_number(str(tok))
        except LiteralError as e:
            raise self._literal_error(tok, e) from None
        return Token("INT", value, tok.start_pos, tok.line, tok.column, tok.end_line, tok.end_column, tok.end_pos)

    def STRING(self, tok):
        try:
            value = decode_string(str(tok))
        except LiteralError as e:
            raise self._literal_error(tok, e) from None
        return Token("STRING", value, tok.start_pos, tok.line, tok.column, tok.end_line, tok.end_column, tok.end_pos)

    # ---------------------------------------------------------- top level
    @v_args(meta=True)
    def start(self, meta, items):
        return items

    @v_args(meta=True)
    def use_dotted(self, meta, c):
        return T.Use(c[0], str(c[1]) if c[1] else None, False, self._loc(meta))

    @v_args(meta=True)
    def use_path(self, meta, c):
        return T.Use(c[0].value, str(c[1]) if c[1] else None, True, self._loc(meta))

    def dotted(self, c):
        return ".".join(str(t) for t in c)

    @v_args(meta=True)
    def input_decl(self, meta, c):
        name, dtype, *rest = c
        dims = [d for d in rest if isinstance(d, int)]
        rng = next((r for r in rest if isinstance(r, tuple)), None)
        return T.InputDecl(str(name), str(dtype), dims, rng, self._loc(meta))

    def dim(self, c):
        return c[0].value

    def input_range(self, c):
        return (c[0], c[1])

    def signed_number(self, c):
        return c[0].value

    def neg_number(self, c):
        return -c[0].value

    def literal(self, c):
        tok = c[0]
        if isinstance(tok, Token):
            return _Literal({"TRUE": True, "FALSE": False, "NONE": None}.get(tok.type, tok.value))
        return _Literal(tok)

    # ---------------------------------------------------------- rules
    @v_args(meta=True)
    def rule(self, meta, c):
        name, params, *clauses = c
        rule = T.Rule(str(name), params or [], "", "exact", [], None, [], [], self._loc(name))
        for kind, value in clauses:
            if kind == "doc":
                rule.doc = value
            elif kind == "kind":
                rule.kind = value
            elif kind == "match":
                rule.match.extend(value)
            elif kind == "where":
                rule.where = value if rule.where is None else T.Binary("and", rule.where, value, value.loc)
            elif kind == "let":
                rule.lets.extend(value)
            elif kind == "rewrite":
                rule.rewrites.extend(value)
        return rule

    @v_args(meta=True)
    def extern_pass(self, meta, c):
        name, params, *clauses = c
        p = T.ExternPass(str(name), params or [], "", "exact", "", self._loc(name))
        for kind, value in clauses:
            setattr(p, {"doc": "doc", "kind": "kind", "impl": "impl"}[kind], value)
        return p

    def params(self, c):
        return [p for p in c if p is not None]

    @v_args(meta=True)
    def param(self, meta, c):
        default = c[2].value if isinstance(c[2], _Literal) else T.NO_DEFAULT
        return T.Param(str(c[0]), str(c[1]), default, self._loc(c[0]))


    def doc_clause(self, c):
        return ("doc", c[0].value)

    def kind_clause(self, c):
        return ("kind", str(c[0]))

    def impl_clause(self, c):
        return ("impl", c[0].value)

    def match_clause(self, c):
        return ("match", list(c))

    def where_clause(self, c):
        return ("where", c[0])

    def let_clause(self, c):
        return ("let", [T.Let(b.target, b.expr, b.loc) for b in c])

    def rewrite_clause(self, c):
        return ("rewrite", list(c))

    @v_args(meta=True)
    def binding(self, meta, c):
        return T.Rewrite(str(c[0]), c[1], self._loc(c[0]))

    @v_args(meta=True)
    def each_binding(self, meta, c):
        b = c[1]
        b.each = str(c[0])
        return b

    @v_args(meta=True)
    def match_stmt(self, meta, c):
        return T.MatchStmt(str(c[0]), c[1], self._loc(c[0]))

    @v_args(meta=True)
    def each_stmt(self, meta, c):
        return T.EachStmt(str(c[0]), str(c[2]), c[3], self._loc(meta), partial=c[1] is not None)

    @v_args(meta=True)
    def pcall(self, meta, c):
        args, kwargs = [], []
        for a in c[1:]:
            if a is None:
                continue
            if isinstance(a, tuple):
                kwargs.append(a)
            else:
                args.append(a)
        return T.PCall(str(c[0]), args, kwargs, self._loc(c[0]))

    @v_args(meta=True)
    def pvar(self, meta, c):
        return T.PVar(str(c[0]), len(c) > 1 and c[1] is not None, self._loc(c[0]))

    @v_args(meta=True)
    def pwild(self, meta, c):
        return T.PWild(self._loc(meta))

    def pkw(self, c):
        return (str(c[0]), c[1])

    @v_args(meta=True)
    def plit(self, meta, c):
        tok = c[0]
        if isinstance(tok, Token):
            value = {"TRUE": True, "FALSE": False}.get(tok.type, tok.value)
        else:
            value = tok
        return T.PLit(value, self._loc(meta))

    # ---------------------------------------------------------- pipeline
    @v_args(meta=True)
    def pipeline(self, meta, c):
        return T.Pipeline(list(c), self._loc(meta))

    @v_args(meta=True)
    def apply_step(self, meta, c):
        name, call_args, scope = c
        args, kwargs = call_args if call_args else ([], [])
        return T.Apply(name, args, kwargs, scope.value if scope else None, self._loc(meta))

    @v_args(meta=True)
    def verify_step(self, meta, c):
        options, approx = {}, {}
        for is_approx, key, value in c:
            (approx if is_approx else options)[key] = value
        return T.Verify(options, approx, self._loc(meta))

    def verify_opt(self, c):
        return (c[0] is not None, str(c[1]), self._value(c[2]))

    @v_args(meta=True)
    def export_step(self, meta, c):
        fmt, *rest = c
        path = rest.pop()
        options = dict(rest)
        return T.Export(str(fmt), options, path.value if path is not None else None, self._loc(meta))

    def export_opt(self, c):
        return (str(c[0]), self._value(c[1]))

    @v_args(meta=True)
    def calibrate_step(self, meta, c):
        return T.Calibrate(c[0].value, c[1].value if c[1] is not None else None, self._loc(meta))

    # ---------------------------------------------------------- quantize step (owner: int8, issue 14)
    @v_args(meta=True)
    def quantize_step(self, meta, c):
        return T.Quantize(str(c[0]), [e for e in c[1:] if e is not None], self._loc(meta), self._loc(c[0]))

    @v_args(meta=True)
    def quant_default(self, meta, c):
        return T.QuantEntry("default", c[0], self._loc(meta))

    @v_args(meta=True)
    def quant_on(self, meta, c):
        return T.QuantEntry("on", c[1], self._loc(c[0]), glob=c[0].value)

    @v_args(meta=True)
    def quant_match(self, meta, c):
        return T.QuantEntry("match", c[2], c[0].loc, pattern=c[0], where=c[1])

    def quant_settings(self, c):
        return list(c)

    @v_args(meta=True)
    def quant_setting(self, meta, c):
        words = [w for w in c[1:] if w is not None]
        return T.QuantSetting(str(c[0]), [str(w) if w.type == "NAME" else w.value for w in words],
                              [self._loc(w) for w in words], self._loc(c[0]))
    # ---------------------------------------------------------- end of quantize step

    @staticmethod
    def _value(v):
        if isinstance(v, Token):
            if v.type in ("TRUE", "FALSE"):
                return v.type == "TRUE"
            return str(v) if v.type == "NAME" else v.value
        return v

    # ---------------------------------------------------------- expressions
    @v_args(meta=True)
    def number(self, meta, c):
        return T.Num(c[0].value, self._loc(c[0]))

    @v_args(meta=True)
    def string(self, meta, c):
        return T.Str(c[0].value, self._loc(c[0]))

    @v_args(meta=True)
    def true(self, meta, c):
        return T.Const(True, self._loc(c[0]))

    @v_args(meta=True)
    def false(self, meta, c):
        return T.Const(False, self._loc(c[0]))

    @v_args(meta=True)
    def none(self, meta, c):
        return T.Const(None, self._loc(c[0]))

    @v_args(meta=True)
    def name(self, meta, c):
        return T.Name(str(c[0]), self._loc(c[0]))

    @v_args(meta=True)
    def list_lit(self, meta, c):
        return T.ListLit([x for x in c if x is not None], self._loc(meta))

    @v_args(meta=True)
    def call(self, meta, c):
        args, kwargs = c[1]
        return T.Call(str(c[0]), args, kwargs, self._loc(c[0]))

    def call_args(self, c):
        args, kwargs = [], []
        for a in c:
            if a is None:
                continue
            if isinstance(a, tuple):
                kwargs.append(a)
            else:
                args.append(a)
        return args, kwargs

    def kwarg(self, c):
        return (str(c[0]), c[1])

    @v_args(meta=True)
    def index(self, meta, c):
        return T.Index(c[0], list(c[1:]), self._loc(meta))

    @v_args(meta=True)
    def slice(self, meta, c):
        c = list(c) + [None] * (3 - len(c))
        return T.Slice(c[0], c[1], c[2], self._loc(meta))

    @v_args(meta=True)
    def ellipsis(self, meta, c):
        return T.Ellipsis_(self._loc(meta))

    def _bin(self, op, left, right, meta):
        return T.Binary(op, left, right, self._loc(meta))

    @v_args(meta=True)
    def coalesce_op(self, meta, c):
        return self._bin("??", c[0], c[1], meta)

    @v_args(meta=True)
    def or_op(self, meta, c):
        return self._bin("or", c[0], c[1], meta)

    @v_args(meta=True)
    def and_op(self, meta, c):
        return self._bin("and", c[0], c[1], meta)

    @v_args(meta=True)
    def not_op(self, meta, c):
        return T.Unary("not", c[0], self._loc(meta))

    @v_args(meta=True)
    def compare(self, meta, c):
        return self._bin(str(c[1]), c[0], c[2], meta)

    @v_args(meta=True)
    def binop(self, meta, c):
        return self._bin(str(c[1]), c[0], c[2], meta)

    @v_args(meta=True)
    def neg(self, meta, c):
        if isinstance(c[0], T.Num):
            return T.Num(-c[0].value, self._loc(meta))
        return T.Unary("-", c[0], self._loc(meta))

    @v_args(meta=True)
    def pow_op(self, meta, c):
        return self._bin("**", c[0], c[1], meta)


def parse_text(source: str, file: str = "<string>") -> T.Module:
    try:
        tree = _lark().parse(source)
    except UnexpectedInput as e:
        raise NcError([_syntax_diagnostic(e, source, file)], source) from None
    _check_depth(tree, file, source)
    try:
        items = _Build(file, source).transform(tree)
    except VisitError as e:  # a located error from a literal, or a bug in the builder: keep the cause
        raise e.orig_exc from None
    module = T.Module(file=file, source=source)
    for item in items:
        if isinstance(item, T.Use):
            module.uses.append(item)
        elif isinstance(item, T.InputDecl):
            module.inputs.append(item)
        elif isinstance(item, T.Rule):
            item.module = module
            module.rules.append(item)
        elif isinstance(item, T.ExternPass):
            item.module = module
            module.passes.append(item)
        elif isinstance(item, T.Pipeline):
            if module.pipeline is not None:
                raise NcError([Diagnostic(item.loc, "a file has at most one `pipeline` block",
                                          "merge the steps into the first pipeline")], source)
            module.pipeline = item
    return module


def _check_depth(tree: Tree, file: str, source: str) -> None:
    """Refuse expressions nested deeper than MAX_DEPTH, walking the tree without recursion."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in _NESTING:
            depth += 1
            if depth > MAX_DEPTH:
                meta = node.meta
                line = getattr(meta, "line", 1) if not getattr(meta, "empty", True) else 1
                column = getattr(meta, "column", 1) if not getattr(meta, "empty", True) else 1
                loc = T.Loc(file, line, column, line, column + 1)
                raise NcError([Diagnostic(loc, f"expression nested too deeply (limit {MAX_DEPTH})",
                                          "split it with `let` bindings")], source)
        stack.extend((child, depth) for child in node.children if isinstance(child, Tree))


def parse_file(path: str | Path) -> T.Module:
    from ..errors import NormcError
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NormcError(f"cannot read rules file `{path}`: {e.strerror}", "check the path") from None
    return parse_text(decode_source(data, str(path)), str(path))


def decode_source(data: bytes, file: str) -> str:
    """UTF-8 text of a rules file; a byte that is not UTF-8 is a located error."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = before.count(b"\n") + 1
        line_start = before.rfind(b"\n") + 1
        column = len(data[line_start:e.start].decode("utf-8", errors="replace")) + 1
        shown = data.decode("utf-8", errors="replace")
        loc = T.Loc(file, line, column, line, column + 1)
        raise NcError([Diagnostic(loc, f"byte 0x{data[e.start]:02x} is not UTF-8",
                                  "save the file as UTF-8 (rules files are UTF-8 text)")], shown) from None


def _syntax_diagnostic(e: UnexpectedInput, source: str, file: str) -> Diagnostic:
    line, column = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedCharacters):
        ch = source[e.pos_in_stream] if e.pos_in_stream < len(source) else "?"
        loc = T.Loc(file, line, column, line, column + 1)
        return Diagnostic(loc, f"unexpected character `{ch}`", "remove it, or quote it inside a string")
    if isinstance(e, UnexpectedEOF):
        lines = source.splitlines() or [""]
        loc = T.Loc(file, len(lines), len(lines[-1]) + 1)
        return Diagnostic(loc, "unexpected end of file", "a `{` or `(` is not closed")
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    expected = sorted({_word(t) for t in e.expected if not t.startswith("_")})
    shown = ", ".join(expected[:6]) + (", ..." if len(expected) > 6 else "")
    what = "end of file" if tok.type == "$END" else f"`{tok}`"
    width = len(str(tok)) if tok.type != "$END" else 1
    loc = T.Loc(file, line, column, line, column + width)
    hint = f"expected {shown}" if shown else None
    return Diagnostic(loc, f"unexpected {what}", hint)
