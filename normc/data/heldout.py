"""Held-out sentences for judging a quantized sentence encoder: the 32 built-in evaluation
sentences, then sentences generated from templates until there are `n`.

The templates (subject, verb phrase, object, ending) are combined in an order drawn by
`random.Random(0)`: the list is the same on every machine and run. The generated sentences are
plainer than the hand-written ones, but never appear in the calibration split, which is what a
held-apart quality gate needs. (96 hand-written sentences give only 32 for evaluation.)
"""
from __future__ import annotations

import itertools
import random

SUBJECTS = ["The committee", "My neighbour", "A small startup", "The old lighthouse keeper", "Our physics teacher",
            "The city council", "A stray cat", "The research team", "Her younger brother", "The night train",
            "A local bakery", "The orchestra", "The hospital", "An amateur astronomer", "The football club",
            "The museum guide"]
VERBS = ["quietly postponed", "carefully reviewed", "unexpectedly praised", "finally repaired", "openly questioned",
         "proudly announced", "nervously explained", "barely noticed", "eagerly compared", "slowly rebuilt",
         "accidentally deleted", "cheerfully shared"]
OBJECTS = ["the annual budget", "a broken bicycle", "the new vaccine trial", "the river bridge", "an ancient map",
           "the quarterly report", "a recipe for rye bread", "the winter timetable", "the solar panel design",
           "a letter from abroad", "the election results", "the missing painting", "a jazz record", "the tax form"]
ENDINGS = ["before the storm arrived.", "after months of delay.", "during the morning meeting.",
           "without telling anyone.", "in front of a large crowd.", "despite the rising costs.",
           "while the power was out.", "on a rainy Tuesday.", "for the third time this year.",
           "as the sun went down."]


def template_sentences(n: int) -> list[str]:
    """`n` distinct generated sentences, in a fixed order."""
    combos = list(itertools.product(range(len(SUBJECTS)), range(len(VERBS)), range(len(OBJECTS)), range(len(ENDINGS))))
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} template sentences")
    random.Random(0).shuffle(combos)
    return [f"{SUBJECTS[s]} {VERBS[v]} {OBJECTS[o]} {ENDINGS[e]}" for s, v, o, e in combos[:n]]


def heldout_sentences(n: int = 256) -> list[str]:
    """The built-in evaluation sentences, then template sentences up to `n` in all."""
    from . import evaluation_sentences

    base = evaluation_sentences()
    return (base + template_sentences(max(0, n - len(base))))[:n]


__all__ = ["heldout_sentences", "template_sentences"]
