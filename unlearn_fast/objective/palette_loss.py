"""Palette's unlearning loss and its baselines' losses (REFERENCE.md §3.2, §3.3).

Every Palette loss is built from the reference's ``weighted_mse``: with s = +1 (retain) / −1 (forget),
w_r = (1+s)/2, w_f = (1−s)/2 and ``mse`` the mean over ALL elements of the batch tensor::

    weighted_mse(a, b) = mse(a·w_r, b·w_r) + α·mse(a·w_f, b·w_f)
                       = Σ_{retain rows} Σ (a−b)² / numel + α·Σ_{forget rows} Σ (a−b)² / numel

"Ours" sums it over the 13 feature maps (each map with its own element count). The reference builds four
masked full-size copies per map; the fast path makes ONE call of the fused ``multi_map_retain_forget_l2_loss``
op, which reads every student and teacher map once in a single kernel launch and returns exactly the two
sums above (REFERENCE.md §7 item 12). The one-tensor losses of the baselines use ``retain_forget_l2_loss``,
whose (retain, forget) are (2/N)·Σ_rows mean((a−b)²), i.e. twice the terms above. ``is_forget`` is a bool
``[N]`` (True = forget, the reference's s = −1).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..ops import multi_map_retain_forget_l2_loss, retain_forget_l2_loss
from ..ops.forget_mask import forget_mask
from .baselines import tile_retain_rows
from .unlearn_objective import UnlearnLoss


def _check_is_forget(is_forget: torch.Tensor, n: int, device) -> torch.Tensor:
    return forget_mask(is_forget, n, device)


def _check_maps(features_student: Sequence[torch.Tensor], features_teacher: Sequence[torch.Tensor]) -> None:
    for name, maps in (("features_student", features_student), ("features_teacher", features_teacher)):
        if not isinstance(maps, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors (one per feature map), got "
                            f"{type(maps).__name__}")
    if len(features_student) != len(features_teacher) or not features_student:
        raise ValueError(f"need the same non-zero number of student and teacher maps, got "
                         f"{len(features_student)} and {len(features_teacher)}")
    for k, (fs, ft) in enumerate(zip(features_student, features_teacher)):
        if not torch.is_tensor(fs) or not torch.is_tensor(ft):
            raise TypeError(f"map {k}: student and teacher maps must be tensors, got {type(fs).__name__} and "
                            f"{type(ft).__name__}")
        if fs.shape != ft.shape:
            raise ValueError(f"map {k}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}")


# ---- one tensor ---------------------------------------------------------------------------------------
def weighted_mse_loss_reference(pred: torch.Tensor, target: torch.Tensor, is_forget: torch.Tensor,
                                forget_alpha: float) -> UnlearnLoss:
    """The reference's ``weighted_mse_loss`` with masked copies (the oracle): (loss, retain, forget)."""
    is_forget = _check_is_forget(is_forget, pred.shape[0], pred.device)
    s = torch.where(is_forget, -1.0, 1.0).view(-1, *([1] * (pred.dim() - 1)))
    w_r, w_f = (1 + s) / 2, (1 - s) / 2
    mse = torch.nn.functional.mse_loss
    r = mse(pred.float() * w_r, target.float() * w_r)
    f = mse(pred.float() * w_f, target.float() * w_f)
    return UnlearnLoss(r + forget_alpha * f, r, f)


def weighted_mse_loss(pred: torch.Tensor, target: torch.Tensor, is_forget: torch.Tensor,
                      forget_alpha: float) -> UnlearnLoss:
    """Same as :func:`weighted_mse_loss_reference`, one fused pass, no masked copies. ``target`` is a constant
    unless it requires grad (then the op falls back to its plain twin, which differentiates both)."""
    if not torch.is_tensor(pred) or not torch.is_tensor(target) or pred.dim() == 0:
        raise ValueError(f"pred and target must be tensors [N, ...], got {type(pred).__name__} and "
                         f"{type(target).__name__}" + (" of 0 dims" if torch.is_tensor(pred) else ""))
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    is_forget = _check_is_forget(is_forget, pred.shape[0], pred.device)
    if pred.dim() == 1:  # the op wants [N, ...] with at least one non-batch dim
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    r2, f2 = retain_forget_l2_loss(pred, target, target, is_forget)  # (2/N)·Σ_rows mean((pred − target)²)
    r, f = r2 * 0.5, f2 * 0.5
    return UnlearnLoss(r + forget_alpha * f, r, f)


# ---- Ours: 13 feature maps --------------------------------------------------------------------------
def palette_unlearn_loss_terms_reference(features_student, features_teacher, is_forget, forget_alpha=0.1
                                         ) -> UnlearnLoss:
    """(loss, Σ_k retain_k, Σ_k forget_k) with the reference's masked copies, map by map. The loss adds the maps'
    ``retain_k + α·forget_k`` one by one from 0 in map order, as ``Network.forward``'s ``loss += ...`` does (the
    same value as ``Σ retain + α·Σ forget`` up to the rounding of that order, and the same gradients)."""
    _check_maps(features_student, features_teacher)
    loss = 0
    retain, forget = [], []
    for fs, ft in zip(features_student, features_teacher):
        term = weighted_mse_loss_reference(fs, ft, is_forget, forget_alpha)
        loss = loss + term.loss
        retain.append(term.retain)
        forget.append(term.forget)
    return UnlearnLoss(loss, torch.stack(retain).sum(), torch.stack(forget).sum())


