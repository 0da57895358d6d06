"""zoo:un-vit and zoo:un-gpt: plain-nn transformers with UnifiedNorm, traced to canonical
`fixed_norm` nodes that fold exactly into the linears reading them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from normc.frontend import ZOO, load_model
from normc.frontend.zoo import UN_SIZES, UNConfig, build_un_gpt, build_un_vit
from normc.ir import ops
from normc.nn import UnifiedNorm
from normc.pipeline.runner import prepare_graph

NAMES = ["un-vit", "un-gpt"]
ROOT = Path(__file__).resolve().parents[2]


def _fixed(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.fixed_norm]


@pytest.mark.parametrize("name", NAMES)
def test_entry_listed_with_tags(name):
    e = ZOO[name]
    assert e.description and "unified_norm" in e.tags and "fixed_norm" in e.tags


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_eval_and_runs(name):
    a, b = load_model(f"zoo:{name}"), load_model(f"zoo:{name}")
    assert a.source == f"zoo:{name}" and not a.is_hf and not a.module.training
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a.example_args, b.example_args))
    spec = a.input_specs[0]
    assert tuple(a.example_args[0].shape) == spec.shape
    out = a.run()
    if name == "un-vit":
        assert spec.name == "pixel_values" and spec.shape == (1, 3, 32, 32) and out.shape == (1, 10)
    else:
        assert spec.name == "input_ids" and spec.shape == (1, 16) and spec.dtype == torch.int64
        assert 0 <= int(a.example_args[0].min()) and int(a.example_args[0].max()) < spec.high
        assert out.shape == (1, 16, UN_SIZES["small"].vocab)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_norms_are_randomized(name):
    m = load_model(f"zoo:{name}").module
    norms = [x for x in m.modules() if isinstance(x, UnifiedNorm)]
    assert len(norms) == 5  # 2 blocks x 2 + final
    assert not any(isinstance(x, nn.LayerNorm) for x in m.modules())
    for n in norms:
        assert (n.running_var >= 0.5).all() and (n.running_var <= 2.0).all()
        assert (n.weight >= 0.5).all() and (n.weight <= 1.5).all() and n.bias.abs().max() > 0
        torch.testing.assert_close(n.scale, n.weight / torch.sqrt(n.running_var + n.eps))


def test_restores_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_model("zoo:un-gpt")
    assert torch.equal(torch.rand(3), expected)


def test_causal():
    loaded = load_model("zoo:un-gpt")
    ids = loaded.example_args[0]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % UN_SIZES["small"].vocab
    with torch.no_grad():
        a, b = loaded.module(ids), loaded.module(changed)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name", NAMES)
def test_canonical_graph_has_one_fixed_norm_per_norm(name):
    loaded = load_model(f"zoo:{name}")
    gm, info = prepare_graph(loaded)
    assert info["method"] == "symbolic_trace"
    nodes = _fixed(gm)
    assert len(nodes) == 5
    for n in nodes:
        assert all(a.op == "get_attr" for a in n.args[1:])
    with torch.no_grad():
        assert torch.equal(gm(*loaded.example_args), loaded.run())  # bit for bit
    # every block norm feeds linears only (un-gpt: q, k, v; the final norm feeds the head)
    block = [n for n in nodes if ".norm" in n.args[1].target and n.args[1].target.startswith("blocks.")]
    assert len(block) == 4
    for n in block:
        assert all(u.target is ops.linear for u in n.users)


@pytest.mark.parametrize("name", NAMES)
def test_fold_into_linears_is_exact(name):
    import normc.api
    loaded = load_model(f"zoo:{name}")
    result = normc.api.apply(str(Path(__file__).resolve().parents[2] / "examples" / "un_fold.nc"), loaded)
    gm = result.graph_module
    assert result.passed
    assert len(_fixed(gm)) == 0  # un-vit's final norm is sunk below x[:, 0] first, then folded
    for seed in range(3):
        args, _ = loaded.sample_inputs(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref, got = loaded.module(*args), gm(*args)
        assert (ref - got).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_custom_config_and_sizes():
    tiny = UNConfig(dim=32, depth=1, heads=2, mlp=64, image=16, patch=8, vocab=50, max_len=12, seq=12)
    v = build_un_vit(tiny)
    assert v.example_args[0].shape == (1, 3, 16, 16) and v.run().shape == (1, 10)
    g = build_un_gpt(tiny, seq=8)
    assert g.example_args[0].shape == (1, 8) and g.run().shape == (1, 8, 50)
    assert {"small", "base"} <= set(UN_SIZES) and UN_SIZES["base"].depth == 12 and UN_SIZES["base"].dim == 768
    from normc.errors import NormcError
    with pytest.raises(NormcError):
        build_un_gpt(tiny, seq=13)
    with pytest.raises(NormcError):
        build_un_vit("huge")


def test_onnx_lowering_of_fixed_norm(tmp_path):
    from normc.backends.onnx_backend import export_onnx, onnx_op_counts, ort_session, run_onnx

    loaded = load_model("zoo:un-gpt")
    gm, _ = prepare_graph(loaded)
    path = export_onnx(gm, loaded.example_args, {}, tmp_path / "un_gpt.onnx")
    counts = onnx_op_counts(path)
    assert counts.get("Mul", 0) >= 5 and counts.get("Add", 0) >= 5  # fixed_norm -> Mul + Add
    assert "LayerNormalization" not in counts
    out = run_onnx(ort_session(path), loaded.example_args)[0]
    torch.testing.assert_close(torch.from_numpy(out), loaded.run(), rtol=1e-4, atol=1e-5)
