"""The folded clip (train/folded_clip.py) leaves the optimizer as torch's GradScaler leaves it: no ``grad_scale``
attribute. GradScaler.step reads ``getattr(optimizer, "grad_scale", 1)`` (torch/amp/grad_scaler.py) and deletes the
attribute after the step; a leftover ``None`` makes a later loss-scaled step of the same optimizer fail with
``Tensor * None``."""
from __future__ import annotations

import copy

import torch

from unlearn_fast.train.fast_update import fast_optimizer_update
from unlearn_fast.train.folded_clip import can_fold_clip
from unlearn_fast.train.optimizer import BETAS, param_groups_weight_decay
from unlearn_fast.train.unlearn_setup import build_setup


def _fused_setup(model):
    setup = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5, grad_clip=3.0,
                        fast=True)
    named = [(n, p) for n, p in setup.student.named_parameters() if p.requires_grad]
    setup.optimizer = torch.optim.AdamW(param_groups_weight_decay(named, 0.05), lr=1e-3, betas=BETAS, eps=1e-8,
                                        fused=True)  # the CUDA optimizer's kernel, on the CPU
    setup.fold_clip = True
    return setup


def test_fold_leaves_no_grad_scale_and_a_later_scaled_step_works(make_mae_micro):
    setup = _fused_setup(make_mae_micro())
    assert can_fold_clip(setup)
    g = torch.Generator().manual_seed(0)
    for p in setup.trainable:
        p.grad = torch.randn(p.shape, generator=g) * 10.0  # clipped: grad_scale = 1/c was set for the step
    fast_optimizer_update(setup)
    assert not hasattr(setup.optimizer, "grad_scale")  # as GradScaler.step leaves it
    # the same optimizer under loss scaling (no unscale_ first: GradScaler multiplies its scale by grad_scale)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = [p.detach().clone() for p in setup.trainable]
    loss = sum((p.float() ** 2).sum() for p in setup.trainable)
    scaler.scale(loss).backward()
    scaler.step(setup.optimizer)
    scaler.update()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, setup.trainable))  # the step was taken
