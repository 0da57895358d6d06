"""Calibration and evaluation data: built-in sentences and loaders for user data.

``sentences.txt`` holds 96 English sentences written for normc (varied topics, lengths and
punctuation). :func:`split_sentences` divides them by a fixed, documented rule:

    counting sentences from 0 in file order, sentence ``i`` is for EVALUATION when
    ``i % 3 == 2`` and for CALIBRATION otherwise

so the 96 built-in sentences give 64 calibration and 32 evaluation sentences, interleaved
(every topic lands in both sets, and the two sets never share a sentence).

Loading calibration inputs (tensor files, text files, random inputs from input specs) lives
in :mod:`normc.data.calibration`.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from normc.errors import NormcError

SENTENCES_FILE = "sentences.txt"
EVAL_EVERY = 3  # sentence i is evaluation when i % EVAL_EVERY == EVAL_EVERY - 1


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; lines starting with ``#`` are comments."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise NormcError(f"text file `{path}` does not exist", hint="check the path (relative to the working folder)") from exc
    except UnicodeDecodeError as exc:
        raise NormcError(f"text file `{path}` is not UTF-8 text", hint="give one sentence per line, UTF-8") from exc
    return _parse_lines(text)


def _parse_lines(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def builtin_sentences_path() -> Path:
    """Path of the built-in ``sentences.txt`` (inside the installed package)."""
    return Path(str(resources.files(__name__).joinpath(SENTENCES_FILE)))


def builtin_sentences() -> list[str]:
    """All built-in sentences, in file order."""
    return _parse_lines(resources.files(__name__).joinpath(SENTENCES_FILE).read_text(encoding="utf-8"))


def split_sentences(sentences: list[str]) -> tuple[list[str], list[str]]:
    """``(calibration, evaluation)`` by the rule: index ``i % 3 == 2`` -> evaluation."""
    calib = [s for i, s in enumerate(sentences) if i % EVAL_EVERY != EVAL_EVERY - 1]
    evaluation = [s for i, s in enumerate(sentences) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return calib, evaluation


def calibration_sentences() -> list[str]:
    """The 64 built-in calibration sentences."""
    return split_sentences(builtin_sentences())[0]


def evaluation_sentences() -> list[str]:
    """The 32 built-in evaluation sentences (never used for calibration)."""
    return split_sentences(builtin_sentences())[1]


__all__ = [
    "EVAL_EVERY",
    "builtin_sentences",
    "builtin_sentences_path",
    "calibration_sentences",
    "evaluation_sentences",
    "read_lines",
    "split_sentences",
]
