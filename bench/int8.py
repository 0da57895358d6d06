"""INT8 on all-MiniLM-L6-v2 (real weights): naive W8A8 vs SmoothQuant vs Outlier Suppression+.

    python bench/int8.py                 # everything (about 5 minutes on 2 busy cores)
    python bench/int8.py --skip-onnx     # torch simulation only
    python bench/int8.py --reference     # only the bench's reference migrations

Data: the built-in sentences (normc/data/sentences.txt): 64 calibration sentences (scales,
migration statistics), 32 held-out evaluation sentences (every number below), each
tokenized on its own to [1, 32].

For each variant -- (a) naive, (b) SmoothQuant alpha 0.5 / 0.8, (c) OS+ -- it reports:

* fp32 equivalence of the migrated model (max |diff| / max |ref| of last_hidden_state):
  migration is exact before quantization;
* sentence-embedding cosine to fp32 (mean / min over the evaluation sentences) for
  (i) simulated W8A8 in torch (normc.verify.quant_sim: per-tensor symmetric int8 linear
  inputs with static scales, per-channel symmetric int8 weights) and (ii) onnxruntime
  INT8 (normc.backends.quantize: QDQ, per-channel int8 weights, uint8 asymmetric static
  activations, linears only);
* per-layer relative errors ||y_q - y|| / ||y|| of Q, K, V, FFN in, FFN out, both *local*
  (the layer's own quantization, fp inputs) and *propagated* (end to end);
* channel-99 outlier ratio max|x_99| / median_j max|x_j| at the Q input and the FFN input
  of every layer, before and after migration;
* onnxruntime latency fp32 vs INT8 (spinning off; each model timed in its own contiguous
  block, the sequence of blocks run three times; medians).

Migrated models: from the REFERENCE IMPLEMENTATION IN THIS BENCH (``reference_smoothquant`` /
``reference_osplus``), and, for each migration whose rule file exists (``RULE_FILES``), also
from normc's rules through the normc API (row "<name> [normc rules]"; the one line marked
NORMC-API in ``migrate``), so the two can be compared side by side.
BERT is post-LN: the migrated LayerNorm output also feeds the residual add, so the reference
implementation puts the compensating ``x * s (+ z)`` on the skip input (a forward pre-hook on
BertSelfOutput / BertOutput; exact, one multiply(-add) per site).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from normc.data import calibration_sentences, evaluation_sentences  # noqa: E402
from normc.data.calibration import from_sentences  # noqa: E402
from normc.frontend.minilm import OUTLIER_CHANNEL, build_minilm, mean_pool_embedding  # noqa: E402
from normc.verify.quant_sim import (  # noqa: E402
    ChannelStats,
    fake_quant_per_tensor,
    fake_quant_weight_per_channel,
    linear_input_stats,
    per_linear_errors,
    record_linears,
    simulate_w8a8,
)

N_LAYERS = 6
GROUPS = {  # column label -> module path template
    "Q": "encoder.layer.{l}.attention.self.query",
    "K": "encoder.layer.{l}.attention.self.key",
    "V": "encoder.layer.{l}.attention.self.value",
    "FFN in": "encoder.layer.{l}.intermediate.dense",
    "FFN out": "encoder.layer.{l}.output.dense",
}

# The lead's rules (normc API) for each migration, used when the file exists.
RULE_FILES = {
    "smoothquant a=0.5": ROOT / "examples" / "minilm_smoothquant_a0.5.nc",
    "smoothquant a=0.8": ROOT / "examples" / "minilm_smoothquant.nc",
    "os+": ROOT / "examples" / "minilm_osplus.nc",
}


# ============================================================================ reference migrations
# REFERENCE IMPLEMENTATION IN BENCH: what normc's rules must reproduce (see REFERENCES.md,
# "Outlier migration"). Weights are [out, in]; channel j is an input channel of the linears.
@dataclass
class Site:
    norm: nn.LayerNorm          # the LayerNorm whose output is migrated
    linears: list[nn.Linear]    # every linear reading it
    skip: nn.Module             # BertSelfOutput / BertOutput: its 2nd argument is the residual
    stat_name: str              # the linear whose input statistics describe the site
    label: str


def migration_sites(model: nn.Module) -> list[Site]:
    layers = model.encoder.layer
    sites = []
    for l, layer in enumerate(layers):
        norm = model.embeddings.LayerNorm if l == 0 else layers[l - 1].output.LayerNorm
        att = layer.attention.self
        sites.append(Site(norm, [att.query, att.key, att.value], layer.attention.output,
                          f"encoder.layer.{l}.attention.self.query", f"L{l} QKV"))
        sites.append(Site(layer.attention.output.LayerNorm, [layer.intermediate.dense], layer.output,
                          f"encoder.layer.{l}.intermediate.dense", f"L{l} FFN"))
    return sites


def _skip_hook(module, args):
    hidden, residual = args[0], args[1]
    residual = residual * module.normc_skip_scale
    if getattr(module, "normc_skip_shift", None) is not None:
        residual = residual + module.normc_skip_shift
    return (hidden, residual) + tuple(args[2:])


def _compensate_skip(skip: nn.Module, s: torch.Tensor, z: torch.Tensor | None) -> None:
    skip.register_buffer("normc_skip_scale", s.clone())
    skip.register_buffer("normc_skip_shift", None if z is None else z.clone())
    skip.register_forward_pre_hook(_skip_hook)


@torch.no_grad()
def reference_smoothquant(model: nn.Module, stats: dict[str, ChannelStats], alpha: float) -> nn.Module:
    """SmoothQuant: s_j = max|X_j|^a / max_k |W_kj|^(1-a) (max over all linears reading X);
    gamma, beta /= s; W[:, j] *= s_j; residual input *= s."""
    model = copy.deepcopy(model)
    for site in migration_sites(model):
        act = stats[site.stat_name].absmax.double()
        w_max = torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in site.linears]).amax(dim=0).double()
        s = act.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
        s = torch.where((w_max > 0) & torch.isfinite(s), s, torch.ones_like(s)).clamp(min=1e-5)
        _apply_migration(site, s, None)
    return model


@torch.no_grad()
def reference_osplus(model: nn.Module, stats: dict[str, ChannelStats], site_inputs: dict[str, torch.Tensor],
                     n_grid: int = 16) -> nn.Module:
    """Outlier Suppression+: shift z_j = (max_j + min_j) / 2, then scale s_j = max(1, r_j / t)
    (r_j = half range of channel j) with the threshold t grid-searched to minimise the summed
    W8A8 output error of the linears reading the site on calibration activations.
    beta <- (beta - z) / s, gamma <- gamma / s; b <- b + W z (original W); W <- W diag(s);
    residual input <- x * s + z."""
    model = copy.deepcopy(model)
    for site in migration_sites(model):
        st = stats[site.stat_name]
        z = ((st.max + st.min) / 2).double()
        r = ((st.max - st.min) / 2).double().clamp(min=1e-8)
        # the search runs in float32 on a subsample of calibration tokens; the migration in float64
        x = (site_inputs[site.stat_name].double() - z).float()
        weights = [lin.weight.detach().float() for lin in site.linears]
        ref = [x @ w.T for w in weights]
        best = (math.inf, torch.ones_like(r))
        top = float(r.max())
        for i in range(n_grid):
            t = top * (0.02 ** (i / (n_grid - 1)))  # geometric grid from max range down to 2% of it
            s = torch.clamp(r / t, min=1.0)
            sf = s.float()
            xq = fake_quant_per_tensor(x / sf, float((r / s).max()) / 127)  # calibration absmax after migration
            err = sum(float((xq @ fake_quant_weight_per_channel(w * sf).T - y).pow(2).sum())
                      for w, y in zip(weights, ref))
            if err < best[0]:
                best = (err, s)
        _apply_migration(site, best[1], z)
    return model


def _apply_migration(site: Site, s: torch.Tensor, z: torch.Tensor | None) -> None:
    norm = site.norm
    dt = norm.weight.dtype
    beta = norm.bias.detach().double()
    if z is not None:
        for lin in site.linears:  # b <- b + W z with the ORIGINAL W
            lin.bias.copy_((lin.bias.double() + lin.weight.double() @ z).to(dt))
        beta = beta - z
    norm.weight.copy_((norm.weight.double() / s).to(dt))
    norm.bias.copy_((beta / s).to(dt))
    for lin in site.linears:
        lin.weight.copy_((lin.weight.double() * s).to(dt))
    _compensate_skip(site.skip, s.to(dt), None if z is None else z.to(dt))


RULES_SUFFIX = " [normc rules]"


def migrate(variant: str, loaded, stats, site_inputs) -> tuple[nn.Module, str]:
    """The migrated model for ``variant``: ``"<name> [normc rules]"`` from the lead's rule file
    through the normc API, ``"<name>"`` from the reference implementation in this bench."""
    if variant.endswith(RULES_SUFFIX):
        import normc.api

        rules = RULE_FILES[variant[: -len(RULES_SUFFIX)]]
        result = normc.api.apply(str(rules), loaded, write=False)  # NORMC-API: the one line
        if not result.passed:
            raise SystemExit(f"{rules}: verification failed: {result.report['verify'].get('failure')}")
        return result.graph_module, f"normc rules {rules.relative_to(ROOT)}"
    if variant.startswith("smoothquant"):
        alpha = float(variant.split("=")[1])
        return reference_smoothquant(loaded.module, stats, alpha), "reference implementation in bench"
    if variant == "os+":
        return reference_osplus(loaded.module, stats, site_inputs), "reference implementation in bench"
    raise ValueError(variant)


# ============================================================================ measurements
def hidden(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        return out[0]
    return out["last_hidden_state"] if not isinstance(out, torch.Tensor) else out


def embeddings(model, inputs) -> torch.Tensor:
    return torch.cat([mean_pool_embedding(hidden(model, a, k), mask_of(a, k)) for a, k in inputs])


def batched(inputs, size: int):
    """Stack single-sentence (args, kwargs) pairs into batches of ``size`` along dim 0 (the
    eager / simulated torch models take any batch; only the ONNX graphs are [1, 32])."""
    out = []
    for i in range(0, len(inputs), size):
        chunk = inputs[i: i + size]
        args = tuple(torch.cat([a[j] for a, _ in chunk]) for j in range(len(chunk[0][0])))
        kwargs = {k: torch.cat([kw[k] for _, kw in chunk]) for k in chunk[0][1]}
        out.append((args, kwargs))
    return out


def mask_of(args, kwargs) -> torch.Tensor:
    """The attention mask of one (args, kwargs) pair (MiniLM takes it positionally, 2nd)."""
    return kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]


def cos_stats(ref: torch.Tensor, emb: torch.Tensor) -> tuple[float, float]:
    c = (ref.double() * emb.double()).sum(-1) / (ref.double().norm(dim=-1) * emb.double().norm(dim=-1))
    return float(c.mean()), float(c.min())


def max_rel(model_a, model_b, inputs) -> float:
    worst = 0.0
    for a, k in inputs:
        ha, hb = hidden(model_a, a, k).double(), hidden(model_b, a, k).double()
        worst = max(worst, float((ha - hb).abs().max() / ha.abs().max()))
    return worst


def site_activations(model, inputs, names, max_rows: int = 512) -> dict[str, torch.Tensor]:
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def on_linear(name, x, y):
        rows[name].append(x.detach().reshape(-1, x.shape[-1]).float())

    for a, k in inputs:
        record_linears(model, a, k, names, on_linear)
    out = {}
    g = torch.Generator().manual_seed(0)
    for n, parts in rows.items():
        x = torch.cat(parts)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
        out[n] = x
    return out


def outlier_ratios(stats: dict[str, ChannelStats]) -> dict[str, list[float]]:
    return {
        "Q in": [stats[GROUPS["Q"].format(l=l)].outlier_ratio(OUTLIER_CHANNEL) for l in range(N_LAYERS)],
        "FFN in": [stats[GROUPS["FFN in"].format(l=l)].outlier_ratio(OUTLIER_CHANNEL) for l in range(N_LAYERS)],
    }


class LazyInputs(dict):
    """Calibration activations at the migration sites, recorded on first use (only the
    reference OS+ needs them)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        if not self._make:
            raise KeyError(key)
        self.update(self._make())
        self._make = None
        return self[key]


