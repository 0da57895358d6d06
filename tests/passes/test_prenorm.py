"""Pre-LN -> Pre-RMSNorm (std.prenorm_to_rmsnorm, normc/passes/prenorm.py).

Acceptance of "Transformer norms": the zoo transformers through examples/prenorm_to_rmsnorm.nc;
hand-written Pre-LN models the zoo does not have (parallel blocks, functional LayerNorm, a learned
position table, a tied head, a hand-written LayerNorm); every refusal with its reason; the ONNX
lowering of the converted model (RMSNormalization at opset 23).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.api import apply, load_rules
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir.graph import op_counts, op_name
from normc.pipeline import RunOptions, compile_model

EXAMPLE = "examples/prenorm_to_rmsnorm.nc"
D, HEADS, VOCAB, SEQ = 32, 4, 64, 8

PIPELINE = """
pipeline {
  apply std.prenorm_to_rmsnorm%s
  verify rel 1e-5
  verify dtype f64 rel 1e-10
}
"""


# ============================================================== hand-written models
def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (z.reshape(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, t, D))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LNChain(nn.Module):
    """A hand-written LayerNorm: mean / sub / pow / mean / add / rsqrt / mul, then * w + b."""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.bias = nn.Parameter(torch.zeros(D))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        c = x - mu
        var = c.pow(2).mean(-1, keepdim=True)
        return c * torch.rsqrt(var + self.eps) * self.weight + self.bias


class FuncLN(nn.Module):
    """F.layer_norm with its own parameters (no nn.LayerNorm)."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))
        self.b = nn.Parameter(torch.zeros(D))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (D,), self.w, self.b, self.eps)


NORMS = {"module": lambda: nn.LayerNorm(D), "functional": FuncLN, "chain": LNChain}


class Block(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)); `parallel`: x + attn(ln(x)) + mlp(ln(x)) (GPT-J)."""

    def __init__(self, norm="module", parallel=False):
        super().__init__()
        self.parallel = parallel
        self.ln1 = NORMS[norm]()
        if not parallel:
            self.ln2 = NORMS[norm]()
        self.attn, self.mlp = Attn(), MLP()

    def forward(self, x):
        if self.parallel:
            h = self.ln1(x)
            return x + self.attn(h) + self.mlp(h)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    """Token embedding + positions -> 2 Pre-LN blocks -> final LN -> LM head."""

    def __init__(self, norm="module", parallel=False, pos="embedding", tied=False):
        super().__init__()
        self.pos_kind = pos
        self.emb = nn.Embedding(VOCAB, D)
        if pos == "embedding":
            self.pos = nn.Embedding(SEQ, D)
        elif pos == "param":  # learned table added as a whole
            self.pos = nn.Parameter(torch.zeros(1, SEQ, D))
        self.blocks = nn.ModuleList([Block(norm, parallel) for _ in range(2)])
        self.ln_f = NORMS[norm]()
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        if self.pos_kind == "embedding":
            x = x + self.pos(torch.arange(ids.shape[1]))
        elif self.pos_kind == "param":
            x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def randomize(model: nn.Module, seed=0) -> nn.Module:
    """Random weights; norm gains in [0.5, 1.5), norm shifts ~N(0, 0.5) (non-trivial affines)."""
    g = _gen(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm, LNChain, FuncLN)):
                w, b = (mod.weight, mod.bias) if not isinstance(mod, FuncLN) else (mod.w, mod.b)
                w.copy_(torch.rand(D, generator=g) + 0.5)
                b.copy_(torch.randn(D, generator=g) * 0.5)
            elif isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(mod.in_features))
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
        for name, p in model.named_parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, SEQ), generator=_gen(1))


def loaded(module: nn.Module, name="hand") -> LoadedModel:
    return LoadedModel(module.eval(), (IDS,), {}, [InputSpec.from_example("input_ids", IDS)], name, False)


def run(module, text, **opts):
    return compile_model(load_rules(text=text), loaded(module), RunOptions(write=False, verify_inputs=2, **opts))


def rule_report(result, name="std.prenorm_to_rmsnorm"):
    return next(r for r in result.report["rules"] if r["name"] == name)


def verify_steps(result):
    """[(fp32 verify dict), (f64 verify dict)] of PIPELINE's two verify steps."""
    return [s["verify"] for s in result.report["steps"] if s["step"] == "verify"]


