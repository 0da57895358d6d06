"""The rewriter's cost is linear in the graph, checked by what it counts (never by a clock): on a
chain 4x as long, every counter grows at most 4x. A quadratic regression (a whole-graph scan or
cleanup per site, a re-sweep per change) makes one of them grow 16x and fails here on any machine."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from normc.grammar.loader import load_std
from normc.ir.rewrite import apply_rule

COUNTERS = ("attempts", "visited", "cleanup")


def conv_bn_chain(k: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(k)
    layers = []
    for _ in range(k):
        bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(3, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        layers += [nn.Conv2d(3, 3, 3, padding=1), bn]
    return nn.Sequential(*layers).eval()


class ScaleChain(nn.Module):
    """relu(x) * s_0 * s_1 * ... * s_k: a fixpoint rule folds the scales, k sites one after another."""

    def __init__(self, k: int):
        super().__init__()
        g = torch.Generator().manual_seed(k)
        self.scales = nn.ParameterList(nn.Parameter(torch.rand(4, generator=g) + 0.5) for _ in range(k + 1))

    def forward(self, x):
        y = torch.relu(x)
        for s in self.scales:
            y = y * s
        return y


def counters(reports) -> dict[str, int]:
    return {c: sum(getattr(r.stats, c) for r in reports) for c in COUNTERS}


@contextlib.contextmanager
def graph_scans(monkeypatch):
    """Counts the nodes of every walk over a whole graph (`for n in graph.nodes`, fx's dead-code pass,
    lint, codegen) and of every lookup in fx's op index (`find_nodes`): a probe outside the engine, so
    a whole-graph pass per site shows up even if the engine's own counters missed it."""
    seen = {"nodes": 0}
    node_list = fx.graph._node_list
    forward, backward, find = node_list.__iter__, node_list.__reversed__, fx.Graph.find_nodes

    def counted(walk):
        def walk_counted(self):
            seen["nodes"] += len(self)
            return walk(self)
        return walk_counted

    def find_counted(self, **kw):
        found = find(self, **kw)
        seen["nodes"] += len(found)
        return found
    monkeypatch.setattr(node_list, "__iter__", counted(forward))
    monkeypatch.setattr(node_list, "__reversed__", counted(backward))
    monkeypatch.setattr(fx.Graph, "find_nodes", find_counted)
    try:
        yield seen
    finally:
        monkeypatch.setattr(node_list, "__iter__", forward)
        monkeypatch.setattr(node_list, "__reversed__", backward)
        monkeypatch.setattr(fx.Graph, "find_nodes", find)


def std_bn(gm):
    std = load_std()
    return [apply_rule(gm, std.rules[name]) for name in std.groups["std.bn"]]


@pytest.mark.parametrize("k", [6])
def test_bn_folding_work_grows_linearly_with_the_chain(canonical, monkeypatch, k):
    x = torch.randn(1, 3, 5, 5)
    work = {}
    for n in (k, 4 * k):
        gm = canonical(conv_bn_chain(n), x)
        with graph_scans(monkeypatch) as scans:
            reports = std_bn(gm)
        assert sum(r.applied for r in reports) == n
        work[n] = counters(reports) | {"scanned": scans["nodes"]}
        assert work[n]["attempts"] == n  # one attempt per batch_norm, none anywhere else
    for c in COUNTERS + ("scanned",):
        assert work[4 * k][c] <= 4 * work[k][c], (c, work)


def test_fixpoint_rule_work_grows_linearly_with_the_chain(canonical, rules):
    rule = rules("""rule fold_scales {
      match   y = mul(mul(x, a), c)
      where   is_param(a) and is_param(c)
      rewrite y = mul(x, a * c)
    }""").rules["fold_scales"]
    x = torch.randn(3, 4)
    work = {}
    for n in (8, 32):
        m = ScaleChain(n).eval()
        gm = canonical(m, x)
        report = apply_rule(gm, rule)
        assert report.applied == n and report.stats.sweeps <= 2
        with torch.no_grad():
            assert torch.allclose(gm(x), m(x), rtol=1e-5)
        work[n] = counters([report])
    for c in COUNTERS:
        assert work[32][c] <= 4 * work[8][c], (c, work)


def test_the_json_report_counts_each_rule(make_loaded, rules):
    from normc.pipeline import RunOptions, compile_model
    program = rules("use std.bn\npipeline { apply std.bn verify rel 1e-5 }")
    result = compile_model(program, make_loaded(conv_bn_chain(5), torch.randn(1, 3, 5, 5)),
                           RunOptions(write=False, verify_inputs=1))
    assert result.passed
    by_name = {r["name"]: r for r in result.report["rules"]}
    conv, linear = by_name["std.fold_bn_conv"], by_name["std.fold_bn_linear"]
    assert (conv["name"], conv["applied"], conv["attempts"], conv["matches"]) == ("std.fold_bn_conv", 5, 5, 5)
    assert (linear["attempts"], linear["matches"]) == (0, 0)  # no batch_norm is left to try
    assert conv["seconds"] >= 0 and conv["work"]["visited"] == 5 and conv["work"]["cleanup"] > 0
    assert conv["loc"].endswith("bn.nc:7")  # where `rule fold_bn_conv` is written
