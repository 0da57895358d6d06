"""Random `.nc` programs for fuzzing the front end (tools/fuzz_nc.py, tests/hardening/).

`program(rng)` writes a well-formed program: rules with random match/where/let/rewrite
clauses, random expressions (arithmetic, calls, indexing, conditions), strings with escapes,
numbers of every size, nesting near the depth limit, `use` of std and of files, pipelines with
options. With `valid_literals=True` every literal has a value and nesting stays under the
limit, so the program must parse (a check error is still allowed: names are random). `mutate`
damages a program the way editing does: deleted, repeated or swapped spans, stray characters,
non-UTF-8 bytes.

Only `random.Random` methods are used, so hypothesis can drive it through `st.randoms()`.
"""
from __future__ import annotations

import random

DEPTH_LIMIT = 100  # normc.grammar.parser.MAX_DEPTH (kept here so the tools import nothing)

OPS = {"linear": 3, "conv": 3, "batch_norm": 5, "layer_norm": 3, "rms_norm": 2, "group_norm": 3, "add": 2,
       "mul": 2, "relu": 1, "gelu": 1, "silu": 1, "matmul": 2, "softmax": 1, "embedding": 2, "fixed_norm": 3}
FUNCS = {"sqrt": 1, "rsqrt": 1, "abs": 1, "exp": 1, "log": 1, "pow": 2, "maximum": 2, "minimum": 2, "clamp": 2,
         "sum": 1, "mean": 1, "absmax": 1, "rms": 1, "bcast": 3, "t": 1, "ones_like": 1, "zeros_like": 1,
         "rank": 1, "shape": 1, "size": 2, "len": 1, "dtype": 1, "users": 1, "nosuch": 1}
GUARDS = {"single_use": 1, "shared": 1, "present": 1, "has_affine": 1, "is_param": 1, "frozen_stats": 1,
          "all_zero": 1, "glob": 2}
STD = ["std", "std.bn", "std.prenorm", "std.constants", "std.smooth", "std.nosuch"]
STEPS_RULES = ["std.bn", "std.fold_bn_linear", "std.smooth", "std.prenorm_to_rmsnorm", "std.fold_norm_affine", "r0", "nosuch"]
VERIFY_KEYS = ["rel", "max_rel", "max_abs", "samples", "seed", "dtype", "cosine", "allow_nonfinite", "bogus"]
EXPORT = ["torch", "onnx", "tensorrt", "safetensors", "nosuch"]
NAMES = ["x", "w", "b", "y", "c", "h", "g", "s", "mean", "var", "gamma", "beta", "eps", "u", "n", "z", "alpha"]
ESCAPES_OK = ["\\n", "\\t", "\\\\", '\\"', "\\x41", "\\u00e9", "\\U0001F600", "\\N{GREEK SMALL LETTER ALPHA}", "\\0", "\\r"]
ESCAPES_BAD = ["\\x4", "\\N{NO SUCH NAME}", "\\q", "\\u12", "\\UFFFFFFFF", "\\ud800", "\\N", "\\N{", "\\x"]
NOISE = list("{}()[],;:=.?+-*/<>!#\"\\_ \n\t0123456789aeZ") + ["é", "\u2028", "\0", "\ufeff", "**", "??", "..", "...",
                                                                  "rule", "match", "pipeline", "use", "each", "in", "not"]


