"""The ViT block stack with each residual add fused into the next LayerNorm (models/fused_blocks.py) against the
blocks' own forward: values and gradients of MAE's and MAGE's encoders. On the CPU the op is its PyTorch twin,
the blocks' own arithmetic, so the two agree bit for bit; with the Triton kernels (interpreted on the CPU) within
1e-5 relative (fp32 statistics summed in another order, grown through the blocks); and the fast step turns the
switch on only on a GPU where asked."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_fast
import unlearn_fast.models.fused_blocks as fused_blocks_mod
from unlearn_fast.models.fused_blocks import fused_block_norms, run_blocks
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")


def _model_and_batch(name):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, embed_dim=40, depth=3, num_heads=4) if name == "mae_micro" else {}
    m = unlearn_fast.create_model(name, **kwargs)
    size = m.patch_embed.img_size if name == "mae_micro" else m.config.get("img_size", 256)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return m, m.prepare_inputs(images), m.sample_task(images, torch.Generator().manual_seed(2))


def _encode_and_grads(model, inputs, task, fused):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout draws (MAGE's token embedding) in both runs
    with fused_block_norms(fused):
        out = model.forward_encoder_task(inputs, task)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and n.startswith("blocks")}
    return out.detach(), grads


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["mae_micro", "mage_micro"])
def test_twin_path_equals_the_blocks_bit_for_bit(name, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    model, inputs, task = _model_and_batch(name)
    a, ga = _encode_and_grads(model, inputs, task, False)
    b, gb = _encode_and_grads(model, inputs, task, True)
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("name", ["mae_micro", "mage_micro"])
def test_kernel_path_matches_the_blocks(name, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")  # interpreted on the CPU
    model, inputs, task = _model_and_batch(name)
    a, ga = _encode_and_grads(model, inputs, task, False)
    b, gb = _encode_and_grads(model, inputs, task, True)
    assert _rel(b, a) <= 1e-5
    assert ga.keys() == gb.keys()
    for k in ga:  # every block parameter, the norms' weights and biases included
        assert _rel(gb[k], ga[k]) <= 1e-5, k


def test_run_blocks_calls_the_op_twice_per_block(monkeypatch):
    model, inputs, task = _model_and_batch("mae_micro")
    calls = []
    real = fused_blocks_mod.add_layer_norm
    monkeypatch.setattr(fused_blocks_mod, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.rand(2, 5, 40)
    run_blocks(model.blocks, x)
    assert calls == []
    with fused_block_norms():
        run_blocks(model.blocks, x)
    assert len(calls) == 2 * len(model.blocks)


def test_fast_step_enables_it_only_on_a_gpu(monkeypatch):
    calls = []
    real = fused_blocks_mod.add_layer_norm
    monkeypatch.setattr(fused_blocks_mod, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, _, _ = _model_and_batch("mae_micro")
    setup = build_setup(copy.deepcopy(model), "cpu", precision="fp32", forget_alpha=0.5, fuse_block_norms=True)
    fast_step(setup, torch.rand(4, 3, 32, 32), torch.tensor([True, False, True, False]), 0)
    assert calls == []  # the CPU keeps the blocks' own forward