@dataclass
class Result:
    name: str
    source: str
    fp32_rel: float = 0.0
    sim_cos: tuple[float, float] = (math.nan, math.nan)
    onnx_cos: tuple[float, float] = (math.nan, math.nan)
    local: dict[str, float] = field(default_factory=dict)
    propagated: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    onnx_int8: Path | None = None
    seconds: float = 0.0


# ============================================================================ onnx
def onnx_embeddings(path: Path, inputs) -> torch.Tensor:
    from normc.backends.onnx_backend import ort_session, run_onnx

    sess = ort_session(path)
    return torch.cat([mean_pool_embedding(torch.from_numpy(run_onnx(sess, a, k)[0]), mask_of(a, k))
                      for a, k in inputs])


def time_block(path: Path, args, kwargs, n: int, warmup: int = 10) -> list[float]:
    from normc.backends.onnx_backend import ort_session
    from normc.backends.quantize import onnx_feed

    sess = ort_session(path)
    feed = onnx_feed([i.name for i in sess.get_inputs()], args, kwargs)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    del sess
    return times


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-onnx", action="store_true", help="torch simulation only")
    ap.add_argument("--reference", action="store_true", help="only the bench's reference migrations (skip the rule files)")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency block")
    ap.add_argument("--repeats", type=int, default=3, help="how many times the sequence of latency blocks runs")
    ap.add_argument("--workdir", default=None, help="where ONNX files go (default: a temporary folder)")
    opts = ap.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    loaded = build_minilm()
    model = loaded.module
    calib = from_sentences(calibration_sentences(), specs=loaded.input_specs, n_positional=len(loaded.example_args))
    evals = from_sentences(evaluation_sentences(), specs=loaded.input_specs, n_positional=len(loaded.example_args))
    print(f"# all-MiniLM-L6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"{len(calib)} calibration / {len(evals)} evaluation sentences, inputs [1, {calib[0][0][0].shape[1]}]")
    # torch measurements run on batches of 16 sentences (same numbers, less overhead)
    calib_b, evals_b = batched(calib, 16), batched(evals, 16)
    ref_emb = embeddings(model, evals_b)
    base_stats = linear_input_stats(model, calib_b)
    site_names = [s.stat_name for s in migration_sites(model)]
    site_inputs = LazyInputs(lambda: site_activations(model, calib_b, site_names))

    variants = ["naive", "smoothquant a=0.5", "smoothquant a=0.8", "os+"]
    if not opts.reference:  # each migration the lead's rules provide runs beside its reference
        for name, rules in RULE_FILES.items():
            if rules.exists():
                variants.insert(variants.index(name) + 1, name + RULES_SUFFIX)
    results: list[Result] = []
    models: dict[str, nn.Module] = {}
    for v in variants:
        t0 = time.perf_counter()
        if v == "naive":
            mig, source = model, "original model"
        else:
            mig, source = migrate(v, loaded, base_stats, site_inputs)
        # a graph from the normc API is traced with static [1, 32] shapes: no batching there
        cal_v, ev_v = (calib, evals) if isinstance(mig, torch.fx.GraphModule) else (calib_b, evals_b)
        stats = base_stats if mig is model else linear_input_stats(mig, cal_v)
        r = Result(v, source)
        r.fp32_rel = 0.0 if mig is model else max_rel(model, mig, ev_v)
        sim = simulate_w8a8(mig, cal_v, stats=stats)
        r.sim_cos = cos_stats(ref_emb, embeddings(sim, ev_v))
        names = [t.format(l=l) for t in GROUPS.values() for l in range(N_LAYERS)]
        r.local = per_linear_errors(None, sim, ev_v, names, mode="local")
        r.propagated = per_linear_errors(model, sim, ev_v, names, mode="propagated")
        r.ratios = outlier_ratios(stats)
        r.seconds = time.perf_counter() - t0
        models[v] = mig
        results.append(r)
        print(f"# {v}: simulated in {r.seconds:.1f} s ({source})", flush=True)

    latency = {}
    fp32_onnx_cos = None
    if not opts.skip_onnx:
        from normc.backends.onnx_backend import export_onnx
        from normc.backends.quantize import quantize_int8

        work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="normc-int8-"))
        work.mkdir(parents=True, exist_ok=True)
        fp32_path = work / "minilm_fp32.onnx"
        t0 = time.perf_counter()
        export_onnx(model, loaded.example_args, loaded.example_kwargs, fp32_path)
        fp32_onnx_cos = cos_stats(ref_emb, onnx_embeddings(fp32_path, evals))
        print(f"# exported fp32 ONNX in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in results:
            t0 = time.perf_counter()
            slug = r.name.replace(" [normc rules]", "_rules").replace(" ", "_").replace("=", "").replace("+", "plus")
            src = fp32_path
            if models[r.name] is not model:
                src = work / f"minilm_{slug}_fp32.onnx"
                export_onnx(models[r.name], loaded.example_args, loaded.example_kwargs, src)
            r.onnx_int8 = work / f"minilm_{slug}_int8.onnx"
            quantize_int8(src, r.onnx_int8, calib)
            r.onnx_cos = cos_stats(ref_emb, onnx_embeddings(r.onnx_int8, evals))
            print(f"# {r.name}: ONNX INT8 in {time.perf_counter() - t0:.1f} s", flush=True)
        best = max(results[1:], key=lambda x: x.onnx_cos[0])
        blocks = [("fp32", fp32_path), ("int8 naive", results[0].onnx_int8), (f"int8 {best.name}", best.onnx_int8)]
        args, kwargs = loaded.example_args, loaded.example_kwargs
        for rep in range(opts.repeats):
            for label, path in blocks:
                latency.setdefault(label, []).append(statistics.median(time_block(path, args, kwargs, opts.runs)))

    # ------------------------------------------------------------------ report
    print()
    print("## Sentence-embedding cosine to fp32 (32 held-out sentences; mean / min)")
    print()
    print("| variant | migration from | fp32 equivalence (max rel) | W8A8 sim cos | ONNX INT8 cos |"
          " mean local err Q/K/V | FFN in | FFN out | mean propagated err FFN out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        qkv = statistics.mean(r.local[GROUPS[g].format(l=l)] for g in ("Q", "K", "V") for l in range(N_LAYERS))
        fin = statistics.mean(r.local[GROUPS["FFN in"].format(l=l)] for l in range(N_LAYERS))
        fout = statistics.mean(r.local[GROUPS["FFN out"].format(l=l)] for l in range(N_LAYERS))
        pout = statistics.mean(r.propagated[GROUPS["FFN out"].format(l=l)] for l in range(N_LAYERS))
        print(f"| {r.name} | {r.source} | {r.fp32_rel:.1e} | {_pair(r.sim_cos)} | {_pair(r.onnx_cos)} | "
              f"{qkv:.4f} | {fin:.4f} | {fout:.4f} | {pout:.4f} |")
    if fp32_onnx_cos is not None:
        print(f"\nfp32 ONNX vs torch: cos {_pair(fp32_onnx_cos, 7)}")

    for kind in ("local", "propagated"):
        print()
        print(f"## Per-layer {kind} relative error ||y_q - y|| / ||y|| (W8A8 sim, held-out sentences)")
        print()
        print("| layer | " + " | ".join(f"{r.name}: Q K V FFNin FFNout" for r in results) + " |")
        print("|---|" + "---|" * len(results))
        for l in range(N_LAYERS):
            cells = []
            for r in results:
                errs = getattr(r, kind)
                cells.append(" ".join(f"{errs[GROUPS[g].format(l=l)]:.4f}" for g in GROUPS))
            print(f"| {l} | " + " | ".join(cells) + " |")

    print()
    print(f"## Channel-{OUTLIER_CHANNEL} outlier ratio max|x_{OUTLIER_CHANNEL}| / median channel max (calibration set)")
    print()
    print("| layer | " + " | ".join(f"{r.name}: Q in / FFN in" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for l in range(N_LAYERS):
        print(f"| {l} | " + " | ".join(f"{r.ratios['Q in'][l]:.2f} / {r.ratios['FFN in'][l]:.2f}" for r in results) + " |")

    if latency:
        print()
        print(f"## onnxruntime latency, [1, 32], spinning off, {opts.runs} runs per block, "
              f"blocks {' '.join('ABC' for _ in range(opts.repeats))}; median per block (ms)")
        print()
        base = statistics.median(latency["fp32"])
        print("| model | " + " | ".join(f"block {i + 1}" for i in range(opts.repeats)) + " | median of blocks | speed-up vs fp32 |")
        print("|---|" + "---|" * (opts.repeats + 2))
        for label, meds in latency.items():
            m = statistics.median(meds)
            print(f"| {label} | " + " | ".join(f"{x * 1e3:.2f}" for x in meds) + f" | {m * 1e3:.2f} | {base / m:.2f}x |")
    print(f"\n# total {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.2f}")
    return 0


def _pair(p: tuple[float, float], digits: int = 4) -> str:
    return f"{p[0]:.{digits}f} / {p[1]:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