def palette_unlearn_loss_terms(features_student, features_teacher, is_forget, forget_alpha=0.1) -> UnlearnLoss:
    """(loss, Σ_k retain_k, Σ_k forget_k), fused: one op call (one kernel launch) over all maps, one read of
    each student/teacher map."""
    _check_maps(features_student, features_teacher)
    is_forget = _check_is_forget(is_forget, features_student[0].shape[0], features_student[0].device)
    r, f = multi_map_retain_forget_l2_loss(features_student, features_teacher, is_forget)
    return UnlearnLoss(r + forget_alpha * f, r, f)


def palette_unlearn_loss_reference(features_student: Sequence[torch.Tensor], features_teacher: Sequence[torch.Tensor],
                                   is_forget: torch.Tensor, forget_alpha: float = 0.1) -> torch.Tensor:
    """§3.2 as the reference writes it: Σ_k [mse(F_s·w_r, F_t·w_r) + α·mse(F_s·w_f, F_t·w_f)]."""
    return palette_unlearn_loss_terms_reference(features_student, features_teacher, is_forget, forget_alpha).loss


def palette_unlearn_loss(features_student: Sequence[torch.Tensor], features_teacher: Sequence[torch.Tensor],
                         is_forget: torch.Tensor, forget_alpha: float = 0.1) -> torch.Tensor:
    """§3.2, fast: equal to :func:`palette_unlearn_loss_reference` up to reduction order. Maps ``[N, C_k, H_k, W_k]``."""
    return palette_unlearn_loss_terms(features_student, features_teacher, is_forget, forget_alpha).loss


# ---- baselines (§3.3) ---------------------------------------------------------------------------------
def palette_max_loss(noise_hat: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, is_forget: torch.Tensor,
                     forget_alpha: float = 0.1) -> UnlearnLoss:
    """MAX LOSS: denoising loss in the hole, forget term weighted by −α (gradient ascent on forget rows).
    ``noise_hat`` = ε̂ of the full UNet on the standard input; ``mask [N, 1, H, W]``."""
    return weighted_mse_loss(mask * noise_hat, mask * noise, is_forget, -forget_alpha)


def palette_noisy_label_loss(noise_hat: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                             is_forget: torch.Tensor, forget_alpha: float = 0.1) -> UnlearnLoss:
    """NOISY / RANDOM LABEL: the denoising loss in the hole, retain + α·forget, where ``noise_hat`` comes from
    the input whose forget rows hold pure ε in the hole (so forget rows learn identity-on-noise)."""
    return weighted_mse_loss(mask * noise_hat, mask * noise, is_forget, forget_alpha)


def palette_retain_label_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, is_forget: torch.Tensor,
                              forget_alpha: float = 0.1, generator: Optional[torch.Generator] = None
                              ) -> UnlearnLoss:
    """RETAIN LABEL: full outputs ε̂ match the teacher's on retain rows; forget rows are pulled to the teacher
    outputs of the retain rows tiled to the batch (correct (1−s) weighting, as Palette's code)."""
    is_forget = _check_is_forget(is_forget, student_out.shape[0], student_out.device)
    updated = tile_retain_rows(teacher_out, is_forget, generator)  # [N, C, H, W]
    target = torch.where(is_forget.view(-1, *([1] * (teacher_out.dim() - 1))), updated, teacher_out)
    return weighted_mse_loss(student_out, target, is_forget, forget_alpha)


def palette_random_encoder_targets(features_teacher: Sequence[torch.Tensor], is_forget: torch.Tensor,
                                   generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """RANDOM ENCODER targets: each forget row of map k becomes randn·std(F_t^k) + mean(F_t^k), with scalar
    (unbiased) stats over the whole batch's map; retain rows keep F_t^k. Draws map by map, full maps."""
    if not isinstance(features_teacher, (list, tuple)) or not all(torch.is_tensor(ft) for ft in features_teacher):
        raise TypeError(f"features_teacher must be a list or tuple of tensors (one per feature map), got "
                        f"{type(features_teacher).__name__}")
    out = []
    for ft in features_teacher:
        ft = ft.detach()  # the teacher's maps are constants (the reference computes them under no_grad)
        f = _check_is_forget(is_forget, ft.shape[0], ft.device).view(-1, *([1] * (ft.dim() - 1)))
        dev = generator.device if generator is not None else ft.device
        z = torch.randn(ft.shape, generator=generator, device=dev, dtype=ft.dtype).to(ft.device)
        out.append(torch.where(f, z * ft.std() + ft.mean(), ft))
    return out


def palette_random_encoder_loss(features_student: Sequence[torch.Tensor], features_teacher: Sequence[torch.Tensor],
                                is_forget: torch.Tensor, forget_alpha: float = 0.1,
                                generator: Optional[torch.Generator] = None) -> UnlearnLoss:
    """RANDOM ENCODER: "Ours" with the forget targets replaced by :func:`palette_random_encoder_targets`."""
    _check_maps(features_student, features_teacher)  # before any draw: one message naming the bad argument
    targets = palette_random_encoder_targets(features_teacher, is_forget, generator)
    return palette_unlearn_loss_terms(features_student, targets, is_forget, forget_alpha)
