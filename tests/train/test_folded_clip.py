"""The clip folded into the fused AdamW step (train/folded_clip.py), on the CPU with torch's fused AdamW (its CPU
kernel takes the same ``grad_scale``): the update equals clip_grad_norm_ then step to within one rounding of the
gradients (rtol 1e-6 on weights and moments after four clipped updates; 1e-5 whole-tensor after five fast steps), bit for bit when nothing is clipped, and
the fold is used only where it is sound (no loss scaling, a fused optimizer, a clip, the knob)."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_fast.train.fast_update import fast_optimizer_update
from unlearn_fast.train.folded_clip import can_fold_clip
from unlearn_fast.train.optimizer import BETAS, param_groups_weight_decay
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_reference import optimizer_update
from unlearn_fast.train.unlearn_setup import build_setup


def _fused_setup(model, precision="fp32", grad_clip=3.0, fold=True):
    setup = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision=precision, forget_alpha=0.5,
                        grad_clip=grad_clip, fast=True)
    named = [(n, p) for n, p in setup.student.named_parameters() if p.requires_grad]
    setup.optimizer = torch.optim.AdamW(param_groups_weight_decay(named, 0.05), lr=1e-3, betas=BETAS, eps=1e-8,
                                        fused=True)  # the CUDA optimizer's kernel, on the CPU
    setup.fold_clip = fold
    return setup


def _set_grads(setup, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    for p in setup.trainable:
        p.grad = torch.randn(p.shape, generator=g) * scale


def _state(setup):
    st = setup.optimizer.state
    return [t for p in setup.trainable for t in (p.detach(), st[p]["exp_avg"], st[p]["exp_avg_sq"])]


@pytest.mark.parametrize("scale,exact", [(10.0, False), (1e-4, True)])  # clipped every step / never clipped
def test_folded_update_equals_clip_then_step(make_mae_micro, scale, exact):
    model = make_mae_micro()
    a, b = _fused_setup(model, fold=False), _fused_setup(model, fold=True)
    assert not can_fold_clip(a) and can_fold_clip(b)
    for step in range(4):
        for s in (a, b):
            _set_grads(s, scale, seed=step)
        optimizer_update(a)
        fast_optimizer_update(b)
        assert all(p.grad is None for p in b.trainable)  # zero_grad(set_to_none) as the reference update
        assert getattr(b.optimizer, "grad_scale", None) is None  # never left for a later step() to read
    for x, y in zip(_state(a), _state(b)):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9)


def test_the_fold_is_used_only_where_sound(make_mae_micro):
    model = make_mae_micro()
    assert can_fold_clip(_fused_setup(model))
    assert not can_fold_clip(_fused_setup(model, grad_clip=None))  # nothing to fold
    off = _fused_setup(model)
    off.fold_clip = False
    assert not can_fold_clip(off)  # opt-in
    plain = build_setup(copy.deepcopy(model), "cpu", precision="fp32", fast=True)
    plain.fold_clip = True
    assert not can_fold_clip(plain)  # the CPU's plain AdamW has no grad_scale
    fp16 = _fused_setup(model)
    fp16.scaler = torch.amp.GradScaler("cpu", enabled=True)  # loss scaling owns grad_scale
    assert not can_fold_clip(fp16)


def test_fast_step_with_the_fold_keeps_the_trajectory(make_mae_micro):
    model = make_mae_micro()
    a, b = _fused_setup(model, fold=False), _fused_setup(model, fold=True)
    a.grad_clip = b.grad_clip = 1e-3  # every step clipped
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        images = torch.rand(6, 3, 32, 32, generator=g)
        is_forget = torch.tensor([True, False, True, False, False, True])
        for s in (a, b):
            fast_step(s, images, is_forget, step)
    # whole-tensor relative difference (elements near zero carry only the rounding of the clip's factor): 1e-5
    worst = max(((x - y).norm() / x.norm().clamp_min(1e-30)).item() for x, y in zip(_state(a), _state(b)))
    assert worst <= 1e-5, worst


def test_the_folded_update_scales_inside_the_step(make_mae_micro, monkeypatch):
    """The fold path runs no separate clip: clip_grad_norm_ is never called and the step reads grad_scale = 1/c."""
    setup = _fused_setup(make_mae_micro())
    _set_grads(setup, 10.0, seed=0)
    grads = [p.grad.clone() for p in setup.trainable]
    want = torch.clamp(setup.grad_clip / (torch.nn.utils.get_total_norm(grads, 2.0) + 1e-6), max=1.0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("a separate clip ran"))
    seen = []
    step = setup.optimizer.step
    monkeypatch.setattr(setup.optimizer, "step", lambda: (seen.append(setup.optimizer.grad_scale.clone()), step()))
    fast_optimizer_update(setup)
    assert len(seen) == 1 and want.item() < 1.0
    torch.testing.assert_close(seen[0], 1.0 / want, rtol=1e-6, atol=0)
