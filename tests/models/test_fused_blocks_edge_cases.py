"""Red-team edges of the fused block stack (models/fused_blocks.py): blocks the fused form cannot compute (other
norms, a LayerNorm subclass, layer scale, a non-block module) and an fp64 residual stream run their own forward
instead of failing deep inside or computing something else; values and gradients equal the unfused stack."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from unlearn_fast.models.fused_blocks import fusable_block, fused_block_norms, run_blocks
from unlearn_fast.models.vit_blocks import Block

pytestmark = pytest.mark.usefixtures("single_thread")
D = 24


class _ScaledNorm(nn.LayerNorm):  # a LayerNorm subclass with its own forward
    def forward(self, x):
        return 2 * super().forward(x)


class _LayerScaleBlock(Block):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.ls1 = nn.Linear(D, D)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


def _stack(kind):
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(D, 2), Block(D, 2), Block(D, 2)])
    if kind == "rms":
        blocks[1].norm1 = nn.RMSNorm(D)
    elif kind == "identity":
        blocks[1].norm2 = nn.Identity()
    elif kind == "subclass":
        blocks[1].norm1 = _ScaledNorm(D, eps=1e-6)
    elif kind == "layer_scale":
        blocks[1] = _LayerScaleBlock(D, 2)
    elif kind == "non_block":
        blocks.insert(1, nn.Linear(D, D))
    for p in blocks.parameters():
        nn.init.normal_(p, std=0.2)
    return blocks


def _run(blocks, x, fused):
    blocks, x = copy.deepcopy(blocks), x.clone().requires_grad_(True)
    with fused_block_norms(fused):
        y = run_blocks(blocks, x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in blocks.parameters()]


@pytest.mark.parametrize("kind", ["rms", "identity", "subclass", "layer_scale", "non_block", "fp64", "empty"])
def test_unfusable_blocks_run_their_own_forward(kind, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")  # the twin: the blocks' own arithmetic, bit for bit
    blocks = nn.ModuleList() if kind == "empty" else _stack("plain" if kind == "fp64" else kind)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    if kind == "fp64":
        blocks, x = blocks.double(), x.double()
    ref, got = _run(blocks, x, False), _run(blocks, x, True)
    assert len(ref) == len(got)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_fusable_block_tells_the_plain_block_apart():
    assert fusable_block(Block(D, 2), D)
    assert not fusable_block(Block(D, 2), D + 1)  # a norm over another width
    for kind in ("rms", "identity", "subclass", "layer_scale"):
        assert not fusable_block(_stack(kind)[1], D), kind
