"""The fused block stack with proj's and fc2's biases added in the fused add + LayerNorm (models/fused_blocks.py,
``deferred_branch_bias``) against the blocks' own forward, MAE's and MAGE's encoders, values and every block
parameter's gradient (the deferred biases' included).

Tolerances: fp32 (no autocast) 1e-5 relative to the largest value (the bias is added after the GEMM instead of in
it, and the kernel's fp32 statistics sum in another order); under bf16 autocast 2e-2 relative (the branch is
rounded to bf16 before its bias is added instead of after: a bf16 rounding, 2^-8, of each branch, grown through
the blocks). The twin (CPU) and the Triton kernels (interpreted) both run.
"""
from __future__ import annotations

import pytest
import torch

import unlearn_fast
import unlearn_fast.models.fused_blocks as fused_blocks_mod
from unlearn_fast.models.fused_blocks import defers_branch_biases, deferred_branch_bias, fused_block_norms, run_blocks

pytestmark = pytest.mark.usefixtures("single_thread")


def _model_and_batch(name):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, embed_dim=40, depth=3, num_heads=4) if name == "mae_micro" else {}
    m = unlearn_fast.create_model(name, **kwargs)
    with torch.no_grad():  # biases away from zero (the init zeroes them): the deferral must carry them
        for blk in m.blocks:
            blk.attn.proj.bias.normal_(0.0, 0.5)
            blk.mlp.fc2.bias.normal_(0.0, 0.5)
    size = m.patch_embed.img_size if name == "mae_micro" else m.config.get("img_size", 256)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return m, m.prepare_inputs(images), m.sample_task(images, torch.Generator().manual_seed(2))


def _encode_and_grads(model, inputs, task, fused, deferred, autocast):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout draws (MAGE's token embedding) in both runs
    with fused_block_norms(fused), deferred_branch_bias(deferred), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model.forward_encoder_task(inputs, task).float()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and n.startswith("blocks")}
    return out.detach(), grads


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("autocast,tol", [(False, 1e-5), (True, 2e-2)])
@pytest.mark.parametrize("name", ["mae_micro", "mage_micro"])
def test_deferred_biases_match_the_blocks(name, backend, autocast, tol, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    model, inputs, task = _model_and_batch(name)
    a, ga = _encode_and_grads(model, inputs, task, False, False, autocast)
    b, gb = _encode_and_grads(model, inputs, task, True, True, autocast)
    assert _rel(b, a) <= tol
    assert ga.keys() == gb.keys() and any(k.endswith("fc2.bias") for k in gb)
    for k in ga:
        assert _rel(gb[k], ga[k]) <= tol, k


def _spy(monkeypatch):
    calls = []
    real = fused_blocks_mod.add_layer_norm
    monkeypatch.setattr(fused_blocks_mod, "add_layer_norm",
                        lambda *a, **k: calls.append(k.get("branch_bias") is not None) or real(*a, **k))
    return calls


def test_the_biases_go_to_the_fused_op_and_the_linears_are_not_called(monkeypatch):
    model, _, _ = _model_and_batch("mae_micro")
    calls = _spy(monkeypatch)
    module_calls = []
    for blk in model.blocks:
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.forward = lambda x, _lin=lin: module_calls.append(1) or torch.nn.Linear.forward(_lin, x)
    x = torch.rand(2, 5, 40)
    with fused_block_norms(), deferred_branch_bias():
        y = run_blocks(model.blocks, x)
    # per block: norm1 (the previous MLP's bias, none for the first), norm2 (proj's bias); fc2's last bias outside
    assert calls == [False, True] + [True, True] * (len(model.blocks) - 1) and module_calls == []
    with fused_block_norms():
        y_plain = run_blocks(model.blocks, x)
    assert len(module_calls) == 2 * len(model.blocks) and _rel(y, y_plain) <= 1e-5


def test_off_by_default_and_needs_the_fused_norms(monkeypatch):
    model, _, _ = _model_and_batch("mae_micro")
    calls = _spy(monkeypatch)
    x = torch.rand(2, 5, 40)
    with fused_block_norms():
        run_blocks(model.blocks, x)
    assert not any(calls)  # the switch is off unless entered
    calls.clear()
    with deferred_branch_bias():
        run_blocks(model.blocks, x)
    assert calls == []  # without fused_block_norms the blocks run their own forward


def test_a_hooked_or_biasless_linear_keeps_its_block_on_the_modules(monkeypatch):
    model, _, _ = _model_and_batch("mae_micro")
    seen = []
    model.blocks[1].mlp.fc2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.blocks[2].attn.proj.bias = None
    assert [defers_branch_biases(b, 40) for b in model.blocks] == [True, False, False]
    calls = _spy(monkeypatch)
    x = torch.rand(2, 5, 40)
    with fused_block_norms(), deferred_branch_bias():
        y = run_blocks(model.blocks, x)
    assert seen == [(2, 5, 40)]  # the hook ran
    # block 0 defers (its fc2's bias reaches block 1's norm1); blocks 1 and 2 do not
    assert calls == [False, True, True, False, False, False]
    with fused_block_norms():
        assert _rel(y, run_blocks(model.blocks, x)) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_weight_copies_as_the_half_student_makes_them(backend, monkeypatch):
    """The half student's copy (train/half_student.py) holds proj's and fc2's weights and biases as bf16 leaves:
    the deferred bf16 biases get bf16 gradients, within the bf16 tolerance of the blocks' own."""
    from unlearn_fast.train.half_teacher import with_half_gemm_weights
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    model, inputs, task = _model_and_batch("mae_micro")
    half = with_half_gemm_weights(model, torch.bfloat16, trainable=True)
    assert half.blocks[0].mlp.fc2.bias.dtype == torch.bfloat16 and half.blocks[0].mlp.fc2.bias.requires_grad
    a, ga = _encode_and_grads(half, inputs, task, False, False, True)
    b, gb = _encode_and_grads(half, inputs, task, True, True, True)
    assert _rel(b, a) <= 2e-2
    for k in ga:
        assert gb[k].dtype == ga[k].dtype and _rel(gb[k], ga[k]) <= 2e-2, k
    assert gb["blocks.0.attn.proj.bias"].dtype == torch.bfloat16
