"""normc.verify.calibrate: per-channel statistics of activations (absmax/min/max/mean/rms over every
sample and position), one collection per `calibrate` step shared by every rule after it, the
`random` and tensor-file sources, and stale statistics refused with "calibrate again"."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normc.verify.calibrate as calibrate_mod
from normc.api import load_rules
from normc.errors import NormcError
from normc.frontend.specs import InputSpec, LoadedModel
from normc.ir.builtins import RefuseSite
from normc.ir.graph import op_name
from normc.pipeline import RunOptions, compile_model, prepare_graph
from normc.verify.calibrate import Statistics, calibration_inputs, collect


def loaded(module: nn.Module, x: torch.Tensor, name: str = "toy") -> LoadedModel:
    return LoadedModel(module.eval(), (x,), {}, [InputSpec.from_example("x", x)], name, False)


class Block(nn.Module):
    """LN -> {q, k} (pre-LN style); the LN output's statistics drive SmoothQuant."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return x + self.q(h) * self.k(h)


class TwoBlocks(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.b0, self.b1 = Block(d), Block(d)

    def forward(self, x):
        return self.b1(self.b0(x))


class Proj(nn.Module):
    """One linear: its output is the activation whose statistics the tests compute by hand."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return torch.relu(self.lin(x))


def _seeded(module_cls, seed=0, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = module_cls(**kw)
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                with torch.no_grad():
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.3)
    return m.eval()


def _node(gm, name):
    return next(n for n in gm.graph.nodes if op_name(n, gm) == name)


def _hand_stats(values: torch.Tensor) -> dict[str, torch.Tensor]:
    v = values.double().reshape(-1, values.shape[-1])
    return {"absmax": v.abs().amax(0), "min": v.amin(0), "max": v.amax(0), "mean": v.mean(0),
            "rms": (v * v).mean(0).sqrt()}


@pytest.fixture
def count_collect(monkeypatch):
    """Wraps calibrate.collect: a list of the Statistics each call returned."""
    calls = []
    real = calibrate_mod.collect

    def spy(gm, inputs):
        stats = real(gm, inputs)
        calls.append(stats)
        return stats
    monkeypatch.setattr(calibrate_mod, "collect", spy)
    return calls


# ------------------------------------------------------------------ the statistics themselves
def test_statistics_equal_hand_computed_over_samples_and_positions():
    m = _seeded(Proj)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 4, generator=g) * (i + 1) for i in range(4)]  # 4 samples, batch 3, 5 positions
    gm, _ = prepare_graph(loaded(m, xs[0]))
    stats = collect(gm, [((x,), {}) for x in xs])
    assert stats.samples == 4
    with torch.no_grad():
        acts = torch.cat([m.lin(x).reshape(-1, 6) for x in xs])    # 4 * 3 * 5 rows
        relus = torch.relu(acts)
    lin = _node(gm, "linear")
    relu = _node(gm, "relu")
    for kind, want in _hand_stats(acts).items():
        got = stats.get(lin, kind)
        assert got.dtype == torch.float64 and got.shape == (6,)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{kind}: {m}")
    torch.testing.assert_close(stats.get(relu, "max"), _hand_stats(relus)["max"], rtol=1e-6, atol=1e-6)
    assert stats.get(relu, "min").min() >= 0
    # the input placeholder is an activation too
    torch.testing.assert_close(stats.get(_node_by_op(gm, "placeholder"), "rms"),
                               _hand_stats(torch.cat([x.reshape(-1, 4) for x in xs]))["rms"])


def _node_by_op(gm, op):
    return next(n for n in gm.graph.nodes if n.op == op)


def test_statistics_skip_parameters_and_refuse_unknown_nodes():
    m = _seeded(Proj)
    x = torch.randn(2, 4)
    gm, _ = prepare_graph(loaded(m, x))
    stats = collect(gm, [((x,), {})])
    params = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert params and not any(p in stats for p in params)
    lin = _node(gm, "linear")
    assert lin in stats and lin.name in stats
    with pytest.raises(RefuseSite, match="calibrate again"):
        Statistics().get(lin, "absmax")
    with pytest.raises(RefuseSite, match="unknown statistic"):
        stats.get(lin, "median")


# ------------------------------------------------------------------ in a pipeline
PIPE_TWO_SCOPES = """
pipeline {
  calibrate from "random" samples 5
  apply std.smooth on "b0.*"
  apply std.smooth on "b1.*"
  verify rel 1e-5
}
"""


def test_collected_once_for_all_rules(count_collect):
    m = _seeded(TwoBlocks)
    x = torch.randn(2, 3, 8)
    result = compile_model(load_rules(text=PIPE_TWO_SCOPES), loaded(m, x), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert len(count_collect) == 1
    assert count_collect[0].samples == 5 and count_collect[0].source == "random"
    applied = [(r["name"], r["applied"], [s["site"].split(" (")[0] for s in r["sites"]]) for r in result.report["rules"]]
    assert applied == [("std.smooth", 1, ["b0.ln"]), ("std.smooth", 1, ["b1.ln"])]
    assert [s["step"] for s in result.report["steps"]][0] == "calibrate"


def test_random_source_draws_n_samples_from_the_specs():
    m = _seeded(Block)
    x = torch.randn(2, 3, 8)
    inputs = calibration_inputs(loaded(m, x), "random", 7, None, seed=1)
    assert len(inputs) == 7
    assert all(a[0].shape == x.shape and not kw for a, kw in inputs)
    assert not torch.equal(inputs[0][0][0], inputs[1][0][0])
    again = calibration_inputs(loaded(m, x), "random", 7, None, seed=1)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(inputs, again))


def test_tensor_file_relative_to_the_rules_file(tmp_path, monkeypatch, count_collect):
    """`calibrate from "calib.pt"` reads the file beside the .nc file (not the cwd), cut into
    batches of the model's batch size; `samples N` takes the first N batches; the statistics are
    those of exactly that data."""
    m = _seeded(Block)
    x = torch.randn(2, 3, 8)
    g = torch.Generator().manual_seed(5)
    data = torch.randn(10, 3, 8, generator=g) * 3          # 5 batches of 2
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    torch.save(data, rules_dir / "calib.pt")
    nc = rules_dir / "smooth.nc"
    nc.write_text('pipeline {\n  calibrate from "calib.pt" samples 3\n  apply std.smooth\n  verify rel 1e-5\n}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = compile_model(load_rules(nc), loaded(m, x), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    (stats,) = count_collect
    assert stats.samples == 3 and stats.source == "calib.pt"
    gm, _ = prepare_graph(loaded(m, x))
    ln = _node(gm, "layer_norm")
    with torch.no_grad():
        want = _hand_stats(m.ln(data[:6]))
    for kind in ("absmax", "min", "max", "mean", "rms"):
        torch.testing.assert_close(stats.get(ln, kind), want[kind], rtol=1e-6, atol=1e-6)
    assert result.report["rules"][0]["applied"] == 1


def test_missing_tensor_file_is_an_error(tmp_path):
    m = _seeded(Block)
    x = torch.randn(2, 3, 8)
    nc = tmp_path / "r.nc"
    nc.write_text('pipeline {\n  calibrate from "nope.pt" samples 2\n  apply std.smooth\n}\n')
    with pytest.raises(NormcError, match="not found"):
        compile_model(load_rules(nc), loaded(m, x), RunOptions(write=False))


def test_stale_statistics_after_rewrite_are_refused():
    """The second `apply std.smooth` meets a layer_norm created by the first: its statistics
    were never collected, so the site is refused with "calibrate again" -- and after a fresh
    `calibrate` it applies."""
    m = _seeded(Block)
    x = torch.randn(2, 3, 8)
    stale = load_rules(text="""
pipeline {
  calibrate from "random" samples 4
  apply std.smooth
  apply std.smooth
  verify rel 1e-5
}""")
    result = compile_model(stale, loaded(m, x), RunOptions(write=False))
    assert result.passed
    first, second = result.report["rules"]
    assert first["applied"] == 1
    assert second["applied"] == 0 and len(second["skipped"]) == 1
    assert "calibrate again" in second["skipped"][0]["reason"]
    fresh = load_rules(text="""
pipeline {
  calibrate from "random" samples 4
  apply std.smooth
  calibrate from "random" samples 4
  apply std.smooth
  verify rel 1e-5
}""")
    result = compile_model(fresh, loaded(m, x), RunOptions(write=False))
    assert result.passed, result.report["verify"]
    assert [r["applied"] for r in result.report["rules"]] == [1, 1]


def test_statistic_without_calibrate_is_refused():
    m = _seeded(Block)
    x = torch.randn(2, 3, 8)
    result = compile_model(load_rules(text="pipeline {\n  apply std.smooth\n}"), loaded(m, x), RunOptions(write=False))
    (rule,) = result.report["rules"]
    assert rule["applied"] == 0
    assert "calibrate" in rule["skipped"][0]["reason"]
