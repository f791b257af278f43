"""The frozen teacher's part of the fast step: one pass over the batch that yields every row's target.

The reference runs the teacher twice on the whole batch (images, then noise) and keeps half of each result.
Here row i of one teacher batch is ``images[i]`` for a retain row and ``noise[i]`` for a forget row, so the
teacher does one batch of work in one pass (bigger GEMMs, half the launches of two half-batch passes), and
its output in batch order is the guide of the retain rows and the noise guide of the forget rows. Every
sample's computation is independent of the others (eval mode: no dropout, per-sample attention and norms),
so this equals the reference's results up to floating-point reduction order.

The frozen front end (MAGE's tokenizer): with ``share`` the student's tokens are reused for the retain rows
(exact when student and teacher run at the same precision, else opt-in, REFERENCE.md §11) and only the
forget rows' noise is tokenized; without it the teacher tokenizes the mixed batch itself. Sharing also needs
the two front ends to hold the same weights: a teacher given separately (``build_setup(teacher=...)``,
``--teacher``) may carry another tokenizer, whose guide the reference step computes with the teacher's own
(:func:`front_ends_match`).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from ..models.adapter import I2IModel


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


def _plain(model):
    return getattr(model, "module", model)  # a DDPStudent wraps the model


def _frozen_pairs(student: nn.Module, teacher: nn.Module) -> Optional[list]:
    """``[(name, student tensor, teacher tensor)]`` for every parameter the student does not train and every
    buffer (the front end is among them: it runs under no_grad), or None when a name or shape has no partner."""
    theirs = dict(teacher.named_parameters())
    theirs.update(teacher.named_buffers())
    pairs = []
    mine = [(n, p) for n, p in student.named_parameters() if not p.requires_grad] + list(student.named_buffers())
    for name, t in mine:
        other = theirs.get(name)
        if other is None or other.shape != t.shape:
            return None
        pairs.append((name, t, other))
    return pairs


class _FrontEndWatch:
    """One comparison's result, valid while the compared tensors keep their storage and (parameters only: DDP
    rewrites buffers every step) their in-place version."""

    def __init__(self, teacher, pairs, match: bool):
        self.teacher, self.match = weakref.ref(teacher), match
        self.tensors = [t for _, s, o in pairs for t in (s, o)]
        self.params = [t for t in self.tensors if isinstance(t, nn.Parameter)]
        self.key = self.current_key()

    def current_key(self) -> tuple:
        try:
            versions = tuple(t._version for t in self.params)
        except RuntimeError:  # inference tensors have no version counter
            versions = None
        return tuple(map(torch.Tensor.data_ptr, self.tensors)), versions


_WATCHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # student module -> _FrontEndWatch


def front_ends_match(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the teacher may take the student's front-end output for its retain rows: the front end is the
    identity (MAE), or every tensor the student does not train equals the teacher's tensor of that name (MAGE:
    the same VQGAN weights; a teacher given separately may hold another tokenizer). Compared once, then followed
    by storage address and in-place version each step (microseconds); prints why when they differ."""
    student, teacher = _plain(student), _plain(teacher)
    if getattr(type(student), "prepare_inputs", None) is I2IModel.prepare_inputs:
        return True  # images pass through unchanged: nothing to differ
    watch = _WATCHES.get(student)
    if watch is not None and watch.teacher() is teacher and watch.current_key() == watch.key:
        return watch.match
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the student's or the teacher's frozen weights changed after the graphed step was built "
                           "(comparing them would be captured, not run); build the graphed step again")
    pairs = _frozen_pairs(student, teacher)
    differing = "a tensor missing from the teacher" if pairs is None else next(
        (repr(n) for n, s, o in pairs if s.dtype != o.dtype or s.device != o.device or not torch.equal(s, o)), None)
    match = differing is None
    if not match:
        print(f"unlearn_fast: the teacher's frozen weights differ from the student's ({differing}), so the teacher "
              "runs its own front end (tokenizer) on every row instead of reusing the student's output")
    _WATCHES[student] = _FrontEndWatch(teacher, pairs or [], match)
    return match


__all__ = ["teacher_inputs", "teacher_hidden", "front_ends_match"]
