"""The fast and graphed steps' optimizer update: which form serves a setup.

Three forms make the same AdamW update (to within a rounding): the reference's (:func:`optimizer_update`:
unscale, clip, step, scaler update, zero_grad), the clip folded into the fused step (opt-in ``fold_clip``,
:mod:`.folded_clip`) and the update through the student's bf16 weight copies (opt-in ``half_student_weights``,
:mod:`.half_student`). Each opt-in form names itself off, once, where it cannot serve a run.
"""
from __future__ import annotations

from typing import Optional

from ..ops.adamw_with_copies import AddressTables
from .folded_clip import fold_clip_active, folded_clip_update
from .half_student import half_student_active, half_student_update
from .step_reference import optimizer_update
from .unlearn_setup import UnlearnSetup


def fast_optimizer_update(setup: UnlearnSetup, copy_tables: Optional[AddressTables] = None) -> None:
    """The update of the fast and graphed steps: :func:`half_student_update` after a step through the bf16-weight
    student copy (``copy_tables``: a CUDA graph's own address tables), else :func:`folded_clip_update` where
    :func:`can_fold_clip`, else :func:`optimizer_update`. No host sync (CUDA-graph capturable)."""
    fold = fold_clip_active(setup)  # asked first: it names itself off once, beside the half student too
    if setup.half_student is not None and half_student_active(setup):
        half_student_update(setup, copy_tables)
    elif fold:
        folded_clip_update(setup)
    else:
        optimizer_update(setup)


__all__ = ["fast_optimizer_update"]
