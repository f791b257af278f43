"""The paper's objective: retain_alpha · L_R + forget_alpha · L_F (REFERENCE.md §1.3).

L_R pulls the student's embedding of T(x_r) to the teacher's; L_F pushes the student's embedding of
T(x_f) to the teacher's embedding of T(noise). Whole-batch denominators and the (1 ± s) weighting are the
reference's (see :mod:`unlearn_fast.ops.retain_forget_l2_loss`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..ops import (retain_forget_l2_loss, retain_forget_l2_loss_compact, retain_forget_l2_loss_prenorm)


class UnlearnLoss(NamedTuple):
    loss: torch.Tensor          # retain_alpha * retain + forget_alpha * forget
    retain: torch.Tensor        # L_R (fp32, 0-d)
    forget: torch.Tensor        # L_F (fp32, 0-d)


def combine(retain: torch.Tensor, forget: torch.Tensor, retain_alpha: float, forget_alpha: float) -> UnlearnLoss:
    return UnlearnLoss(retain_alpha * retain + forget_alpha * forget, retain, forget)


def _norm_params(final_norm: torch.nn.LayerNorm, latent: torch.Tensor):
    """(weight, bias, eps) of the teacher's final LayerNorm; ones/zeros for one without affine parameters."""
    if not isinstance(final_norm, torch.nn.LayerNorm) or tuple(final_norm.normalized_shape) != (latent.shape[-1],):
        raise ValueError(f"final_norm must be a LayerNorm over the latent's last dim ({latent.shape[-1]}), got "
                         f"{final_norm!r}")
    d = latent.shape[-1]
    w = final_norm.weight if final_norm.weight is not None else latent.new_ones(d, dtype=torch.float32)
    b = final_norm.bias if final_norm.bias is not None else latent.new_zeros(d, dtype=torch.float32)
    return w, b, final_norm.eps


def unlearn_loss(latent: torch.Tensor, guide: torch.Tensor, noise_guide: torch.Tensor, is_forget: torch.Tensor,
                 retain_alpha: float = 1.0, forget_alpha: float = 0.0) -> UnlearnLoss:
    """Full-size guides ``[N, L, D]`` (the reference step)."""
    r, f = retain_forget_l2_loss(latent, guide, noise_guide, is_forget)
    return combine(r, f, retain_alpha, forget_alpha)


def unlearn_loss_pruned(latent: torch.Tensor, guide_rows: Optional[torch.Tensor],
                        noise_guide_rows: Optional[torch.Tensor], is_forget: torch.Tensor,
                        retain_alpha: float = 1.0, forget_alpha: float = 0.0,
                        final_norm: Optional[torch.nn.LayerNorm] = None) -> UnlearnLoss:
    """Guides only for the rows that use them (pruned teacher). With ``final_norm`` the guides are the
    teacher's pre-norm hidden states and the norm is applied inside the fused loss."""
    if final_norm is None:
        r, f = retain_forget_l2_loss_compact(latent, guide_rows, noise_guide_rows, is_forget)
    else:
        r, f = retain_forget_l2_loss_prenorm(latent, guide_rows, noise_guide_rows, is_forget,
                                             *_norm_params(final_norm, latent))
    return combine(r, f, retain_alpha, forget_alpha)


def unlearn_loss_merged_guide(latent: torch.Tensor, teacher_out: torch.Tensor, is_forget: torch.Tensor,
                              retain_alpha: float = 1.0, forget_alpha: float = 0.0,
                              final_norm: Optional[torch.nn.LayerNorm] = None) -> UnlearnLoss:
    """One teacher output ``[N, L, D]`` for the whole batch, in batch order: the guide on retain rows and the
    noise guide on forget rows (the teacher ran once, on images for retain rows and noise for forget rows).
    With ``final_norm`` it is the teacher's pre-norm hidden state and the norm is applied inside the fused loss."""
    rows = torch.arange(latent.shape[0], device=latent.device)  # row i reads row i of either table
    if final_norm is None:
        r, f = retain_forget_l2_loss_compact(latent, teacher_out, teacher_out, is_forget, row_index=rows)
    else:
        r, f = retain_forget_l2_loss_prenorm(latent, teacher_out, teacher_out, is_forget,
                                             *_norm_params(final_norm, latent), row_index=rows)
    return combine(r, f, retain_alpha, forget_alpha)