def n_ln(counts):
    return counts.get("layer_norm", 0)


def assert_converted_exactly(result, n_norms):
    before, after = (result.report["graph"][k]["op_counts"] for k in ("before", "after"))
    assert n_ln(before) == n_norms, before
    assert n_ln(after) == 0 and after.get("rms_norm") == n_norms, after
    assert rule_report(result)["applied"] == 1  # one residual stream
    fp32, f64 = verify_steps(result)
    assert result.passed, result.report["verify"]["failure"]
    assert fp32["max_rel_err"] <= 1e-5, fp32
    assert f64["max_rel_err"] <= 1e-10, f64
    # the converted graph still computes the model, on a fresh input too
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=_gen(7))
    with torch.no_grad():
        ref, got = result.reference(ids), result.graph_module(ids)
    assert (ref - got).abs().max() <= 1e-5 * ref.abs().max()


# ============================================================== (1) the zoo through examples/prenorm_to_rmsnorm.nc
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """zoo(name) -> (CompileResult, out.pt2 path): normc.api.apply(EXAMPLE, "zoo:NAME", out.pt2), once per model."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("zoo")

    def get(name):
        if name not in cache:
            out = folder / f"{name}.pt2"
            cache[name] = (apply(EXAMPLE, f"zoo:{name}", out), out)
        return cache[name]
    return get


def zoo_inputs(result, n=2):
    g = torch.Generator().manual_seed(123)
    return [(tuple(result.loaded.example_args), dict(result.loaded.example_kwargs))] + [
        result.loaded.sample_inputs(g) for _ in range(n)]


@pytest.mark.parametrize("name", ["gpt2", pytest.param("opt", marks=SLOW), pytest.param("vit", marks=SLOW)])
def test_zoo_pre_ln_models_become_rms_norm_exactly(zoo, name):
    from normc.verify import Tolerance, verify_models
    result, out = zoo(name)
    report = result.report
    assert result.passed, report["verify"]["failure"]
    before, after = report["graph"]["before"]["op_counts"], report["graph"]["after"]["op_counts"]
    assert n_ln(before) > 0 and n_ln(after) == 0, (before, after)
    assert after.get("rms_norm") == n_ln(before)
    assert rule_report(result)["applied"] >= 1 and not rule_report(result)["skipped"]
    fp32, f64 = verify_steps(result)
    assert fp32["passed"] and fp32["max_rel_err"] <= 1e-4, fp32
    assert f64["passed"] and f64["max_rel_err"] <= 1e-10, f64
    assert report["outputs"] == [{"format": "torch", "path": str(out)}]
    # the archive is a plain torch.export program, with RMSNorm in it, computing the original model
    ep = torch.export.load(str(out))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("rms_norm" in t for t in targets) == n_ln(before)
    assert not any("layer_norm" in t for t in targets)
    check = verify_models(result.reference, ep.module(), zoo_inputs(result), Tolerance(max_rel=1e-4))
    assert check.passed, check.summary()


def test_zoo_gpt2_unties_its_head(zoo):
    result, _ = zoo("gpt2")
    notes = rule_report(result)["notes"]
    assert any("untied" in n and "lm_head" in n for n in notes), notes
    # the gains/shifts of the LayerNorms read only by linears went into them (ln_f: read through a reshape)
    assert rule_report(result, "std.fold_layer_norm_affine")["applied"] >= 4


def test_zoo_bert_is_refused_as_post_ln(zoo):
    result, _ = zoo("bert")
    rep = rule_report(result)
    assert rep["applied"] == 0 and rep["skipped"]
    reasons = " | ".join(s["reason"] for s in rep["skipped"])
    assert "post-LN" in reasons and "residual add `" in reasons, reasons
    before, after = result.report["graph"]["before"]["op_counts"], result.report["graph"]["after"]["op_counts"]
    assert before == after and n_ln(after) == 5
    assert result.passed


@SLOW
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_zoo_rms_norm_models_are_already_rms_norm(zoo, name):
    result, _ = zoo(name)
    assert result.passed, result.report["verify"]["failure"]
    rep = rule_report(result)
    assert rep["applied"] == 0 and any("already RMSNorm" in n for n in rep["notes"]), rep["notes"]
    assert rule_report(result, "std.fold_rms_norm_affine")["applied"] > 0
    fp32, f64 = verify_steps(result)
    assert 0 < fp32["max_rel_err"] <= 1e-4, fp32  # the gains really moved into the linears
    # HF's RMSNorm upcasts to float32: in the f64 copy the fold finds no gain, and the report must say so
    # rather than present a 0.0 error as a proof
    assert f64["max_rel_err"] > 0 or any("replay rewrote" in w for w in result.report.get("warnings", [])), f64


@SLOW
def test_zoo_pt2_loads_without_transformers(zoo):
    import subprocess
    import sys
    _, out = zoo("gpt2")
    code = f"import torch; ep = torch.export.load({str(out)!r}); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# ============================================================== (2) hand-written Pre-LN models, converted exactly
@pytest.mark.parametrize("kind, norms", [
    ("parallel", 3),     # (a) GPT-J: one LayerNorm read by attention and MLP
    ("functional", 5),   # (b) F.layer_norm with the block's own parameters
    ("pos_param", 5),    # (c) position table as an nn.Parameter added to the token embeddings
    ("tied", 5),         # (d) LM head tied to the token embedding
    ("chain", 5),        # (e) hand-written mean/sub/pow/mean/add/rsqrt/mul LayerNorm, then * w + b
])
def test_hand_written_pre_ln_models_convert_exactly(kind, norms):
    model = randomize(LM(
        norm={"functional": "functional", "chain": "chain"}.get(kind, "module"),
        parallel=kind == "parallel", pos="param" if kind == "pos_param" else "embedding", tied=kind == "tied"))
    if kind == "tied":
        assert model.head.weight is model.emb.weight
    result = run(model, PIPELINE % "")
    assert_converted_exactly(result, norms)
    if kind == "tied":
        assert any("untied" in n for n in rule_report(result)["notes"])
        assert model.head.weight is model.emb.weight  # the user's module is left as it was
    eps = {n.kwargs["eps"] for n in result.graph_module.graph.nodes if op_name(n) == "rms_norm"}
    assert eps == ({1e-6} if kind == "functional" else {1e-5})  # FuncLN's eps, copied exactly


def test_convert_then_fold_affines_is_exact():
    """The example's order (fold gamma/beta into the linears, then convert) on a hand model."""
    model = randomize(LM())
    result = run(model, PIPELINE.replace("apply std.prenorm_to_rmsnorm%s", "apply std.fold_norm_affine\n"
                                                                          "  apply std.prenorm_to_rmsnorm"))
    assert_converted_exactly(result, 5)
    # ln2 (-> fc1) and ln_f (-> head) feed only linears: their affines went into them; ln1 is also read
    # by Attn's `x.shape` (a getattr user), so fold_norm_affine leaves it (see test_fold_norm_affine)
    fold = rule_report(result, "std.fold_layer_norm_affine")
    assert fold["applied"] >= 3 and fold["applied"] + len(fold["skipped"]) == 5
    assert all("getattr" in s["reason"] for s in fold["skipped"])
    rms = [n for n in result.graph_module.graph.nodes if op_name(n) == "rms_norm"]
    assert sum(1 for n in rms if len(n.args) < 2 or n.args[1] is None) == fold["applied"]


