"""apply_rule leaves the right shape and dtype on every node it creates (inferred for the new nodes
only, no run of the model): the same as a full `annotate_shapes` of the rewritten model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normc.grammar.loader import load_std
from normc.ir.graph import annotate_shapes
from normc.ir.rewrite import apply_rule

RULES = ["std.fold_bn_conv", "std.fold_bn_linear", "std.fuse_batch_norm_relu", "std.fold_layer_norm_affine",
         "std.fuse_layer_norm_gelu", "std.fold_rms_norm_affine"]


def _stats(bn, g):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return bn


class Cnn(nn.Module):
    """Strided, grouped and shared convs; a BN the fold must leave (its conv has two readers) for
    the norm+relu fusion; BatchNorm1d after a linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, stride=2, padding=1), _stats(nn.BatchNorm2d(8), g)
        self.group, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), _stats(nn.BatchNorm2d(8), g)
        self.fan, self.bn_a, self.bn_b = nn.Conv2d(8, 4, 1), _stats(nn.BatchNorm2d(4), g), _stats(nn.BatchNorm2d(4), g)
        self.head, self.bn_h = nn.Linear(4, 6), _stats(nn.BatchNorm1d(6), g)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.group(x)))
        f = self.fan(x)
        x = F.relu(self.bn_a(f)) + self.bn_b(f)
        return self.bn_h(self.head(x.mean((2, 3))))


class Block(nn.Module):
    """LayerNorm read by linears only; LayerNorm + GELU; a decomposed RMSNorm with a gain."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.ln1, self.q, self.k = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.ln2, self.up = nn.LayerNorm(4), nn.Linear(4, 8)
        self.gain = nn.Parameter(torch.rand(8, generator=g) + 0.5)
        self.out = nn.Linear(8, 8)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.copy_(torch.rand(ln.weight.shape, generator=g) + 0.5)
                ln.bias.copy_(torch.randn(ln.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        h = self.ln1(x)
        a = self.q(h) + self.k(h).sum(-1, keepdim=True)
        b = self.up(F.gelu(self.ln2(self.k(a))))
        r = b * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        return self.out(r)


def recorded(gm):
    return {n.name: (n.meta.get("normc_shape"), n.meta.get("normc_dtype")) for n in gm.graph.nodes if n.op != "output"}


def check_each_rule_keeps_shapes(gm, inputs):
    std = load_std()
    applied = 0
    for name in RULES:
        report = apply_rule(gm, std.rules[name])
        applied += report.applied
        mine = recorded(gm)
        annotate_shapes(gm, inputs, {})
        assert mine == recorded(gm), name
        new = [n for n in gm.graph.nodes if n.meta.get("normc_rule") == name]
        assert all(n.meta.get("normc_shape") is not None for n in new), name
    return applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cnn_shapes_after_each_rule_equal_a_full_run(canonical, dtype):
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    gm = canonical(Cnn().eval().to(dtype), x)
    assert check_each_rule_keeps_shapes(gm, (x,)) == 4  # 3 folds, 1 norm+relu fusion (the fan-out BN)


@pytest.mark.parametrize("export", [False, True])
def test_transformer_block_shapes_after_each_rule_equal_a_full_run(canonical, export):
    x = torch.randn(2, 3, 8)
    gm = canonical(Block().eval(), x, export=export)
    assert check_each_rule_keeps_shapes(gm, (x,)) >= 3  # an affine fold, a gelu fusion, an rms affine fold


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "llama", "vit"])
def test_zoo_shapes_after_each_rule_equal_a_full_run(model):
    from normc.frontend import load_model
    from normc.pipeline import prepare_graph
    loaded = load_model(f"zoo:{model}")
    gm, _ = prepare_graph(loaded)
    check_each_rule_keeps_shapes(gm, loaded.example_args)
