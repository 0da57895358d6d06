"""The settings of a `quantize int8 { ... }` step: the words, what they mean, and one `Scheme`
per linear.

    default: weights int8 per_channel symmetric, activations uint8 static asymmetric
    on "*.output.dense": activations per_token dynamic
    match linear(gelu(x), w, b?) where single_use(x): keep fp32

Each entry gives settings (`subject word word ...`); entries apply in file order on top of the
defaults, so a later entry overrides the words it names and keeps the rest. A word never given
keeps onnxruntime's best choice for this CPU (`Scheme()`: per-channel symmetric int8 weights,
7-bit where U8S8 saturates, static asymmetric uint8 activations).

This module reads only the syntax tree (no torch): the checker calls `check_entries` for its
located errors, the planner calls `scheme_for`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..grammar import syntax_tree as T

PRECISIONS = ("int8",)

# subject -> word -> (field, value); a `None` value means "takes the number after it"
WORDS: dict[str, dict[str, tuple[str, object]]] = {
    "weights": {
        "int8": ("weight_bits", 8),
        "per_channel": ("weight_granularity", "per_channel"),
        "per_tensor": ("weight_granularity", "per_tensor"),
        "per_group": ("weight_group", None),
        "symmetric": ("weight_symmetric", True),
        "reduce_range": ("weight_range", "reduced"),
        "full_range": ("weight_range", "full"),
        "auto_range": ("weight_range", "auto"),
    },
    "activations": {
        "uint8": ("act", "uint8"),
        "int8": ("act", "int8"),
        "fp32": ("act", "fp32"),
        "static": ("act_dynamic", False),
        "dynamic": ("act_dynamic", True),
        "per_tensor": ("act_granularity", "per_tensor"),
        "per_token": ("act_granularity", "per_token"),
        "symmetric": ("act_symmetric", True),
        "asymmetric": ("act_symmetric", False),
    },
    "first_tokens": {},   # first_tokens N: a separate static range for positions [0, N)
    "keep": {"fp32": ("quantized", False)},
}
NUMBER_SUBJECTS = {"first_tokens"}

DOC = {
    "weights": "int8; per_channel | per_tensor | per_group N; symmetric; reduce_range | full_range | auto_range",
    "activations": "uint8 | int8 | fp32 (weight-only, W8A16-style); static | dynamic; per_tensor | per_token; "
                   "symmetric | asymmetric",
    "first_tokens": "N: positions [0, N) get their own static range (the rest another)",
    "keep": "fp32: the linear is not quantized",
}


@dataclass(frozen=True)
class Scheme:
    """How one linear is quantized. Defaults: what onnxruntime runs best on x86 CPUs."""
    quantized: bool = True
    weight_bits: int = 8
    weight_granularity: str = "per_channel"   # per_channel | per_tensor | per_group
    weight_group: int = 0                     # group size along the input dim (per_group)
    weight_symmetric: bool = True
    weight_range: str = "auto"                # auto (reduced where U8S8 saturates) | reduced | full
    act: str = "uint8"                        # uint8 (asymmetric by default) | int8 | fp32 (weights only)
    act_symmetric: bool = False
    act_dynamic: bool = False
    act_granularity: str = "per_tensor"       # per_tensor | per_token (dynamic only)
    first_tokens: int = 0                     # > 0: positions [0, N) have their own static range

    @property
    def weight_only(self) -> bool:
        return self.quantized and self.act == "fp32"

    def reduce_range(self, cpu_saturates: bool) -> bool:
        return self.weight_range == "reduced" or (self.weight_range == "auto" and cpu_saturates)

    def describe(self) -> str:
        if not self.quantized:
            return "fp32 (not quantized)"
        w = f"w int{self.weight_bits} " + (f"per_group {self.weight_group}" if self.weight_granularity == "per_group"
                                           else self.weight_granularity)
        if self.weight_range != "auto":
            w += f" {self.weight_range}_range"
        if self.act == "fp32":
            return w + ", activations fp32 (weight-only)"
        a = (f"a {self.act} " + ("dynamic " + self.act_granularity if self.act_dynamic else "static")
             + (" symmetric" if self.act_symmetric or self.act == "int8" else " asymmetric"))
        if self.first_tokens:
            a += f", first {self.first_tokens} token(s) own range"
        return f"{w}, {a}"


class SettingError(Exception):
    """A wrong word: (loc, message, hint)."""

    def __init__(self, loc: T.Loc, message: str, hint: str | None = None):
        super().__init__(message)
        self.loc, self.message, self.hint = loc, message, hint


def _nearest(word: str, candidates) -> str | None:
    from ..grammar.diagnostics import did_you_mean
    return did_you_mean(word, candidates)


def apply_setting(scheme: Scheme, s: T.QuantSetting) -> Scheme:
    """`scheme` with one setting applied; raises SettingError (located) on a wrong word."""
    if s.subject not in WORDS:
        raise SettingError(s.loc, f"unknown quantization setting `{s.subject}`",
                           _nearest(s.subject, WORDS) or f"use one of {', '.join(WORDS)}")
    if not s.words:
        raise SettingError(s.loc, f"`{s.subject}` needs words", f"`{s.subject}`: {DOC[s.subject]}")
    if s.subject in NUMBER_SUBJECTS:
        if len(s.words) != 1 or not isinstance(s.words[0], int) or s.words[0] < 1:
            raise SettingError(s.locs[0], f"`{s.subject}` takes one positive integer", f"e.g. `{s.subject} 1`")
        return replace(scheme, quantized=True, **{s.subject: s.words[0]})
    vocab = WORDS[s.subject]
    # naming weights/activations quantizes a linear an earlier entry kept in fp32
    changes: dict[str, object] = {} if s.subject == "keep" else {"quantized": True}
    words = list(zip(s.words, s.locs))
    i = 0
    while i < len(words):
        word, loc = words[i]
        if not isinstance(word, str) or word not in vocab:
            raise SettingError(loc, f"`{word}` is not a word of `{s.subject}`",
                               (_nearest(str(word), vocab) if isinstance(word, str) else None)
                               or f"`{s.subject}`: {DOC[s.subject]}")
        field_name, value = vocab[word]
        if value is None:  # takes a number
            if i + 1 >= len(words) or not isinstance(words[i + 1][0], int) or words[i + 1][0] < 1:
                raise SettingError(loc, f"`{word}` needs a positive integer after it", f"e.g. `{word} 128`")
            changes["weight_granularity"] = word
            value = words[i + 1][0]
            i += 1
        if field_name in changes and changes[field_name] != value:
            raise SettingError(loc, f"`{word}` contradicts an earlier word of this setting",
                               "give one choice per property")
        changes[field_name] = value
        i += 1
    out = replace(scheme, **changes)
    _consistent(out, s)
    return out


def _consistent(scheme: Scheme, s: T.QuantSetting) -> None:
    if scheme.act_granularity == "per_token" and not scheme.act_dynamic and s.subject == "activations":
        raise SettingError(s.loc, "per_token ranges are computed at run time: they need `dynamic`",
                           "write `activations per_token dynamic`")
    if scheme.act == "fp32" and (scheme.act_dynamic or scheme.act_granularity == "per_token"):
        raise SettingError(s.loc, "fp32 activations are not quantized: `dynamic`/`per_token` do not apply",
                           "drop them, or choose uint8 / int8")


def check_entries(step: T.Quantize) -> list[SettingError]:
    """Every wrong word of the step's settings (parse order), without a model."""
    errors: list[SettingError] = []
    if step.precision not in PRECISIONS:
        errors.append(SettingError(step.precision_loc or step.loc, f"unknown precision `quantize {step.precision}`",
                                   _nearest(step.precision, PRECISIONS) or "use `quantize int8`"))
    defaults = [e for e in step.entries if e.kind == "default"]
    for extra in defaults[1:]:
        errors.append(SettingError(extra.loc, "a quantize step has at most one `default:` entry",
                                   "merge the settings into the first one"))
    for entry in step.entries:
        scheme = Scheme()
        for s in entry.settings:
            try:
                scheme = apply_setting(scheme, s)
            except SettingError as e:
                errors.append(e)
    return errors


def default_scheme(step: T.Quantize) -> Scheme:
    scheme = Scheme()
    for entry in step.entries:
        if entry.kind == "default":
            for s in entry.settings:
                scheme = apply_setting(scheme, s)
    return _final(scheme)


def entry_scheme(base: Scheme, entry: T.QuantEntry) -> Scheme:
    for s in entry.settings:
        base = apply_setting(base, s)
    return _final(base)


def _final(s: Scheme) -> Scheme:
    # dynamic without a granularity is per-tensor; the first-token split is a static-range remedy
    if s.act_dynamic and s.first_tokens:
        s = replace(s, first_tokens=0)
    return s


__all__ = [
    "DOC",
    "PRECISIONS",
    "WORDS",
    "Scheme",
    "SettingError",
    "apply_setting",
    "check_entries",
    "default_scheme",
    "entry_scheme",
]
