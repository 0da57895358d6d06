"""The streaming executor: a rules file applied to a checkpoint directory one block at a time.

    config ──meta build──▶ skeleton (blocks stubbed) ──token ids──▶ hidden states entering block 0
    block i: weights from the shards ─▶ the pipeline (trace, calibrate on the carried hidden states,
             apply, verify in the checkpoint's dtype) ─▶ layout plan ─▶ output shard i
             carried: original hidden (the original canonical graph) and rewritten hidden (the new one)
    head (final norm + lm_head, blocks stubbed) ─▶ the same, on the final hidden states ─▶ logits
             original vs rewritten end to end

Each unit runs through the ordinary pipeline runner, so rules, statistics, per-site math (float64,
stored in the parameter's dtype) and verification are the same code as without streaming. Never
more than one block's weights (and the runner's copies of them) plus the skeleton are in memory.
"""
from __future__ import annotations

import gc
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.hf_dir import refuse_if_no_place, write_config
from ..checkpoint.layout import plan_layout
from ..checkpoint.writer import (
    ShardWriter,
    atomic_dir_replace,
    copy_side_files,
    usual_permissions,
)
from ..errors import NormcError, VerificationFailed
from ..frontend.specs import InputSpec, LoadedModel, specs_from_examples
from ..grammar import syntax_tree as T
from ..ir.graph import get_param
from ..pipeline.runner import RunOptions, _Runner, share_weights_copy
from ..verify import Tolerance
from ..verify.inputs import cast_inputs, sample_inputs
from ..verify.sites import run_upcast
from .model import (
    BlockUnit,
    LazyCheckpoint,
    Skeleton,
    build_meta,
    find_blocks,
    load_unit,
    read_config,
    unit_bytes,
    unload_unit,
)

STREAM_SHARE = 0.5  # stream by itself when the checkpoint's bytes exceed this share of available memory


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def should_stream(folder, forced: bool) -> tuple[bool, str]:
    """Whether to stream `folder`, and why (said in the summary)."""
    if forced:
        return True, "--stream"
    size = LazyCheckpoint(folder).nbytes()
    avail = available_memory()
    if avail and size > STREAM_SHARE * avail:
        return True, (f"the checkpoint ({size / 1e9:.1f} GB) exceeds {STREAM_SHARE:.0%} of the available memory "
                      f"({avail / 1e9:.1f} GB)")
    return False, ""


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _UnitRunner(_Runner):
    """The pipeline runner on one unit, fed the carried inputs: calibration statistics come from the
    hidden states the original model has at this unit, verification runs on the carried ones."""

    def __init__(self, program, loaded, options, calib, verify, traced):
        super().__init__(program, loaded, options)
        self._calib, self._verify, self._traced = calib, verify, traced

    def trace(self):
        """The unit's canonical graph, traced once by the executor (it also carries the original hidden
        states): the runner rewrites a copy that shares its weights."""
        before, info = self._traced
        return share_weights_copy(before), {**info, "notes": list(info["notes"])}

    def inputs(self, n, dtype=None):
        inputs = self._verify[: n + 1]
        return cast_inputs(inputs, dtype) if dtype is not None else inputs

    def calibrate(self, gm, step):
        from ..verify.calibrate import collect
        calib = self._calib[: step.samples] if step.samples else self._calib
        self.stats = collect(gm, calib)
        self.stats.source = step.source
        self.calib_inputs = calib


@dataclass
class StreamReport:
    reason: str
    source: str
    output: str
    dtype: str
    blocks: int
    block_path: str
    largest_unit_bytes: int = 0
    largest_block_bytes: int = 0
    per_unit: list = field(default_factory=list)
    worst_block: dict = field(default_factory=dict)
    end_to_end: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    peak_rss_bytes: int = 0
    seconds: float = 0.0
    failure: str | None = None
    calibration_samples: int = 0
    verification_inputs: int = 0
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / a64.abs().max().clamp_min(1e-30))


