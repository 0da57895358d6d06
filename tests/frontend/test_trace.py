import functools
from collections import Counter

import pytest
import torch
import torch.nn as nn

from normc.errors import NormcError
from normc.frontend import (
    LoadedModel,
    InputSpec,
    compare_outputs,
    inplace_ops,
    load_model,
    module_path,
    trace_model,
    zoo_names,
)


@functools.lru_cache(maxsize=None)
def traced(name):
    loaded = load_model(f"zoo:{name}")
    return loaded, trace_model(loaded)


def op_counts(gm):
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", ["resnet18", "cnn", "gpt2", "opt", "vit", "llama", "qwen2", "mistral", "bert"])
def test_zoo_traces_and_reproduces(name):
    loaded, res = traced(name)
    gm = res.graph_module
    assert isinstance(gm, torch.fx.GraphModule)
    assert res.method == ("symbolic_trace" if name == "cnn" else "torch.export")
    assert inplace_ops(gm) == []
    with torch.no_grad():
        ok, err, why = compare_outputs(loaded.run(), gm(*loaded.example_args))
    assert ok, why
    # fresh inputs drawn from the specs
    g = torch.Generator().manual_seed(7)
    args, kwargs = loaded.sample_inputs(g)
    with torch.no_grad():
        ok, err, why = compare_outputs(loaded.run(args, kwargs), gm(*args, **kwargs))
    assert ok, why


def test_export_keeps_parameter_paths_and_module_stack():
    loaded, res = traced("resnet18")
    gm = res.graph_module
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "encoder.stages.0.layers.0.layer.0.convolution.weight" in targets
    assert targets <= set(dict(loaded.module.named_parameters())) | set(dict(loaded.module.named_buffers()))
    ops = op_counts(gm)
    assert ops["aten.conv2d.default"] == 20
    assert ops["aten._native_batch_norm_legit_no_training.default"] == 20
    convs = [n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert all("nn_module_stack" in n.meta for n in convs)
    assert module_path(convs[1]).endswith("convolution")
    assert convs[1].meta["normc_module_type"].endswith("Conv2d")


def test_transformer_graph_shapes():
    _, gpt2 = traced("gpt2")
    ops = op_counts(gpt2.graph_module)
    assert ops["aten.addmm.default"] == 8  # HF Conv1D projections
    assert ops["aten.layer_norm.default"] == 5
    conv1d = [n for n in gpt2.graph_module.graph.nodes if n.target == torch.ops.aten.addmm.default]
    assert all(n.meta["normc_module_type"].endswith("Conv1D") for n in conv1d)
    _, llama = traced("llama")
    ops = op_counts(llama.graph_module)
    assert ops["aten.layer_norm.default"] == 0
    assert ops["aten.rsqrt.default"] == 5  # RMSNorm decomposed: pow, mean, add, rsqrt, mul, mul
    _, bert = traced("bert")
    assert op_counts(bert.graph_module)["aten.layer_norm.default"] == 5


def test_graph_owns_its_weights():
    loaded, res = traced("cnn")
    before = loaded.module.conv1.weight.clone()
    with torch.no_grad():
        res.graph_module.get_submodule("conv1").weight.mul_(2)
    assert torch.equal(loaded.module.conv1.weight, before)
    with torch.no_grad():
        res.graph_module.get_submodule("conv1").weight.div_(2)


def test_symbolic_trace_module_paths():
    _, res = traced("cnn")
    nodes = {n.name: n for n in res.graph_module.graph.nodes}
    assert module_path(nodes["conv1"]) == "conv1"
    assert nodes["bn1"].meta["normc_module_type"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    relu = [n for n in res.graph_module.graph.nodes if n.op == "call_function" and "relu" in str(n.target)]
    assert relu and all(module_path(n) == "" for n in relu)
    assert "tensor_meta" in nodes["conv1"].meta


class LoopOverBatch(nn.Module):
    """symbolic_trace cannot iterate over a traced shape; torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        rows = [self.lin(x[i]) for i in range(x.shape[0])]
        return self.ln(torch.stack(rows))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def _loaded(module, *args):
    module.eval()
    specs = [InputSpec(f"arg{i}", tuple(a.shape), a.dtype) for i, a in enumerate(args)]
    return LoadedModel(module, args, {}, specs, "test", False)


def test_fallback_to_export_records_reason():
    torch.manual_seed(0)
    loaded = _loaded(LoopOverBatch(), torch.randn(3, 4))
    res = trace_model(loaded)
    assert res.method == "torch.export"
    assert any("symbolic_trace failed" in n for n in res.notes)
    with torch.no_grad():
        assert compare_outputs(loaded.run(), res.graph_module(*loaded.example_args))[0]
    assert any(n.target == torch.ops.aten.layer_norm.default for n in res.graph_module.graph.nodes)


def test_untraceable_model_is_a_normc_error():
    loaded = _loaded(DataDependent(), torch.randn(2, 3))
    with pytest.raises(NormcError) as e:
        trace_model(loaded)
    assert "torch.export" in e.value.message
    assert e.value.hint
    assert "\n" not in e.value.message


def test_broken_inputs_are_a_normc_error():
    loaded = _loaded(nn.Linear(4, 2), torch.randn(2, 5))
    with pytest.raises(NormcError):
        trace_model(loaded)


def test_compare_outputs():
    a = {"x": torch.ones(3), "y": (torch.zeros(2, dtype=torch.long),)}
    assert compare_outputs(a, {"x": torch.ones(3), "y": (torch.zeros(2, dtype=torch.long),)})[0]
    assert not compare_outputs(a, {"x": torch.ones(3) * 1.01, "y": (torch.zeros(2, dtype=torch.long),)})[0]
    assert not compare_outputs(torch.ones(3), torch.ones(4))[0]


def test_all_zoo_models_covered():
    assert len(zoo_names()) >= 9
