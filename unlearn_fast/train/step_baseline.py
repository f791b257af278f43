"""Eager steps of the four baselines (REFERENCE.md §2), reference semantics, any family."""
from __future__ import annotations

import torch

from ..objective import (max_loss, noisy_label_loss, random_encoder_loss, random_encoder_target,
                         retain_label_loss)
from .precision import student_autocast, teacher_autocast
from .seeding import seed_step_globals, step_generator
from .step_reference import StepOutput, check_finite, check_step_inputs, optimizer_update
from .unlearn_setup import UnlearnSetup


def baseline_step(setup: UnlearnSetup, images: torch.Tensor, is_forget: torch.Tensor, step: int,
                  update: bool = True) -> StepOutput:
    student, teacher, dev = setup.student, setup.teacher, setup.device
    is_forget = check_step_inputs(images, is_forget, step)  # ±1 / ±100 labels refused, not read as all-forget
    images = images.to(dev, non_blocking=True)
    is_forget = is_forget.to(dev, torch.bool, non_blocking=True)
    seed_step_globals(setup.seed, setup.rank, step)
    task = student.sample_task(images, step_generator(setup.seed, setup.rank, step, "task", dev))
    g = step_generator(setup.seed, setup.rank, step, "baseline", dev)
    a_r, a_f, kind = setup.retain_alpha, setup.forget_alpha, setup.loss_type
    with student_autocast(setup.precision, dev):
        inputs = student.prepare_inputs(images)
        if kind == "max_full_model_loss":
            loss_tok, weight = student.task_loss_terms(inputs, task)
            out = max_loss(loss_tok, weight, is_forget, a_f)
        elif kind == "full_model_noise":
            target = student.task_target(inputs, task)
            # both targets scored on ONE forward, as the reference (one draw of MAGE's embedding dropout)
            outputs = student.forward_outputs(inputs, task)
            clean, weight = student.task_loss_terms_of_outputs(outputs, inputs, task, target)
            noisy, _ = student.task_loss_terms_of_outputs(outputs, inputs, task,
                                                          student.noisy_task_target(target, g))
            out = noisy_label_loss(clean, noisy, weight, is_forget, a_f)
        elif kind == "encoder_noise":
            latent = student.forward_encoder_task(inputs, task)
            with torch.no_grad(), teacher_autocast(setup.precision, dev):
                guide = teacher.forward_encoder_task(teacher.prepare_inputs(images), task)
            out = random_encoder_loss(latent, guide, random_encoder_target(guide, g), is_forget, a_r, a_f,
                                      setup.baseline_weighting)
        elif kind == "learn_others":
            student_out = student.forward_outputs(inputs, task)
            with torch.no_grad(), teacher_autocast(setup.precision, dev):
                teacher_out = teacher.forward_outputs(teacher.prepare_inputs(images), task)
            out = retain_label_loss(student_out.float(), teacher_out.float(), is_forget, a_r, a_f,
                                    setup.baseline_weighting, g)
        else:
            raise ValueError(f"unknown loss_type {kind!r}")
    check_finite(out.loss.item(), step)
    setup.scaler.scale(out.loss / setup.accum_iter).backward()
    if update:
        optimizer_update(setup)
    return StepOutput(out.loss.detach(), out.retain.detach(), out.forget.detach())
