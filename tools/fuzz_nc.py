"""Fuzz the `.nc` front end: random and damaged programs must give normc's own errors only.

    python tools/fuzz_nc.py --count 100000 --seed 0 --jobs 2

Each program is read as a rules file is (bytes -> UTF-8 -> parse -> `use` -> check) in a
scratch folder that holds a `lib.nc`. A program passes when it loads or raises NormcError
(a located exit-2 error); any other exception is a crash, saved with its traceback under
--out. Well-formed programs with valid literals must also parse. Exit status: 0 without
crashes, 1 otherwise. See docs/fuzzing.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import ncgen

LIB = "rule lib_rule { match y = relu(relu(x)) rewrite y = relu(x) }\n"


def case(seed: int, i: int) -> tuple[str, bytes]:
    """The i-th program of a run: (kind, bytes). Deterministic in (seed, i)."""
    rng = random.Random(f"{seed}:{i}")
    kind = rng.choice(["valid", "valid", "program", "program", "mutated", "mutated", "mutated"])
    if kind == "valid":
        return kind, ncgen.program(rng, valid_literals=True).encode()
    if kind == "program":
        return kind, ncgen.program(rng).encode()
    return kind, ncgen.mutate(ncgen.program(rng, valid_literals=rng.random() < 0.5), rng)


def run_one(kind: str, data: bytes, folder: Path) -> str | None:
    """None when normc behaved, else the failure (a traceback, or why a valid program failed)."""
    from normc.errors import NormcError
    from normc.grammar.checker import check_program
    from normc.grammar.diagnostics import NcError
    from normc.grammar.loader import load_program
    from normc.grammar.parser import decode_source, parse_text
    file = str(folder / "fuzz.nc")
    try:
        text = decode_source(data, file)
        if kind == "valid":
            try:
                parse_text(text, file)
            except NcError as e:
                return f"a well-formed program did not parse:\n{e.render()}"
        program = load_program(text=text, file=file)  # `use "x.nc"` resolves in the scratch folder (the cwd)
        check_program(program)
        rendered = None
    except NormcError as e:
        rendered = e.render()  # rendering must not fail either
        str(rendered)
    except RecursionError:
        return traceback.format_exc(limit=8)
    except Exception:  # noqa: BLE001 - any other exception is the finding
        return traceback.format_exc()
    return None


def _worker(args):
    seed, start, stop, out = args
    folder = Path(tempfile.mkdtemp(prefix="normc-fuzz-"))
    (folder / "lib.nc").write_text(LIB)
    os.chdir(folder)
    crashes, kinds = [], {}
    for i in range(start, stop):
        kind, data = case(seed, i)
        kinds[kind] = kinds.get(kind, 0) + 1
        failure = run_one(kind, data, folder)
        if failure is not None:
            crashes.append(i)
            path = Path(out) / f"crash-{seed}-{i}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "program.nc").write_bytes(data)
            (path / "failure.txt").write_text(f"kind: {kind}\n{failure}")
    return crashes, kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000, help="programs to try (default 10,000)")
    ap.add_argument("--seed", type=int, default=0, help="run seed: the same seed tries the same programs")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--out", default="fuzz-crashes", help="folder for crashing programs (default fuzz-crashes)")
    ap.add_argument("--show", type=int, metavar="I", help="print program I of the run and exit")
    args = ap.parse_args(argv)
    if args.show is not None:
        sys.stdout.buffer.write(case(args.seed, args.show)[1])
        return 0
    out = str(Path(args.out).resolve())
    t0 = time.perf_counter()
    chunk = 500
    tasks = [(args.seed, s, min(s + chunk, args.count), out) for s in range(0, args.count, chunk)]
    crashes, kinds, done = [], {}, 0
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        for found, k in pool.imap_unordered(_worker, tasks):
            crashes += found
            for key, n in k.items():
                kinds[key] = kinds.get(key, 0) + n
            done += sum(k.values())
            if done % 10_000 < chunk:
                print(f"  {done} programs, {len(crashes)} crash(es), {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    print(f"fuzz_nc: {done} programs (seed {args.seed}; {mix}) in {seconds:.0f} s "
          f"({done / max(seconds, 1e-9):.0f}/s): {len(crashes)} crash(es)")
    if crashes:
        print(f"crashing programs are in {out}; first: program {min(crashes)} "
              f"(python tools/fuzz_nc.py --seed {args.seed} --show {min(crashes)})")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
