"""A small post-GELU MLP block (the MiniLM FFN in miniature) with a first token that sets the range."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normc.grammar.parser import parse_text


class Block(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


def sample(seed: int, tokens: int = 12, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, d, generator=g)
    x[:, 0] *= 6.0  # a [CLS]-like first token with a much wider range
    return x


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.up.weight.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def block_graph(block, canonical):
    return canonical(block, sample(0))


def step_of(body: str):
    return parse_text("pipeline { quantize int8 {" + body + "} }").pipeline.steps[0]


CALIB = [((sample(100 + i),), {}) for i in range(8)]
HELD = [((sample(200 + i),), {}) for i in range(4)]
