"""The reference-semantics eager step: the oracle every fast path is measured against.

Same math as the official ``engine_unlearn.train_one_epoch`` (REFERENCE.md §1.2): the student under
autocast, the teacher in fp32 (per ``precision``) on the WHOLE batch twice — real images for the guide,
noise images for the noise guide — the reference loss with full-size guides, ``loss.item()`` and a
non-finite check every step, loss scaling, unscale, clip, step, update. Randomness is seeded from
(seed, rank, step) instead of the wall clock (§11).
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch

from ..objective import unlearn_loss
from ..ops import forget_mask, sample_batch_noise
from .precision import student_autocast, teacher_autocast
from .seeding import seed_step_globals, step_generator
from .unlearn_setup import UnlearnSetup


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops (the last good checkpoint is kept)."""


class StepOutput(NamedTuple):
    loss: torch.Tensor
    retain: torch.Tensor
    forget: torch.Tensor


def check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss is {value} at step {step}; stopping (lower the lr, or check the data). "
                                 "Checkpoints already written are intact.")


def check_step_inputs(images, is_forget, step) -> torch.Tensor:
    """One clear error for what a training step cannot take; returns ``is_forget`` as a bool ``[N]`` on its own
    device (labels ±1 / ±100 or float would otherwise read as all-forget once cast to bool)."""
    if not torch.is_tensor(images) or images.dim() < 1 or images.shape[0] == 0:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a non-empty tensor [N, C, H, W], got {got}")
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError("a training step needs autograd: it was called under torch.no_grad() or "
                           "torch.inference_mode()")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    dev = is_forget.device if torch.is_tensor(is_forget) else "cpu"
    return forget_mask(is_forget, images.shape[0], dev)


def optimizer_update(setup: UnlearnSetup) -> None:
    """unscale -> clip (global L2 norm) -> step -> scaler update -> zero_grad. The step is skipped on inf/NaN
    grads only where loss scaling is on (fp16 student); with bf16 / fp32 it is taken, as torch's scaler does."""
    scaler, opt = setup.scaler, setup.optimizer
    if setup.grad_clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(setup.trainable, setup.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def task_and_noise(setup: UnlearnSetup, images: torch.Tensor, step: int):
    """This step's task draw and noise images, from generators seeded by (seed, rank, step)."""
    dev = images.device
    task = setup.student.sample_task(images, step_generator(setup.seed, setup.rank, step, "task", dev))
    lo, hi = setup.student.image_range
    noise = sample_batch_noise(images, setup.noise_type,
                               generator=step_generator(setup.seed, setup.rank, step, "noise", dev), low=lo, high=hi)
    return task, noise


def reference_step(setup: UnlearnSetup, images: torch.Tensor, is_forget: torch.Tensor, step: int,
                   update: bool = True) -> StepOutput:
    """One micro-step of the paper's objective with reference semantics. ``images [N, C, H, W]``,
    ``is_forget [N] bool``. ``update`` runs the optimizer (every ``accum_iter`` micro-steps)."""
    student, teacher, dev = setup.student, setup.teacher, setup.device
    is_forget = check_step_inputs(images, is_forget, step)
    images = images.to(dev, non_blocking=True)
    is_forget = is_forget.to(dev, non_blocking=True)
    seed_step_globals(setup.seed, setup.rank, step)
    task, noise = task_and_noise(setup, images, step)
    with student_autocast(setup.precision, dev):
        latent = student.forward_encoder_task(student.prepare_inputs(images), task)  # [N, L, D]
    with torch.no_grad(), teacher_autocast(setup.precision, dev):
        guide = teacher.forward_encoder_task(teacher.prepare_inputs(images), task)  # whole batch
        noise_guide = teacher.forward_encoder_task(teacher.prepare_inputs(noise), task)  # whole batch
    out = unlearn_loss(latent, guide, noise_guide, is_forget, setup.retain_alpha, setup.forget_alpha)
    check_finite(out.loss.item(), step)  # host sync, as the reference
    setup.scaler.scale(out.loss / setup.accum_iter).backward()
    if update:
        optimizer_update(setup)
    return StepOutput(out.loss.detach(), out.retain.detach(), out.forget.detach())