# ============================================================== (3) tied head: untie = false is caught
def test_tied_head_without_untying_fails_verification():
    model = randomize(LM(tied=True))
    result = run(model, PIPELINE % "(untie = false)")
    assert not result.passed
    step = next(s for s in result.report["steps"] if s["step"].startswith("apply std.prenorm_to_rmsnorm"))
    assert not step["verify"]["passed"]
    assert step["verify"]["max_rel_err"] > 1e-2  # large, not rounding
    assert "broke equivalence" in result.report["verify"]["failure"]


# ============================================================== (4) refusals: reason, and nothing changed
class PostLN(nn.Module):
    """BERT-style: x = ln1(x + attn(x)); x = ln2(x + mlp(x)); embeddings normed first."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.ln_emb = nn.LayerNorm(D)
        self.attn, self.mlp = Attn(), MLP()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.ln_emb(self.emb(ids))
        x = self.ln1(x + self.attn(x))
        x = self.ln2(x + self.mlp(x))
        return self.head(x)


class NonAffineWriter(nn.Module):
    """x + gelu(ln(x)): the branch ends in a gelu, no linear after it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.ln1, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + F.gelu(self.ln1(x))
        return self.head(self.ln_f(x))


class ResidualOutput(nn.Module):
    """Returns the un-normed residual stream next to the logits."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.block = Block()
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.block(self.emb(ids))
        return self.head(self.ln_f(x)), x


class OtherReader(nn.Module):
    """A block without a pre-norm: a linear reads the stream directly."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.block = Block()
        self.fc = nn.Linear(D, D)
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.block(self.emb(ids))
        x = x + self.fc(x)
        return self.head(self.ln_f(x))


