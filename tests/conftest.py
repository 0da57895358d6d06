"""Shared test helpers: canonical graphs of small modules, rules from source text, --runslow."""
from __future__ import annotations

import pytest
import torch

from normc.frontend.specs import InputSpec, LoadedModel


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    # The models under test are tiny: one intra-op thread is faster, and several threads fighting over
    # 2 cores (or pytest-xdist workers) make every conv 10x slower.
    torch.set_num_threads(1)
    if config.getoption("--runslow", default=False):
        config.option.markexpr = ""  # pyproject's addopts deselects `slow` by default


def loaded_model(module: torch.nn.Module, *args: torch.Tensor, export: bool = False) -> LoadedModel:
    """A LoadedModel for `module` on `args`; with `export`, as if it came from a torch.export .pt2."""
    module = module.eval()
    ep = torch.export.export(module, tuple(args)) if export else None
    specs = [InputSpec.from_example(f"x{i}", a) for i, a in enumerate(args)]
    return LoadedModel(module, tuple(args), {}, specs, type(module).__name__, False, exported_program=ep)


@pytest.fixture(scope="session")
def canonical():
    """canonical(module, *example_args, export=False) -> canonical fx.GraphModule (traced, canonicalized)."""
    from normc.pipeline import prepare_graph

    def build(module, *args, export=False):
        gm, _ = prepare_graph(loaded_model(module, *args, export=export))
        return gm
    return build


@pytest.fixture(scope="session")
def rules():
    """rules(text) -> checked Program (std included); rules(text).rules[name] is a rule."""
    from normc.api import load_rules
    return lambda text: load_rules(text=text)


@pytest.fixture(scope="session")
def make_loaded():
    """make_loaded(module, *example_args, export=False) -> LoadedModel."""
    return loaded_model
