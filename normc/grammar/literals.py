"""Decoding literal text (strings with escapes, numbers) into values, with located errors.

Not `ast.literal_eval`: the language defines its own escapes, and a bad one must point at
the escape in the `.nc` file instead of raising Python's SyntaxError.
"""
from __future__ import annotations

import math
import unicodedata

# simple one-letter escapes
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'",
           "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_HEX_WIDTH = {"x": 2, "u": 4, "U": 8}

ESCAPES_HINT = ("escapes are \\n \\t \\r \\0 \\\\ \\\" \\xHH \\uHHHH \\UHHHHHHHH and \\N{NAME}; "
                "write \\\\ for a backslash")

# integers are 64-bit signed where they end up (dims, opsets, seeds, tensor constants)
INT_MAX = 2 ** 63 - 1
_INT_DIGITS = len(str(INT_MAX))


class LiteralError(ValueError):
    """A literal that has no value. `offset` is the character offset of the fault within the literal's text."""

    def __init__(self, message: str, offset: int = 0, width: int = 1, hint: str | None = None):
        super().__init__(message)
        self.message, self.offset, self.width, self.hint = message, offset, width, hint


def decode_string(text: str) -> str:
    """The value of a string literal `text` (with its double quotes)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise LiteralError("a string literal must be in double quotes", 0, len(text))
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        start = i + 1  # offset in `text` of the backslash (the quote is at 0)
        if i + 1 >= len(body):
            raise LiteralError("a string ends with a lone backslash", start, 1, ESCAPES_HINT)
        kind = body[i + 1]
        if kind in _SIMPLE:
            out.append(_SIMPLE[kind])
            i += 2
        elif kind in _HEX_WIDTH:
            width = _HEX_WIDTH[kind]
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise LiteralError(f"`\\{kind}` needs exactly {width} hexadecimal digits", start, 2 + len(digits),
                                   f"for example \\{kind}{'0' * (width - 2)}41")
            out.append(_code_point(int(digits, 16), start, 2 + width))
            i += 2 + width
        elif kind == "N":
            end = body.find("}", i + 2)
            if i + 2 >= len(body) or body[i + 2] != "{" or end < 0:
                raise LiteralError("`\\N` needs a character name in braces", start, 2, "for example \\N{GREEK SMALL LETTER ALPHA}")
            name = body[i + 3:end]
            try:
                out.append(unicodedata.lookup(name))
            except KeyError:
                raise LiteralError(f"no Unicode character is named `{name[:60]}`", start, end - i + 1,
                                   "check the name (Unicode character names are upper case)") from None
            i = end + 1
        else:
            raise LiteralError(f"unknown escape `\\{kind}`", start, 2, ESCAPES_HINT)
    return "".join(out)


def _code_point(value: int, offset: int, width: int) -> str:
    if value > 0x10FFFF:
        raise LiteralError(f"U+{value:X} is beyond the last Unicode code point U+10FFFF", offset, width,
                           "give a code point up to \\U0010FFFF")
    if 0xD800 <= value <= 0xDFFF:
        raise LiteralError(f"U+{value:X} is a surrogate, not a character", offset, width,
                           "write the character itself, or its code point with \\U")
    return chr(value)


def decode_number(text: str) -> int | float:
    """The value of a NUMBER/INT literal: an int that fits in 64 bits, or a finite float."""
    if text.isdigit():
        digits = text.lstrip("0") or "0"
        if len(digits) > _INT_DIGITS or int(digits) > INT_MAX:
            raise LiteralError(f"the integer {_short(text)} is too large (at most {INT_MAX})", 0, len(text),
                               "use a smaller number, or a float such as 1e30")
        return int(digits)
    value = float(text)  # floats have no digit limit; an overflow gives inf
    if not math.isfinite(value):
        raise LiteralError(f"the number {_short(text)} is too large for a float (at most about 1.8e308)", 0, len(text),
                           "use a smaller number")
    return value


def _short(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}…{text[-6:]} ({len(text)} characters)"


def finite_number(value, *, positive: bool = False, non_negative: bool = False) -> str | None:
    """None if `value` is an acceptable real number, else what is wrong with it (for option checks)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is not a number (got `{value}`)"
    if not math.isfinite(value):
        return "must be a finite number"
    if positive and not value > 0:
        return f"must be greater than 0 (got {value})"
    if non_negative and value < 0:
        return f"must not be negative (got {value})"
    return None