def stream_apply(program, folder, output, *, reason: str = "--stream", verify_inputs: int = 2, seed: int = 0,
                 input_specs: list[InputSpec] | None = None, seq_len: int = 64, max_shard_bytes: int | None = None,
                 say=None) -> StreamReport:
    say = say or (lambda m: None)
    t0 = time.perf_counter()
    folder = Path(folder)
    ckpt = LazyCheckpoint(folder)
    config = read_config(folder)
    dtype = ckpt.dtype()
    say(f"streaming {folder} ({ckpt.nbytes() / 1e9:.2f} GB, {dtype}): {reason}")
    model = build_meta(config, dtype)
    blocks = find_blocks(model, ckpt.keys())
    skel = Skeleton(model, blocks)
    skel_keys = _load_skeleton(skel, ckpt)
    report = StreamReport(reason, str(folder), str(output), str(dtype).replace("torch.", ""), len(skel.real),
                          blocks.path)

    # token inputs: the example, verification draws and calibration, as the non-streaming runner makes them
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    specs = input_specs or [InputSpec("input_ids", (1, seq_len), torch.int64, 0, vocab)]
    example = sample_inputs(specs, 1, seed=0)[0]
    verify_ids = [example] + list(sample_inputs(specs, verify_inputs, seed=seed))
    calib_step = next((s for s in (program.main.pipeline.steps if program.main.pipeline else [])
                       if isinstance(s, T.Calibrate)), None)
    calib_ids = []
    if calib_step is not None:
        from ..verify.calibrate import calibration_inputs
        pseudo = LoadedModel(skel, tuple(example[0]), dict(example[1]), specs, str(folder), True)
        calib_ids = calibration_inputs(pseudo, calib_step.source, calib_step.samples,
                                       Path(program.main.file).parent, seed=seed + 1)
    report.calibration_samples, report.verification_inputs = len(calib_ids), len(verify_ids)
    ids_of = [args[0] if args else next(iter(kw.values())) for args, kw in list(verify_ids) + list(calib_ids)]
    recs = [skel.block_inputs(ids) for ids in ids_of]      # hidden into block 0 + each block's kwargs
    nv = len(verify_ids)
    h_orig = [r[0][0] for r in recs]                        # carried: original model
    h_new = [r[0][0] for r in recs[:nv]]                    # carried: rewritten model (verification inputs)
    # in bf16/fp16 also the original computed in float32 (parameters upcast one op at a time): the function the
    # checkpoint's dtype approximates, so the end-to-end figures say how far each model is from it
    reduced = dtype in (torch.float16, torch.bfloat16)
    h_exact = [h.float() for h in h_new] if reduced else None

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        writer = ShardWriter(tmp, max_shard_bytes or 2 * 1024**3)
        for i, block in enumerate(skel.real):
            keys = load_unit(block, ckpt, blocks.prefix(i))
            nbytes = unit_bytes(block)
            say(f"block {i + 1}/{len(skel.real)} ({nbytes / 1e6:.0f} MB)")
            _, args0, kw0 = recs[0][i]
            unit = BlockUnit(block, args0, kw0)
            flat = [unit.flat_inputs(recs[j][i][1], recs[j][i][2]) for j in range(len(recs))]
            orig_in = [((h_orig[j], *flat[j]), {}) for j in range(len(recs))]
            before, info, noise = _original_graph(unit, orig_in[:nv], dtype)
            result = _run_unit(_with_tolerance(program, dtype, noise), unit, orig_in[:nv], orig_in[nv:],
                               f"{folder}:{blocks.prefix(i)}", seed, (before, info))
            entry = _unit_entry(f"{blocks.prefix(i)[:-1]}", nbytes, result, noise)
            report.per_unit.append(entry)  # in the report even when it fails
            _check(result, entry)
            plan = plan_layout(before, result.graph_module, unit)
            refuse_if_no_place(plan, block)
            state = unit.state_dict(keep_vars=True)
            for k in keys:
                name = "block." + k[len(blocks.prefix(i)):]
                writer.add(k, plan.updates.get(name, state[name]).detach())
            writer.flush()
            with torch.no_grad():
                new_out = [result.graph_module(h_new[j], *flat[j]) for j in range(nv)]
                h_orig = [before(*a) for a, _ in orig_in]
            if h_exact is not None:
                h_exact = _exact_chain(before, [(h_exact[j], *flat[j]) for j in range(nv)])
            entry["carried_rel_err"] = max(_rel_err(a, b) for a, b in zip(h_orig[:nv], new_out))
            h_new = new_out
            report.largest_block_bytes = max(report.largest_block_bytes, nbytes)
            del result, unit, plan, state, new_out, before
            unload_unit(block)
            _release_memory()

        say("head (final norm, output layer)")
        nbytes = unit_bytes(skel)
        tail_in = [((ids_of[j], h_orig[j]), {}) for j in range(len(recs))]
        before, info, noise = _original_graph(skel, tail_in[:nv], dtype)
        result = _run_unit(_with_tolerance(program, dtype, noise), skel, tail_in[:nv], tail_in[nv:],
                           f"{folder}:head", seed, (before, info))
        entry = _unit_entry("head", nbytes, result, noise)
        report.per_unit.append(entry)
        _check(result, entry)
        plan = plan_layout(before, result.graph_module, skel)
        refuse_if_no_place(plan, model)
        state = skel.state_dict(keep_vars=True)
        untied = [k[2:] for k in plan.untied]  # tied to another key and now different: both are written
        for k in skel_keys + [k for k in untied if k not in skel_keys]:
            name = "m." + k
            writer.add(k, plan.updates.get(name, state[name]).detach())
        with torch.no_grad():
            logits_orig = [before(*a) for a, _ in tail_in[:nv]]
            logits_new = [result.graph_module(ids_of[j], h_new[j]) for j in range(nv)]
            logits_exact = _exact_chain(before, [(ids_of[j], h_exact[j]) for j in range(nv)]) \
                if h_exact is not None else None
        report.largest_unit_bytes = max(e["bytes"] for e in report.per_unit)
        worst = max(report.per_unit[:-1], key=lambda e: e["max_rel_err"])
        report.worst_block = {"unit": worst["unit"], "max_rel_err": worst["max_rel_err"]}
        e2e = max(_rel_err(a, b) for a, b in zip(logits_orig, logits_new))
        tol = Tolerance.default_for(dtype)
        # each block passed its own check; across many blocks the dtype's rounding adds up, so the end-to-end
        # figure is reported (and warned about past the dtype's tolerance), not a second gate
        report.end_to_end = {"max_rel_err": e2e, "tolerance_rel": tol.max_rel, "inputs": nv,
                             "within_tolerance": e2e <= (tol.max_rel or 0)}
        if logits_exact is not None:
            orig_err = max(_rel_err(x, o) for x, o in zip(logits_exact, logits_orig))
            new_err = max(_rel_err(x, n) for x, n in zip(logits_exact, logits_new))
            report.end_to_end.update(original_vs_float32_rel=orig_err, rewritten_vs_float32_rel=new_err)
        if not report.end_to_end["within_tolerance"]:
            if logits_exact is None:
                report.warnings.append(f"end-to-end logits differ by {e2e:.3g} (relative), beyond {dtype}'s "
                                       f"{tol.max_rel:g}: the per-block errors add up over {len(skel.real)} blocks")
            elif new_err > (NOISE_FACTOR - 1) * max(orig_err, tol.max_rel or 0):
                report.warnings.append(f"end-to-end logits differ by {e2e:.3g} (relative); against the same "
                                       f"checkpoint computed in float32 the rewritten model is {new_err:.3g} off, "
                                       f"the original {orig_err:.3g}: the rewrite lost more than {dtype} itself does")
        report.files = writer.finish()
        write_config(config, folder, tmp, untie=bool(untied))
        report.files = ["config.json", *report.files, *copy_side_files(folder, tmp)]
        usual_permissions(tmp)
        atomic_dir_replace(tmp, output)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, NormcError):  # the units done so far, and the failing one, for --report
            report.failure = str(exc)
            report.peak_rss_bytes, report.seconds = peak_rss(), round(time.perf_counter() - t0, 2)
            exc.stream_report = report
        raise
    report.peak_rss_bytes = peak_rss()
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def _release_memory() -> None:
    """Collect, then hand the freed heap back to the OS: without it glibc keeps the fragments of each
    block's temporaries and the process's RSS grows by about a block per block (OPT-1.3B: 1.8 -> 3.2 GB)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _load_skeleton(skel: Skeleton, ckpt: LazyCheckpoint) -> list[str]:
    """Load the non-block weights; keys tied to another (lm_head = embeddings) are tied, not read."""
    state = skel.m.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for k, t in state.items():
        by_tensor.setdefault(id(t), []).append(k)
    load = {}
    for names in by_tensor.values():
        present = [k for k in names if k in ckpt.where]
        if not present:
            raise NormcError(f"the checkpoint has no `{names[0]}`", "the directory's weights do not match its config.json")
        value = ckpt.get(present[0])
        for k in names:
            load[k] = value
    skel.m.load_state_dict(load, strict=True, assign=True)
    ckpt.close()
    if len(load) != len({id(v) for v in load.values()}) and hasattr(skel.m, "tie_weights"):
        skel.m.tie_weights()
    return [k for k in state if k in ckpt.where]


def _unit_loaded(module, verify_in, source="unit") -> LoadedModel:
    args, kwargs = verify_in[0]
    return LoadedModel(module, tuple(args), dict(kwargs), specs_from_examples(args, kwargs), source, True)


def _original_graph(module, verify_in, dtype):
    """The unit's canonical graph before any rule (what carries the original hidden states, as the whole
    model's graph would; the runner rewrites a copy of it), how it was traced, and, in a reduced-precision
    dtype, the original's own error there: the eager block against the same block evaluated in float32
    (parameters upcast one op at a time), the function its dtype approximates."""
    from ..pipeline.runner import prepare_graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        before, info = prepare_graph(_unit_loaded(module, verify_in))
    _share_weights(before, module)
    if dtype not in (torch.float16, torch.bfloat16):
        return before, info, 0.0
    noise = 0.0
    with torch.no_grad():
        for args, _ in verify_in:
            exact = run_upcast(before, args, torch.float32)
            got = _first(module(*args))
            if exact is None:  # a graph this evaluator cannot run: the spread between two evaluations
                exact = (_first(before(*args)),)
            noise = max(noise, _rel_err(exact[0], got))
    return before, info, noise


def _exact_chain(before, inputs: list) -> list | None:
    """The unit's original graph run in float32 on the carried float32 values (None: it cannot be)."""
    outs = [run_upcast(before, tuple(a), torch.float32) for a in inputs]
    return None if any(o is None for o in outs) else [o[0] for o in outs]