class Sandwich(nn.Module):
    """x + ln_post(attn(ln_pre(x))): a norm on the block output before the add."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.ln_pre, self.ln_post, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attn()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.ln_post(self.attn(self.ln_pre(x)))
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("cls, needles", [
    (PostLN, ["post-LN", "residual add"]),
    (NonAffineWriter, ["not affine", "gelu"]),
    (ResidualOutput, ["model output"]),
    (OtherReader, ["not a LayerNorm", "linear"]),
    (Sandwich, ["post-LN", "sandwich", "ln_post"]),
], ids=["post_ln", "non_affine", "residual_output", "other_reader", "sandwich"])
def test_refusals_name_the_reason_and_change_nothing(cls, needles):
    model = randomize(cls())
    result = run(model, PIPELINE % "")
    rep = rule_report(result)
    assert rep["applied"] == 0
    assert rep["skipped"], rep
    reasons = " | ".join(s["reason"] for s in rep["skipped"])
    for needle in needles:
        assert needle in reasons, reasons
    before, after = (result.report["graph"][k]["op_counts"] for k in ("before", "after"))
    assert before == after and n_ln(after) > 0 and "rms_norm" not in after
    assert result.passed  # nothing changed: verification holds trivially
    if cls is PostLN:  # the reason names an add node of the graph
        adds = [n.name for n in result.graph_module.graph.nodes if op_name(n) == "add"]
        assert any(f"residual add `{a}`" in reasons for a in adds), reasons


def test_scope_that_leaves_a_reader_out_is_refused():
    """`apply std.prenorm_to_rmsnorm on "blocks.*"`: ln_f reads the same stream but is out of scope."""
    text = PIPELINE.replace("apply std.prenorm_to_rmsnorm%s", 'apply std.prenorm_to_rmsnorm on "blocks.*"')
    result = run(randomize(LM()), text)
    rep = rule_report(result)
    assert rep["applied"] == 0 and rep["skipped"], rep
    assert result.report["graph"]["before"]["op_counts"] == result.report["graph"]["after"]["op_counts"]
    assert result.passed


def test_scope_refusal_names_the_out_of_scope_layer_norm():
    text = PIPELINE.replace("apply std.prenorm_to_rmsnorm%s", 'apply std.prenorm_to_rmsnorm on "blocks.*"')
    reasons = " | ".join(s["reason"] for s in rule_report(run(randomize(LM()), text))["skipped"])
    assert "out of scope" in reasons and "ln_f" in reasons, reasons


# ============================================================== (7) ONNX lowering of the converted model
@pytest.fixture(scope="module")
def converted_parallel():
    return run(randomize(LM(parallel=True)), PIPELINE % "")


def test_onnx_opset23_lowers_rms_norm_to_rms_normalization(converted_parallel, tmp_path):
    from normc.backends.onnx_backend import check_onnx, export_onnx, onnx_op_counts
    res = converted_parallel
    assert res.passed
    path = export_onnx(res.graph_module, (IDS,), None, tmp_path / "rms.onnx", opset=23)
    counts = onnx_op_counts(path)
    assert counts.get("RMSNormalization") == 3, counts
    assert "LayerNormalization" not in counts and "ReduceMean" not in counts, counts
    inputs = [((IDS,), {}), ((torch.randint(0, VOCAB, (2, SEQ), generator=_gen(5)),), {})]
    check = check_onnx(path, res.graph_module, inputs)
    assert check.passed, check.summary()
    # and against the user's original model
    check = check_onnx(path, res.reference, inputs)
    assert check.passed, check.summary()


def test_onnx_remaining_layer_norms_at_opset18(tmp_path):
    """LayerNorms left in a canonical graph (a refused post-LN model) lower to LayerNormalization at opset 18."""
    from normc.backends.onnx_backend import check_onnx, export_onnx, onnx_op_counts
    from normc.pipeline import prepare_graph
    model = randomize(PostLN())
    gm, _ = prepare_graph(loaded(model))
    assert n_ln(op_counts(gm)) == 3
    path = export_onnx(gm, (IDS,), None, tmp_path / "ln.onnx", opset=18)
    counts = onnx_op_counts(path)
    assert counts.get("LayerNormalization") == 3 and "RMSNormalization" not in counts, counts
    check = check_onnx(path, model, [((IDS,), {})])
    assert check.passed, check.summary()


# ============================================================== writers and loaders that were refused or misread before
class SlicedPositions(LM):
    """Learned positions as a longer table sliced to the sequence: `x + self.pos[:, :T]`."""

    def __init__(self):
        super().__init__(pos=None)
        self.pos_table = nn.Parameter(torch.zeros(1, 2 * SEQ, D))

    def forward(self, ids):
        x = self.emb(ids) + self.pos_table[:, :ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class ClsAfterPositions(LM):
    """A CLS token concatenated after the token and position embeddings were summed."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, D))

    def forward(self, ids):
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        x = torch.cat([self.cls.expand(ids.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def test_sliced_position_table_converts():
    """A slice of a parameter over a non-hidden dim commutes with centring (refused before c698c96)."""
    result = run(randomize(SlicedPositions()), PIPELINE % "")
    assert rule_report(result)["applied"] == 1, rule_report(result)["skipped"]
    assert_converted_exactly(result, 5)


def test_cls_token_after_summed_embeddings_converts():
    """cat([cls, emb + pos]): a sum of affine writers is affine (refused as `add, not affine` before c698c96)."""
    result = run(randomize(ClsAfterPositions()), PIPELINE % "")
    assert rule_report(result)["applied"] == 1, rule_report(result)["skipped"]
    assert_converted_exactly(result, 5)


def test_f64_replay_of_a_pt2_model():
    """A model loaded from a torch.export program: the f64 replay re-traces the f64 module, not the stored fp32
    program (before c698c96 it replayed the fp32 graph: error ~2e-7 > 1e-10, or a dtype error with float inputs)."""
    import dataclasses
    m = randomize(LM(parallel=True))
    lm = dataclasses.replace(loaded(m), exported_program=torch.export.export(m, (IDS,)))
    result = compile_model(load_rules(text=PIPELINE % ""), lm, RunOptions(write=False, verify_inputs=2))
    assert result.passed, result.report["verify"]["failure"]
    assert verify_steps(result)[1]["max_rel_err"] <= 1e-10


# ============================================================== forms found on real architectures (issue 12)
class FalconLinear(nn.Linear):
    """Falcon's linear: `x @ W.T + b` (a matmul by a weight parameter, not F.linear)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class MatmulLM(LM):
    """The LM with every projection written as Falcon writes it."""

    def __init__(self):
        super().__init__()
        for blk in self.blocks:
            for owner, name in ((blk.attn, "qkv"), (blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
                old = getattr(owner, name)
                new = FalconLinear(old.in_features, old.out_features)
                setattr(owner, name, new)


def test_linears_written_as_matmuls_convert():
    result = run(randomize(MatmulLM()), PIPELINE % "")
    assert_converted_exactly(result, 5)


class LayerScaleBlock(Block):
    """DINOv2 / BEiT / CaiT: each branch multiplied by a per-channel parameter before the add."""

    def __init__(self):
        super().__init__()
        self.ls1 = nn.Parameter(torch.rand(D) + 0.1)
        self.ls2 = nn.Parameter(torch.rand(D) + 0.1)

    def forward(self, x):
        x = x + self.attn(self.ln1(x)) * self.ls1
        return x + self.ls2 * self.mlp(self.ln2(x))


class LayerScaleLM(LM):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([LayerScaleBlock() for _ in range(2)])


def test_layer_scale_writers_are_affine():
    model = randomize(LayerScaleLM())
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.copy_(torch.rand(D, generator=_gen(3)) + 0.1)
    result = run(model, PIPELINE % "")
    assert_converted_exactly(result, 5)
    # the per-channel multiplies went into the projections' weights
    assert result.report["graph"]["after"]["op_counts"].get("mul", 0) < result.report["graph"]["before"]["op_counts"]["mul"]


class EmbeddingNorm(LM):
    """BLOOM: the residual stream starts at a LayerNorm of the embeddings (word_embeddings_layernorm)."""

    def __init__(self):
        super().__init__(pos=None)
        self.emb_ln = nn.LayerNorm(D)

    def forward(self, ids):
        x = self.emb_ln(self.emb(ids))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def test_stream_starting_at_a_layer_norm_converts_with_one_centring_op():
    result = run(randomize(EmbeddingNorm()), PIPELINE % "")
    rep = rule_report(result)
    assert rep["applied"] == 2 and not rep["skipped"], rep  # the embedding stream and the main stream
    before, after = (result.report["graph"][k]["op_counts"] for k in ("before", "after"))
    assert n_ln(before) == 6 and n_ln(after) == 0 and after.get("rms_norm") == 6, after
    assert after.get("reduce_mean") == 1 and after.get("sub") == 1, after  # y - mean(y), once
    assert any("starts at layer_norm `emb_ln" in n for n in rep["notes"]), rep["notes"]
    fp32, f64 = verify_steps(result)
    assert result.passed and fp32["max_rel_err"] <= 1e-5 and f64["max_rel_err"] <= 1e-10


def test_crms_stream_starting_at_a_layer_norm():
    text = PIPELINE.replace("std.prenorm_to_rmsnorm%s", "std.prenorm_to_crmsnorm")
    result = run(randomize(EmbeddingNorm()), text)
    rep = rule_report(result, "std.prenorm_to_crmsnorm")
    assert rep["applied"] == 2, rep
    fp32, f64 = verify_steps(result)
    assert result.passed and f64["max_rel_err"] <= 1e-10, f64


class RawStreamOutput(EmbeddingNorm):
    """CLIP vision / BEiT with mean pooling: the raw residual stream is an output (last_hidden_state)."""

    def forward(self, ids):
        x = self.emb_ln(self.emb(ids))
        for blk in self.blocks:
            x = blk(x)
        return {"last_hidden_state": x, "pooled": self.ln_f(x.mean(1))}


def test_raw_stream_output_is_refused_naming_the_output():
    model = randomize(RawStreamOutput())
    result = compile_model(load_rules(text=PIPELINE % ""), loaded(model), RunOptions(write=False, verify_inputs=1))
    rep = rule_report(result)
    assert rep["applied"] == 0 and rep["skipped"], rep
    reasons = " | ".join(s["reason"] for s in rep["skipped"])
    assert "model output `last_hidden_state` is the residual stream" in reasons, reasons
    assert "post-LN" not in reasons, reasons
    # the embedding LayerNorm's own stream is not converted alone either: it only starts the refused one
    assert "starts a stream that stays LayerNorm" in reasons, reasons
    assert result.report["graph"]["before"]["op_counts"] == result.report["graph"]["after"]["op_counts"]


class GroupedConvWriter(nn.Module):
    """A depthwise conv writing into the stream: its weights cannot recentre over all channels."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv1d(D, D, 3, padding=1, groups=D)
        self.ln1, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = MLP()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x):  # x: [B, D, T]
        h = self.patch(x).transpose(1, 2)
        h = h + self.mlp(self.ln1(h))
        return self.head(self.ln_f(h))


def test_grouped_conv_writer_is_refused():
    x = torch.randn(2, D, SEQ, generator=_gen(4))
    model = randomize(GroupedConvWriter())
    lm = LoadedModel(model.eval(), (x,), {}, [InputSpec.from_example("x", x)], "grouped", False)
    result = compile_model(load_rules(text=PIPELINE % ""), lm, RunOptions(write=False, verify_inputs=1))
    reasons = " | ".join(s["reason"] for s in rule_report(result)["skipped"])
    assert f"conv writer `patch" in reasons and f"{D} groups" in reasons, reasons
    assert result.passed


class ChannelsFirst(nn.Module):
    """A conv stream in [B, C, L] read through permutes (ConvNeXt-style): the hidden axis is tracked through
    them, and a conv reading the stream directly is named."""

    def __init__(self, conv_reader: bool):
        super().__init__()
        self.stem = nn.Conv1d(4, D, 3, padding=1)
        self.conv_reader = conv_reader
        self.mix = nn.Conv1d(D, D, 1)
        self.ln1, self.ln_f = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = MLP()

    def forward(self, x):  # x: [B, 4, L]
        h = self.stem(x)                                     # [B, D, L], channels on dim 1
        if self.conv_reader:
            h = h + self.mix(h)
        h = h + self.mlp(self.ln1(h.permute(0, 2, 1))).permute(0, 2, 1)
        return self.ln_f(h.permute(0, 2, 1)).mean(1)


@pytest.mark.parametrize("conv_reader", [False, True], ids=["converts", "conv_reader"])
def test_channels_first_stream(conv_reader):
    x = torch.randn(2, 4, SEQ, generator=_gen(5))
    model = randomize(ChannelsFirst(conv_reader))
    lm = LoadedModel(model.eval(), (x,), {}, [InputSpec.from_example("x", x)], "cf", False)
    result = compile_model(load_rules(text=PIPELINE % ""), lm, RunOptions(write=False, verify_inputs=1))
    rep = rule_report(result)
    assert result.passed, result.report["verify"]["failure"]
    if conv_reader:
        reasons = " | ".join(s["reason"] for s in rep["skipped"])
        assert rep["applied"] == 0 and "also read by conv `mix" in reasons, reasons
    else:
        assert rep["applied"] == 1 and not rep["skipped"], rep
        assert result.report["graph"]["after"]["op_counts"].get("rms_norm") == 2
        assert verify_steps(result)[1]["max_rel_err"] <= 1e-10
