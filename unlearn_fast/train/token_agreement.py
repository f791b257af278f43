"""How often the student's and the teacher's tokenisations of the same images disagree (REFERENCE.md §6, §11).

At reference precision the student tokenises under fp16 autocast on a GPU (bf16 on the CPU) and the teacher in
fp32, so ``--share_tokenizer`` (the teacher reuses the student's tokens for its retain rows) changes the code ids
wherever the two precisions land on different sides of a near-tie. The run measures that rate on its own images
and weights before training and reports it; at equal precision sharing is exact and nothing is measured.
"""
from __future__ import annotations

import torch

from .fast_path_switches import fast_path_switches
from .precision import student_autocast, teacher_autocast


@torch.no_grad()
def token_disagreement(setup, images: torch.Tensor) -> float:
    """Fraction of code ids in which ``setup.student``'s tokenisation of ``images`` (under the student's autocast)
    differs from ``setup.teacher``'s (under the teacher's), both with the fast step's fused forms."""
    dev = setup.device
    images = images.to(dev)
    with fast_path_switches(setup):
        with student_autocast(setup.precision, dev):
            student_ids = setup.student.prepare_inputs(images)
        with teacher_autocast(setup.precision, dev):
            teacher_ids = setup.teacher.prepare_inputs(images)
    if student_ids.shape != teacher_ids.shape:
        raise ValueError(f"student and teacher tokenise to different shapes: {tuple(student_ids.shape)} vs "
                         f"{tuple(teacher_ids.shape)}")
    return (student_ids != teacher_ids).float().mean().item()


__all__ = ["token_disagreement"]
