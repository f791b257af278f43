"""Gradient clipping folded into the fused AdamW step (fast and graphed steps; opt-in until timed on a GPU).

``clip_grad_norm_`` reads every gradient for the global norm, then reads and writes every gradient again to scale
it by ``c = clamp(max_norm / (norm + 1e-6), max=1)``. Torch's fused AdamW can divide each gradient by a device
scalar as it reads it (``grad_scale``, the hook GradScaler uses), so the scale pass folds into the step:
``grad_scale = 1 / c``. The fused kernel then writes the scaled gradient back, so the saving is one read of every
gradient per update (MAE-L, 303 M fp32 gradients: 1.2 GB, ~0.45 ms on an H100 by bytes) and the scale's launches.
Arithmetic: ``g / (1/c)`` in place of ``g * c``, the same to within one rounding, and exact when nothing is
clipped (c = 1). Only where the update has no loss scaling (``--precision bf16`` / ``fp32``: GradScaler's own
``grad_scale`` would collide) and the optimizer is the fused one (CUDA); elsewhere the fast steps run the reference's
update (:mod:`.fast_update` chooses) and :func:`fold_clip_active` says why once.
"""
from __future__ import annotations

from typing import Optional

import torch

from .half_student import half_student_blocker
from .optimizer import clip_coefficient
from .unlearn_setup import UnlearnSetup, say_knob_off


def fold_clip_blocker(setup: UnlearnSetup) -> Optional[str]:
    """None where the knob is on and the fold can serve ``setup``; else why not ("off": the knob)."""
    if not getattr(setup, "fold_clip", False):
        return "off"
    if setup.half_student is not None and half_student_blocker(setup) is None:  # fast_update.py: that form first
        return "half_student_weights is on, and its update applies the clip itself"
    if setup.grad_clip is None:
        return "there is no clip to fold (grad_clip is None)"
    if setup.scaler.is_enabled():
        return "the update scales the loss, and GradScaler's own grad_scale takes the place the clip would fold into"
    if not all(g.get("fused") for g in setup.optimizer.param_groups):
        return ("the optimizer is not torch's fused AdamW, whose grad_scale the clip folds into (on a GPU "
                "build_setup(..., fast=True) makes it)")
    if not hasattr(torch.nn.utils, "get_total_norm"):
        return "this torch has no torch.nn.utils.get_total_norm (2.6 or newer)"
    return None


def can_fold_clip(setup: UnlearnSetup) -> bool:
    """Whether ``setup``'s fast update folds the clip into the fused optimizer step (:func:`folded_clip_update`)."""
    return fold_clip_blocker(setup) is None


def fold_clip_active(setup: UnlearnSetup) -> bool:
    """:func:`can_fold_clip`, with a notice once (from rank 0) where the knob is on but cannot be honoured."""
    reason = fold_clip_blocker(setup)
    if reason not in (None, "off"):
        say_knob_off(setup, "fold_clip", reason)
    return reason is None


def folded_clip_update(setup: UnlearnSetup) -> None:
    """The reference update (``step_reference.optimizer_update``) for a ``setup`` where :func:`can_fold_clip`: the
    clip's scale inside the fused AdamW step (``grad_scale = 1 / c``), then the scaler's update and zero_grad. No host
    sync."""
    opt = setup.optimizer
    grads = [p.grad for p in setup.trainable if p.grad is not None]
    if grads:
        # the norm and coefficient exactly as clip_grad_norm_ computes them
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        coef = clip_coefficient(total, setup.grad_clip)
        opt.grad_scale = torch.reciprocal(coef).to(torch.float32)  # AdamW: g / grad_scale = g * coef
    try:
        opt.step()
    finally:
        if hasattr(opt, "grad_scale"):  # absent afterwards, as GradScaler.step leaves it: a None would break its
            del opt.grad_scale          # getattr(optimizer, "grad_scale", 1) in a later loss-scaled step
    setup.scaler.update()  # no loss scaling here: a no-op, kept as optimizer_update's order
    opt.zero_grad(set_to_none=True)


__all__ = ["fold_clip_blocker", "can_fold_clip", "fold_clip_active", "folded_clip_update"]