class _Gen:
    def __init__(self, rng: random.Random, valid_literals: bool):
        self.rng, self.valid = rng, valid_literals

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    # ---------------------------------------------------------- literals
    def number(self) -> str:
        r = self.rng
        kind = r.randrange(10)
        if kind == 0:
            return str(r.randrange(0, 10 ** r.randrange(1, 19)))
        if kind == 1:
            return f"{r.random():.{r.randrange(1, 12)}f}"
        if kind == 2:
            return f"{r.randrange(1, 10)}e{r.choice('+-') if r.random() < .5 else ''}{r.randrange(0, 300)}"
        if kind == 3:
            return self.pick(["0", "1", "0.5", "1e-5", ".5", "5.", "9223372036854775807"])
        if kind == 4 and not self.valid:
            return self.pick(["9" * r.randrange(20, 6000), "1e999", "1" * 400 + ".5e308", "9223372036854775808"])
        return str(r.randrange(0, 100))

    def string(self) -> str:
        parts = []
        for _ in range(self.rng.randrange(0, 6)):
            k = self.rng.randrange(4)
            if k == 0:
                parts.append(self.pick(ESCAPES_OK))
            elif k == 1 and not self.valid:
                parts.append(self.pick(ESCAPES_BAD))
            elif k == 2:
                parts.append(self.pick(["a", "bn*", "layers.*", "é", "日本", "\U0001F600", " ", "x.nc"]))
            else:
                parts.append("".join(self.pick("abcxyz_.*?/- ") for _ in range(self.rng.randrange(0, 8))))
        return '"' + "".join(parts) + '"'

    # ---------------------------------------------------------- expressions
    def expr(self, depth: int, names: list[str]) -> str:
        r = self.rng
        if depth <= 0 or r.random() < 0.25:
            return self.atom(names)
        k = r.randrange(12)
        sub = lambda: self.expr(depth - 1, names)
        if k <= 2:
            return f"{sub()} {self.pick(['+', '-', '*', '/', '**'])} {sub()}"
        if k == 3:
            return f"-{sub()}"
        if k == 4:
            return f"({sub()})"
        if k == 5:
            f, n = self.pick(list(FUNCS.items()))
            n = n if r.random() < 0.9 else r.randrange(0, 4)
            args = [sub() for _ in range(n)]
            if r.random() < 0.2:
                args.append(f"{self.pick(['dim', 'keepdim', 'min', 'bogus'])} = {sub()}")
            return f"{f}({', '.join(args)})"
        if k == 6:
            items = [self.pick([sub(), ":", "None", "...", f"{sub()}:{sub()}", "::2"]) for _ in range(r.randrange(1, 4))]
            return f"{self.atom(names)}[{', '.join(items)}]"
        if k == 7:
            return f"{sub()} ?? {sub()}"
        if k == 8:
            return f"[{', '.join(sub() for _ in range(r.randrange(0, 4)))}]"
        return f"({self.cond(depth - 1, names)})"  # conditions bind looser than arithmetic

    def cond(self, depth: int, names: list[str]) -> str:
        r = self.rng
        if depth <= 0 or r.random() < 0.3:
            g, n = self.pick(list(GUARDS.items()))
            args = [self.pick(names) if i == 0 else self.string() for i in range(n)]
            return self.pick([f"{g}({', '.join(args)})", "true", "false",
                              f"{self.atom(names)} {self.pick(['==', '!=', '<', '<=', '>', '>='])} {self.atom(names)}"])
        k = r.randrange(4)
        if k == 0:
            return f"not {self.cond(depth - 1, names)}"
        if k == 1:
            return f"{self.cond(depth - 1, names)} {self.pick(['and', 'or'])} {self.cond(depth - 1, names)}"
        if k == 2:
            return f"({self.cond(depth - 1, names)})"
        return f"{self.expr(depth - 1, names)} {self.pick(['==', '<', '>='])} {self.expr(depth - 1, names)}"

    def literal(self) -> str:
        return self.pick([self.number(), "-" + self.number(), self.string(), "true", "false", "none"])

    def integer(self) -> str:
        return self.number() if not self.valid and self.chance(0.3) else str(self.rng.randrange(0, 10 ** self.rng.randrange(1, 5)))

    def atom(self, names: list[str]) -> str:
        k = self.rng.randrange(6)
        if k <= 1:
            return self.pick(names)
        if k == 2:
            return self.number()
        if k == 3:
            return self.string()
        return self.pick(["true", "false", "none", "f32", "f16", self.number()])

    def deep(self, names: list[str]) -> str:
        """An expression nested close to (or, unless valid, past) the depth limit."""
        r = self.rng
        n = r.randrange(DEPTH_LIMIT - 10, DEPTH_LIMIT) if self.valid else r.randrange(DEPTH_LIMIT - 5, 3 * DEPTH_LIMIT)
        if not self.valid and r.random() < 0.1:
            n = r.randrange(1000, 5_000)  # the tests try 10,000-20,000; lark needs seconds for those
        k = r.randrange(6)
        leaf = self.pick(names)
        if k == 0:
            return "-" * n + leaf
        if k == 1:
            return " + ".join([leaf] * (n + 1)) if n < 2000 else "+".join([leaf] * (n + 1))
        if k == 2:
            return "sqrt(" * n + leaf + ")" * n
        if k == 3:
            return "(" * n + leaf + ")" * n  # parentheses alone do not nest the tree
        if k == 4:
            return "[" * n + leaf + "]" * n
        return f"{leaf} ** " * n + leaf

    # ---------------------------------------------------------- rules, pipeline
    def pattern(self, depth: int, names: list[str]) -> str:
        op, n = self.pick(list(OPS.items()))
        args = []
        for i in range(n if self.chance(0.8) else self.rng.randrange(0, 6)):
            if depth > 0 and i == 0 and self.chance(0.4):
                args.append(self.pattern(depth - 1, names))
            else:
                args.append(self.pick([self.pick(names), self.pick(names) + "?", "_", self.number(),
                                       f"eps = {self.pick(names)}", self.string(), "true"]))
        return f"{op}({', '.join(args)})"

    def rule(self, name: str) -> str:
        r = self.rng
        names = [self.pick(NAMES) for _ in range(r.randrange(1, 6))]
        params = ""
        if self.chance(0.3):
            params = "(" + ", ".join(f"{self.pick(['alpha', 'k', 'on'])}: {self.pick(['float', 'int', 'bool', 'string', 'tensor'])}"
                                     + (f" = {self.literal()}" if self.chance(0.5) else "")
                                     for _ in range(r.randrange(0, 3))) + ")"
        lines = [f"rule {name}{params} {{"]
        if self.chance(0.3):
            lines.append(f"  doc {self.string()}")
        if self.chance(0.4):
            lines.append(f"  {self.pick(['exact', 'approximate', 'structural'])}")
        lines.append(f"  match   y = {self.pattern(r.randrange(0, 4), names)}")
        if self.chance(0.2):
            lines.append(f"          each u in {self.pick(['', 'any '])}users(y): z = {self.pattern(1, names)}")
        if self.chance(0.6):
            lines.append(f"  where   {self.cond(r.randrange(0, 5), names + ['y'])}")
        lets = []
        for _ in range(r.randrange(0, 3)):
            v = self.pick(["s", "t", "k2", "m"])
            body = self.deep(names) if self.chance(0.05) else self.expr(r.randrange(0, 6), names + lets)
            lines.append(f"  let     {v} = {body}")
            lets.append(v)
        if self.chance(0.9):
            lines.append(f"  rewrite y = {self.pick(list(OPS))}({', '.join(self.expr(2, names + lets) for _ in range(r.randrange(1, 4)))})")
            if self.chance(0.1):
                lines.append(f"          each u: z = linear(y, {self.expr(1, names)})")
        lines.append("}")
        return "\n".join(lines)

    def pass_decl(self) -> str:
        impl = self.pick(["normc.passes.prenorm:to_rmsnorm", "normc.passes.constants:fold_constants",
                          "normc.passes.prenorm:torch", "normc.passes.nosuch:run", "os:system", "normc.passes.prenorm",
                          "normc.passes.registry:global_pass"])
        return f'pass p{self.rng.randrange(3)} {{ exact impl "{impl}" }}'

    def pipeline(self, rules: list[str]) -> str:
        r = self.rng
        steps = []
        for _ in range(r.randrange(0, 6)):
            k = r.randrange(5)
            if k <= 1:
                target = self.pick(STEPS_RULES + rules)
                args = ""
                if self.chance(0.3):
                    args = f"({self.pick(['alpha', 'untie', 'k'])} = {self.expr(r.randrange(0, 4), ['x'])})"
                scope = f" on {self.string()}" if self.chance(0.2) else ""
                steps.append(f"apply {target}{args}{scope}")
            elif k == 2:
                opts = []
                for _ in range(r.randrange(0, 4)):
                    key = self.pick(VERIFY_KEYS)
                    value = self.pick([self.number(), "-" + self.number(), "nan", "inf", "f64", "true", self.string()])
                    opts.append(("approx " if self.chance(0.15) else "") + f"{key} {value}")
                steps.append("verify " + " ".join(opts))
            elif k == 3:
                opts = " ".join(f"{self.pick(['opset', 'check', 'dynamic', 'fp16'])} {self.pick([self.number(), 'int8', 'true'])}"
                                for _ in range(r.randrange(0, 3)))
                to = f" to {self.pick([self.string(), chr(34) + 'out/m.pt2' + chr(34), chr(34) + '../../x.onnx' + chr(34)])}" \
                    if self.chance(0.7) else ""
                steps.append(f"export {self.pick(EXPORT)} {opts}{to}")
            else:
                samples = f" samples {self.integer()}" if self.chance(0.5) else ""
                steps.append(f"calibrate from {self.pick([chr(34) + 'random' + chr(34), self.string()])}{samples}")
        return "pipeline {\n" + "\n".join("  " + s for s in steps) + "\n}"

    def program(self) -> str:
        r = self.rng
        parts = []
        for _ in range(r.randrange(0, 3)):
            if self.chance(0.7):
                parts.append(f"use {self.pick(STD)}" + (f" as {self.pick(NAMES)}" if self.chance(0.2) else ""))
            else:
                parts.append("use " + self.pick(['"lib.nc"', '"nosuch.nc"', '"/etc/passwd"', '"../x.nc"', self.string()]))
        if self.chance(0.3):
            dims = ", ".join(self.integer() if self.chance(0.2) else str(r.randrange(1, 9)) for _ in range(r.randrange(1, 5)))
            rng_part = f" in {self.number()} .. {self.number()}" if self.chance(0.3) else ""
            parts.append(f"input x: {self.pick(['f32', 'f16', 'i64', 'q8'])}[{dims}]{rng_part}")
        rules = [f"r{i}" for i in range(r.randrange(0, 4))]
        parts.extend(self.rule(n) for n in rules)
        if self.chance(0.15):
            parts.append(self.pass_decl())
        if self.chance(0.8):
            parts.append(self.pipeline(rules))
        if self.chance(0.3):
            parts.insert(r.randrange(len(parts) + 1), "# " + self.string())
        return "\n".join(parts) + "\n"


