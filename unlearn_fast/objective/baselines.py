"""The four baselines of the paper, with the reference formulas (REFERENCE.md §2, §11).

Chosen by the reference's ``--loss_type`` names. ``weighting="reference"`` reproduces the official code,
including its (1+s) weighting of the forget term in ``encoder_noise`` and ``learn_others`` (the forget term
lands on retain rows, forget rows get no loss); ``weighting="corrected"`` applies it to forget rows.

MAX LOSS / NOISY LABEL are written over per-token task losses ``[N, L]`` with a weight (which tokens count),
so each family plugs in its own training loss (MAGE: token cross-entropy; MAE: pixel MSE per patch).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import retain_forget_l2_loss
from ..ops.forget_mask import forget_mask
from .unlearn_objective import UnlearnLoss, combine

LOSS_TYPES = ("max_full_model_loss", "full_model_noise", "encoder_noise", "learn_others")
WEIGHTINGS = ("reference", "corrected")
#: which parameters each baseline trains: the encoder path or the whole model
TRAINS_ENCODER_ONLY = {"max_full_model_loss": False, "full_model_noise": False,
                       "encoder_noise": True, "learn_others": False}


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown --loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown --baseline_weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def split_token_loss(loss_tok: torch.Tensor, weight: torch.Tensor, is_forget: torch.Tensor):
    """(retain, forget) = Σ loss·weight over each class's rows / Σ weight over the WHOLE batch.

    fp32 math (fp64 for fp64 input). A batch with no weighted token is refused: the reference's 0/0 would stop
    the run as a NaN loss, and a clamped denominator would train on a zero loss (weight decay alone). Reading
    that total costs one host sync (the baseline step syncs on ``loss.item()`` anyway)."""
    if loss_tok.shape != weight.shape:
        raise ValueError(f"loss_tok {tuple(loss_tok.shape)} and weight {tuple(weight.shape)} differ in shape")
    acc = torch.promote_types(loss_tok.dtype, torch.float32)
    w = weight.to(acc)
    denom = w.sum()
    if not bool(denom > 0):
        raise ValueError("no token of the batch is scored (the task weight is 0 everywhere, e.g. MAE --mask_ratio "
                         "0 hides no patch): MAX LOSS / NOISY LABEL average over the hidden tokens")
    f = forget_mask(is_forget, loss_tok.shape[0], loss_tok.device).view(-1, *([1] * (loss_tok.dim() - 1)))
    lw = loss_tok.to(acc) * w
    return torch.where(f, 0.0, lw).sum() / denom, torch.where(f, lw, 0.0).sum() / denom


def max_loss(loss_tok: torch.Tensor, weight: torch.Tensor, is_forget: torch.Tensor,
             forget_alpha: float) -> UnlearnLoss:
    """MAX LOSS (``max_full_model_loss``): retain − α·forget (gradient ascent on the forget rows)."""
    r, f = split_token_loss(loss_tok, weight, is_forget)
    return UnlearnLoss(r - forget_alpha * f, r, f)


def noisy_label_loss(loss_tok_clean: torch.Tensor, loss_tok_noisy: torch.Tensor, weight: torch.Tensor,
                     is_forget: torch.Tensor, forget_alpha: float) -> UnlearnLoss:
    """NOISY LABEL (``full_model_noise``): retain (true targets) + α·forget (noisy targets)."""
    r, _ = split_token_loss(loss_tok_clean, weight, is_forget)
    _, f = split_token_loss(loss_tok_noisy, weight, is_forget)
    return UnlearnLoss(r + forget_alpha * f, r, f)


def random_encoder_target(guide: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RANDOM ENCODER target: randn·std(guide) + mean(guide), scalar stats (unbiased std) over the whole guide.

    A constant, as the reference draws it under no_grad; drawn and scaled in fp32 (fp64 for fp64), whatever the
    guide's precision (the reference's guide is the fp32 teacher's)."""
    g = guide.detach()
    acc = torch.promote_types(g.dtype, torch.float32)
    dev = generator.device if generator is not None else g.device  # draw where the generator lives
    z = torch.randn(g.shape, generator=generator, device=dev, dtype=acc).to(g.device)
    g = g.to(acc)
    return z * g.std() + g.mean()


def random_encoder_loss(latent: torch.Tensor, guide: torch.Tensor, noise_target: torch.Tensor,
                        is_forget: torch.Tensor, retain_alpha: float, forget_alpha: float,
                        weighting: str = "reference") -> UnlearnLoss:
    """RANDOM ENCODER (``encoder_noise``): L_R to the teacher guide, L_F to a random target."""
    check_weighting(weighting)
    guide, noise_target = guide.detach(), noise_target.detach()  # teacher outputs: constants (reference: no_grad)
    r, f = retain_forget_l2_loss(latent, guide, noise_target, is_forget)
    if weighting == "reference":  # (1+s) on both terms: the forget term acts on retain rows
        f, _ = retain_forget_l2_loss(latent, noise_target, noise_target, is_forget)
    return combine(r, f, retain_alpha, forget_alpha)


def tile_retain_rows(teacher_out: torch.Tensor, is_forget: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The teacher outputs of the retain rows, tiled to the batch length (randn if there is none).

    Host-syncs to count the retain rows, as the reference does (baselines are not on the fast path). A constant,
    as the reference builds it under no_grad.
    """
    teacher_out = teacher_out.detach()
    n = teacher_out.shape[0]
    retain = teacher_out[~forget_mask(is_forget, n, teacher_out.device)]
    if retain.shape[0] == 0:
        dev = generator.device if generator is not None else teacher_out.device
        return torch.randn(teacher_out.shape, generator=generator, device=dev,
                           dtype=teacher_out.dtype).to(teacher_out.device)
    reps = -(-n // retain.shape[0])
    return retain.repeat(reps, *([1] * (retain.dim() - 1)))[:n]


def retain_label_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, is_forget: torch.Tensor,
                      retain_alpha: float, forget_alpha: float, weighting: str = "reference",
                      generator: Optional[torch.Generator] = None) -> UnlearnLoss:
    """RETAIN LABEL (``learn_others``): outputs match the teacher on retain rows; forget rows are pulled
    to (tiled) teacher outputs of retain rows. Per-sample MSE over all non-batch dims."""
    check_weighting(weighting)
    teacher_out = teacher_out.detach()  # a constant (reference: no_grad)
    updated = tile_retain_rows(teacher_out, is_forget, generator)
    r, f = retain_forget_l2_loss(student_out, teacher_out, updated, is_forget)
    if weighting == "reference":
        f, _ = retain_forget_l2_loss(student_out, updated, updated, is_forget)
    return combine(r, f, retain_alpha, forget_alpha)