def _share_weights(gm, module) -> int:
    """Point the traced graph's parameters back at the module's tensors (tracing copied them; the values
    are the same): one copy of the block in memory instead of two. Returns how many were shared."""
    state = module.state_dict(keep_vars=True)
    shared = 0
    for n in gm.graph.nodes:
        t = state.get(n.target) if n.op == "get_attr" else None
        if t is None:
            continue
        cur = get_param(gm, n)
        if isinstance(cur, torch.Tensor) and cur.shape == t.shape and cur.dtype == t.dtype \
                and cur.data_ptr() != t.data_ptr() and torch.equal(cur, t):
            cur.data = t.data
            shared += 1
    return shared


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


NOISE_FACTOR = 3.0


def _with_tolerance(program, dtype, noise: float):
    """In bf16/fp16 a block's output carries the dtype's rounding of every op: at d=4096 the original block
    is itself ~1% (relative to its largest output) from the function it approximates, and the rewritten one
    rounds its new weights too. Unless the rules file states a tolerance, a unit passes when the rewritten
    output is within NOISE_FACTOR x max(the dtype's default, the original's own error) of the original's:
    by the triangle inequality that holds whenever the rewritten block is at most twice as far from the
    exact function as the original is (measured on LLaMA-7B-shaped random bf16 blocks: rewritten vs original
    reached 2.05 x the dtype default at block 11, within 3 x). The rewrite's exactness itself is the float64
    site math's business (`verify dtype f64`)."""
    import dataclasses
    pipeline = program.main.pipeline
    if pipeline is None or dtype not in (torch.float16, torch.bfloat16):
        return program
    if any(isinstance(s, T.Verify) and {"rel", "max_rel", "max_abs"} & set(s.options) for s in pipeline.steps):
        return program
    rel = NOISE_FACTOR * max(Tolerance.default_for(dtype).max_rel or 0.0, noise)
    steps = [*pipeline.steps, T.Verify({"rel": rel}, {}, pipeline.loc)]
    main = dataclasses.replace(program.main, pipeline=dataclasses.replace(pipeline, steps=steps))
    return dataclasses.replace(program, main=main)


def _run_unit(program, module, verify_in, calib_in, source, seed, traced):
    loaded = _unit_loaded(module, verify_in, source)
    options = RunOptions(write=False, verify_inputs=len(verify_in) - 1, seed=seed)
    with warnings.catch_warnings():  # copying the unit's input spec trips a torch pytree deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        return _UnitRunner(program, loaded, options, calib_in, verify_in, traced).run()


def _unit_entry(name: str, nbytes: int, result, noise: float) -> dict:
    v = result.report["verify"]
    return {"unit": name, "bytes": nbytes, "passed": result.passed, "failure": v.get("failure"),
            "max_rel_err": v.get("max_rel_err") or 0.0, "max_abs_err": v.get("max_abs_err") or 0.0,
            "tolerance_rel": (v.get("tolerance") or {}).get("max_rel"), "original_dtype_error_rel": noise,
            "sites": sum(r.get("applied", 0) for r in result.report["rules"])}


def _check(result, entry) -> None:
    if not result.passed:
        raise VerificationFailed(f"{entry['unit']}: {entry['failure']}", "nothing was written; see the report")