def program(rng: random.Random, valid_literals: bool = False) -> str:
    """A random, grammatically well-formed program (see the module docstring)."""
    return _Gen(rng, valid_literals).program()


def expression(rng: random.Random, depth: int = 6, names=("x",)) -> str:
    return _Gen(rng, True).expr(depth, list(names))


def mutate(text: str, rng: random.Random) -> bytes:
    """`text` damaged by 1-4 edits; returned as bytes (some edits are not UTF-8)."""
    data = text.encode()
    for _ in range(rng.randrange(1, 5)):
        n = len(data)
        i = rng.randrange(n + 1)
        j = min(n, i + rng.randrange(0, 12))
        k = rng.randrange(7)
        if k == 0:
            data = data[:i] + data[j:]                              # delete a span
        elif k == 1:
            data = data[:i] + rng.choice(NOISE).encode() + data[i:]  # stray token
        elif k == 2:
            data = data[:i] + data[i:j] * rng.randrange(2, 50) + data[j:]  # repeat a span
        elif k == 3:
            data = data[:i]                                         # truncate
        elif k == 4:
            data = data[:i] + bytes([rng.randrange(128, 256)]) + data[i:]  # a byte that is not UTF-8 alone
        elif k == 5 and n:
            a, b = sorted((rng.randrange(n), rng.randrange(n)))
            data = data[a:b] + data[:a] + data[b:]                 # move a span
        else:
            data = data[:i] + str(rng.choice([0, -1, 1e309, 2 ** 70, "nan", "\\x4", '"'])).encode() + data[i:]
    return data
