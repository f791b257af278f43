"""The frozen teacher's part of the fast step: one pass over the batch that yields every row's target.

The reference runs the teacher twice on the whole batch (images, then noise) and keeps half of each result.
Here row i of one teacher batch is ``images[i]`` for a retain row and ``noise[i]`` for a forget row, so the
teacher does one batch of work in one pass (bigger GEMMs, half the launches of two half-batch passes), and
its output in batch order is the guide of the retain rows and the noise guide of the forget rows. Every
sample's computation is independent of the others (eval mode: no dropout, per-sample attention and norms),
so this equals the reference's results up to floating-point reduction order.

The frozen front end (MAGE's tokenizer): with ``share`` the student's tokens are reused for the retain rows
(exact when student and teacher run at the same precision, else opt-in, REFERENCE.md §11) and only the
forget rows' noise is tokenized; without it the teacher tokenizes the mixed batch itself.
"""
from __future__ import annotations

import torch
from torch import nn


def teacher_inputs(teacher: nn.Module, images: torch.Tensor, noise: torch.Tensor, student_inputs,
                   is_forget: torch.Tensor, forget_rows: torch.Tensor, share: bool):
    """The teacher's front-end output for the mixed batch (retain rows: images; forget rows: noise)."""
    if share and torch.is_tensor(student_inputs):
        if forget_rows.numel() == 0:  # shape metadata: no host sync
            return student_inputs
        noise_in = teacher.prepare_inputs(noise.index_select(0, forget_rows))
        return student_inputs.index_copy(0, forget_rows, noise_in.to(student_inputs.dtype))
    mixed = torch.where(is_forget.view(-1, *([1] * (images.dim() - 1))), noise, images)  # [N, C, H, W]
    return teacher.prepare_inputs(mixed)


def teacher_hidden(teacher: nn.Module, images: torch.Tensor, noise: torch.Tensor, student_inputs, task,
                   is_forget: torch.Tensor, forget_rows: torch.Tensor, share: bool) -> torch.Tensor:
    """The teacher's pre-norm hidden state ``[N, L, D]`` of T(image) on retain rows and T(noise) on forget rows
    (call under no_grad and the teacher's autocast); the final norm is applied inside the fused loss."""
    t_in = teacher_inputs(teacher, images, noise, student_inputs, is_forget, forget_rows, share)
    return teacher.forward_encoder_task(t_in, task, prenorm=True)


__all__ = ["teacher_inputs", "teacher_hidden"]
