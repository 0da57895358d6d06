"""Render docs/architectures.md from the architecture matrix.

    python -m tests.archs.table          # rewrite docs/architectures.md
    python -m tests.archs.table --check  # exit 1 when it is stale
"""
from __future__ import annotations

import sys
from pathlib import Path

from .matrix import ARCHS, Outcome

DOC = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"

HEADER = """# Architectures

Hugging Face model classes built from tiny configs (random weights, no download) and run through
the example pipelines that apply to them. Each row is a test: `tests/archs/test_matrix.py` checks
the outcome below on every run of `python -m pytest -m slow tests/archs` (the rows marked *fast* run
in the default test run too); verification against the original model, in fp32, gates every row.
This page is rendered from the test's data (`tests/archs/matrix.py`) by `python -m tests.archs.table`.

Ops are counted in normc's canonical vocabulary (`normc passes --ops`), before → after the pipeline.

"""


def _ops(outcome: Outcome) -> str:
    return ", ".join(f"{op} {a} → {b}" for op, (a, b) in outcome.ops.items())


def _why(outcome: Outcome) -> str:
    parts = [outcome.note] if outcome.note else []
    if outcome.reason and outcome.result in ("refused", "partly converted", "gains folded", "converted"):
        parts.append(f"refusal: “…{outcome.reason}…”")
    return "; ".join(parts)


def render() -> str:
    lines = [HEADER, "| family | model class | example | outcome | ops | why |", "|---|---|---|---|---|---|"]
    for arch in ARCHS:
        for example, outcome in arch.outcomes.items():
            name = f"`{arch.model}`" + (f" ({arch.name})" if arch.name != arch.model else "")
            fast = " *fast*" if arch.fast == example else ""
            lines.append(f"| {arch.family} | {name} | `{example}.nc`{fast} | {outcome.result} | {_ops(outcome)} "
                         f"| {_why(outcome).replace('|', '/')} |")
    n_models = len({a.model for a in ARCHS})
    n_rows = sum(len(a.outcomes) for a in ARCHS)
    lines.append(f"\n{n_models} model classes, {n_rows} rows.\n")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        return 0 if DOC.read_text() == text else 1
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
