"""The fast eager step: same objective, pruned teacher, fused loss, no host syncs.

Differences from :mod:`step_reference` (all equal up to floating-point reduction order):
- the teacher computes the guide only for retain rows and the noise guide only for forget rows, in one
  pass over a batch that holds the images of the retain rows and the noise of the forget rows (see
  :mod:`.teacher_guides`), so it does one batch of work instead of two; its final LayerNorm is applied
  inside the fused loss;
- the frozen front end (MAGE's tokenizer) is shared between student and teacher only where that is
  exact (same precision) or when asked (``share_tokenizer``), and never when the teacher's front end holds
  other weights than the student's (:func:`.teacher_guides.front_ends_match`);
- no ``.item()`` per step: losses stay on the device and the trainer reads them back every N steps;
- row indices come from the CPU labels, so splitting the batch never waits for the GPU;
- on a GPU the teacher's no-grad pass runs on a side stream beside the student's forward
  (:mod:`.teacher_stream`; ``overlap_teacher=False`` runs it after, as on CPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..objective import unlearn_loss_merged_guide
from ..ops import sample_batch_noise
from .fast_path_switches import fast_path_switches
from .fast_update import fast_optimizer_update
from .half_student import half_student_take_gradients, step_student
from .half_teacher import step_teacher
from .precision import student_autocast, student_dtype, teacher_autocast
from .seeding import seed_step_globals, step_generator
from .step_reference import StepOutput, check_step_inputs
from .teacher_guides import front_ends_match, teacher_hidden
from .teacher_stream import student_beside_teacher, teacher_stream_for
from .unlearn_setup import UnlearnSetup


def forget_row_indices(is_forget_cpu: torch.Tensor, device) -> torch.Tensor:
    """Ascending indices of the forget rows, computed on the host from CPU labels (no GPU sync)."""
    f = is_forget_cpu.to("cpu", torch.bool)
    return torch.arange(f.shape[0])[f].to(device, non_blocking=True)


def tokenizer_shared_exactly(setup: UnlearnSetup) -> bool:
    """Student and teacher front ends run at the same precision (bf16 or fp32 mode)."""
    return setup.precision in ("bf16", "fp32") or student_dtype(setup.precision, setup.device) is None


def check_paper_objective(setup: UnlearnSetup, what: str) -> None:
    """The fast steps compute the paper's objective only: a baseline's setup would silently train that instead."""
    if setup.loss_type is not None:
        raise ValueError(f"{what} computes the paper's objective, but the setup is for the {setup.loss_type!r} "
                         "baseline: run baseline_step (step_baseline.py), or train_loop(step_mode='reference')")


def student_and_teacher(setup: UnlearnSetup, images: torch.Tensor, task, is_forget: torch.Tensor,
                        forget_rows: torch.Tensor, draw_noise, cache_enabled: bool = True):
    """``(latent, hidden)`` of one batch, shared by the eager and the CUDA-graph step: the student's front end
    and encoder under its autocast (the bf16-weight copy where half_student.py applies), and the teacher's
    pre-norm hidden state of T(image) on retain rows and T(``draw_noise()``) on forget rows under no_grad and its
    autocast, on a side stream beside the student where a GPU allows (:mod:`.teacher_stream`). ``cache_enabled=False`` inside a CUDA-graph capture."""
    student, teacher, dev = step_student(setup), step_teacher(setup), setup.device
    share = ((setup.share_tokenizer or tokenizer_shared_exactly(setup))
             and front_ends_match(setup.student, setup.teacher))

    def front():
        with student_autocast(setup.precision, dev, cache_enabled=cache_enabled):
            return student.prepare_inputs(images)

    def encoder(inputs):
        with student_autocast(setup.precision, dev, cache_enabled=cache_enabled):
            return student.forward_encoder_task(inputs, task)  # [N, L, D]

    def teacher_pass(inputs) -> torch.Tensor:  # no-grad, independent of the student: may run concurrently
        with torch.no_grad(), teacher_autocast(setup.precision, dev, cache_enabled=cache_enabled):
            return teacher_hidden(teacher, images, draw_noise(), inputs, task, is_forget, forget_rows,
                                  share)  # [N, L, D]

    # the models' fused forms for this step (fast_path_switches.py); the reference step keeps the official ops
    with fast_path_switches(setup):
        return student_beside_teacher(teacher_stream_for(setup), front, encoder, teacher_pass, share)


def fast_step(setup: UnlearnSetup, images: torch.Tensor, is_forget_cpu: torch.Tensor, step: int,
              update: bool = True, noise_seed: Optional[int] = None) -> StepOutput:
    """One micro-step. ``is_forget_cpu [N]``: the batch's forget mask on the host, bool (True = forget) or integer
    0/1 (the reference's ±100 labels are refused: pass ``labels < 100``).

    ``noise_seed``: None draws the noise from the (seed, rank, step) generator exactly as the reference
    step does; an int uses the fused counter-based Philox sampler keyed by (noise_seed, step).
    """
    student, teacher, dev = setup.student, setup.teacher, setup.device
    check_paper_objective(setup, "fast_step")
    is_forget_cpu = check_step_inputs(images, is_forget_cpu, step)  # bool: its row split is exact
    images = images.to(dev, non_blocking=True)
    forget_rows = forget_row_indices(is_forget_cpu, dev)
    is_forget = is_forget_cpu.to(dev, torch.bool, non_blocking=True)
    seed_step_globals(setup.seed, setup.rank, step)
    task = student.sample_task(images, step_generator(setup.seed, setup.rank, step, "task", dev))
    lo, hi = student.image_range

    def draw_noise() -> torch.Tensor:
        if noise_seed is None:
            gen = step_generator(setup.seed, setup.rank, step, "noise", dev)
            return sample_batch_noise(images, setup.noise_type, generator=gen, low=lo, high=hi)
        return sample_batch_noise(images, setup.noise_type, seed=noise_seed, step=step, low=lo, high=hi)

    latent, hidden = student_and_teacher(setup, images, task, is_forget, forget_rows, draw_noise)
    out = unlearn_loss_merged_guide(latent, hidden, is_forget, setup.retain_alpha, setup.forget_alpha,
                                    final_norm=teacher.encoder_final_norm())
    setup.scaler.scale(out.loss / setup.accum_iter).backward()
    if update:
        fast_optimizer_update(setup)
    else:
        half_student_take_gradients(setup)  # an accumulation's gradients live on the student's own weights
    return StepOutput(out.loss.detach(), out.retain.detach(), out.forget.detach())

