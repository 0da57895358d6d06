"""The ONNX output from the rewritten graph without a second torch.export (issue 10 item 2: nothing is
re-traced that can reuse the graph). The ONNX exporter retraces what it is given, so normc hands it the
rewritten graph as a program (`program_of_graph`); the traced program is the fallback whenever that is
refused or its export fails the onnxruntime check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normc import api
from normc.backends import torch_backend
from normc.backends.onnx_backend import ort_session
from normc.frontend.specs import LoadedModel, specs_from_examples
from normc.frontend.trace import trace_counts
from normc.pipeline import RunOptions, compile_model

RULES = 'pipeline {{\n  apply std.prenorm_to_rmsnorm\n  verify rel 1e-5\n  export onnx to "{out}"\n}}\n'


def _tokens(batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return {"input_ids": torch.randint(0, 64, (batch, seq), generator=g)}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _run(model, kwargs, tmp_path, rules=RULES, **options):
    out = tmp_path / "m.onnx"
    loaded = LoadedModel(model, (), kwargs, specs_from_examples((), kwargs), "gpt2-tiny", True)
    before = trace_counts()
    result = compile_model(api.load_rules(text=rules.format(out=out)), loaded,
                           RunOptions(verify_inputs=1, allow_outside_writes=True, **options))
    after = trace_counts()
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    return result, out, counts


def _assert_matches(model, out, shapes):
    sess = ort_session(out)
    for b, s in shapes:
        kw = _tokens(b, s)
        with torch.no_grad():
            ref = model(**kw).logits
        got = sess.run(None, {k: v.numpy() for k, v in kw.items()})[0]
        assert got.shape == tuple(ref.shape)
        assert np.abs(got - ref.numpy()).max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_onnx_from_the_rewritten_graph_is_not_traced_again(tmp_path, monkeypatch):
    model = _gpt2()
    seen = {}
    real = torch_backend.program_of_graph

    def spy(gm):
        seen["gm"], seen["ep"] = gm, real(gm)
        return seen["ep"]
    monkeypatch.setattr(torch_backend, "program_of_graph", spy)
    result, out, counts = _run(model, _tokens(1, 16), tmp_path)
    assert result.passed, result.report["verify"]
    assert counts.get("torch.export") == 1 and "export_graph" not in counts  # the model's trace only
    assert result.report["onnx_check"][0]["passed"]
    assert not [w for w in result.report["warnings"] if "opset" in w]
    sess = ort_session(out)
    assert {i.name: list(i.shape) for i in sess.get_inputs()} == {"input_ids": ["batch", "sequence"]}
    _assert_matches(model, out, [(1, 16), (3, 9), (2, 40)])

    # the program shares the graph's weights (no copies) and keeps its inputs, dims symbolic
    gm, ep = seen["gm"], seen["ep"]
    graph_tensors = {t.data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    assert ep.state_dict and all(t.data_ptr() in graph_tensors for t in ep.state_dict.values())
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert user == [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user[0]).meta["val"]
    assert all(not isinstance(d, int) for d in val.shape)


def test_a_symbolic_trace_graph_is_traced_for_the_output(tmp_path):
    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))
    m = Cnn().eval()
    x = torch.randn(1, 3, 8, 8)
    loaded = LoadedModel(m, (x,), {}, specs_from_examples((x,), {}, ["x"]), "cnn", False)
    out = tmp_path / "m.onnx"
    before = trace_counts()
    text = 'pipeline {\n  apply std.fold_bn_conv\n  export onnx to "%s"\n}\n' % out
    result = compile_model(api.load_rules(text=text), loaded, RunOptions(verify_inputs=1, allow_outside_writes=True))
    assert result.passed
    assert trace_counts().get("export_graph", 0) - before.get("export_graph", 0) == 1  # no fake values to reuse
    sess = ort_session(out)
    xi = torch.randn(2, 3, 5, 7)
    got = sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, m(xi).numpy(), atol=1e-5)


@pytest.mark.parametrize("failure", ["refused", "wrong"])
def test_the_traced_program_is_the_fallback(tmp_path, monkeypatch, failure):
    """An untraced program the exporter refuses, or whose ONNX is wrong, never decides the outcome."""
    real = torch_backend.program_of_graph

    def broken(gm):
        ep = real(gm)
        if failure == "refused":
            ep.graph_signature.input_specs.pop(0)  # the exporter cannot bind its inputs any more
        else:
            key = next(k for k, t in ep.state_dict.items() if t.dim() == 2)
            ep.state_dict[key] = torch.nn.Parameter(torch.zeros_like(ep.state_dict[key]), requires_grad=False)
        return ep
    monkeypatch.setattr(torch_backend, "program_of_graph", broken)
    model = _gpt2()
    result, out, counts = _run(model, _tokens(1, 16), tmp_path)
    assert result.passed and result.report["onnx_check"][0]["passed"]
    assert counts.get("export_graph") == 1
    assert not [w for w in result.report["warnings"] if "opset" in w]
    _assert_matches(model, out, [(1, 16), (2, 5)])
