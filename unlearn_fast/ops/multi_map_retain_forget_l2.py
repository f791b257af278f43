"""Palette's retain/forget feature loss over K maps in one fused pass (REFERENCE.md §3.2, §7 item 12).

With s_i = +1 for retain rows and −1 for forget rows, w_r = (1+s)/2, w_f = (1−s)/2 and ``mse`` the mean over
all N·C_k·H_k·W_k elements of map k, the reference computes::

    retain = Σ_k mse(F_s^k·w_r, F_t^k·w_r) = Σ_k Σ_{i retain} Σ (F_s^k[i] − F_t^k[i])² / numel_k
    forget = Σ_k mse(F_s^k·w_f, F_t^k·w_f) = Σ_k Σ_{i forget} Σ (F_s^k[i] − F_t^k[i])² / numel_k

building four masked full-size copies per map. Here one kernel launch reads every student and teacher map
once, writes the per-(map, row) sums and the stored derivative 2·(F_s − F_t) of every map (Triton on CUDA,
the C++/CUDA extension otherwise, a PyTorch twin everywhere); backward scales each stored row by
(grad_retain or grad_forget)/numel_k in fp32 (one launch on Triton). The factor is applied in backward, not
folded into the stored difference, because 2·(x−y)/numel is far below fp16's normal range.

Shapes and dtypes: map k is ``[N, ...]`` (any trailing shape, N shared by all maps), student and teacher of
the same shape; all student maps share one dtype, all teacher maps one dtype (fp32 / fp16 / bf16 use the
fused kernels; fp64 runs the twin's math). Losses are 0-d fp32 (fp64 for fp64 maps); student gradients have
the students' dtype. ``is_forget``: bool ``[N]`` (or integer 0/1), True = forget (the reference's s = −1).
The fused op has no second derivative: backward with ``create_graph=True`` raises.
Teacher maps are constants (teacher outputs under no_grad); if one requires grad the plain twin runs instead,
so gradients reach it. Non-contiguous maps are made contiguous.
Non-finite values: a NaN/inf in row i of a map reaches only the loss of row i's class; the reference's masked
copies (0·NaN = NaN) make both losses NaN. The total retain + α·forget is non-finite either way.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from functools import lru_cache
from typing import List, Sequence, Tuple

import torch

from .backend import choose_backend, eager_under_compile, extension, refuse_double_backward, say_once, triton_kernels
from .forget_mask import forget_mask

_OP = "multi_map_retain_forget_l2_loss"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def multi_map_retain_forget_l2_loss_reference(features_student: Sequence[torch.Tensor],
                                              features_teacher: Sequence[torch.Tensor],
                                              is_forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch twin, with the reference's masked copies (the test oracle): (retain, forget)."""
    _check_map_pairs(features_student, features_teacher)  # zip would silently drop unpaired maps
    retain, forget = [], []
    is_forget = forget_mask(is_forget, features_student[0].shape[0], features_student[0].device)
    for fs, ft in zip(features_student, features_teacher):
        acc = torch.promote_types(fs.dtype, torch.float32)
        s = torch.where(is_forget, -1.0, 1.0).to(acc).view(-1, *([1] * (fs.dim() - 1)))
        w_r, w_f = (1 + s) / 2, (1 - s) / 2
        a, b = fs.to(acc), ft.to(acc)
        retain.append(torch.nn.functional.mse_loss(a * w_r, b * w_r))
        forget.append(torch.nn.functional.mse_loss(a * w_f, b * w_f))
    return torch.stack(retain).sum(), torch.stack(forget).sum()


@lru_cache(maxsize=64)
def _inverse_numel(device: torch.device, dtype: torch.dtype, numels: Tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([1.0 / m for m in numels], dtype=dtype).to(device)  # [K]; built once per signature


def _torch_row_sq_and_grads(students, teachers, compute_grad):
    """The kernel contract in plain PyTorch: row_sq [K, N] and grads 2·(s − t) in the students' dtype."""
    row_sq, grads = [], []
    for s, t in zip(students, teachers):
        acc = torch.promote_types(s.dtype, torch.float32)
        diff = s.detach().to(acc) - t.detach().to(acc)  # [N, ...]
        row_sq.append(diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1))
        if compute_grad:
            grads.append((2.0 * diff).to(s.dtype))
    return torch.stack(row_sq), (grads if compute_grad else None)


def _pick_backend(device: torch.device, students, teachers) -> str:
    backend = choose_backend(device, _OP)
    if students[0].dtype not in _KERNEL_DTYPES or teachers[0].dtype not in _KERNEL_DTYPES:
        return "torch"
    if backend == "cext" and not hasattr(extension(), "multi_map_l2_forward"):
        say_once(f"{_OP}-stale-ext", f"unlearn_fast: the extension lacks multi_map_l2_forward (a stale build?); "
                                     f"{_OP} uses the PyTorch twin. Rebuild: pip install --no-build-isolation -e .")
        return "torch"
    return backend


def _fused_row_sq_and_grads(backend, students, teachers, compute_grad):
    if backend == "triton":
        return triton_kernels().multi_map_l2_forward(students, teachers, 2.0, compute_grad)
    if backend == "cext":
        row_sq, grads = extension().multi_map_l2_forward(students, teachers, 2.0, compute_grad)
        return row_sq, (list(grads) if compute_grad else None)
    return _torch_row_sq_and_grads(students, teachers, compute_grad)


def _scale_rows(backend, grads: List[torch.Tensor], row_scale: torch.Tensor) -> List[torch.Tensor]:
    """grad_k[i] · row_scale[k, i] in fp32, rounded once into the grads' dtype."""
    if backend == "triton":
        return triton_kernels().multi_map_l2_scale(grads, row_scale)
    outs = []
    for k, g in enumerate(grads):
        out = torch.empty_like(g)
        torch.mul(g, row_scale[k].view(-1, *([1] * (g.dim() - 1))), out=out)  # computed in fp32
        outs.append(out)
    return outs


class MultiMapRetainForgetL2Function(torch.autograd.Function):
    """(retain, forget) over K maps: ``apply(is_forget [N] bool, K, *students, *teachers)``, all maps
    contiguous ``[N, ...]``. Gradients flow to the students only."""

    @staticmethod
    def forward(ctx, is_forget, n_maps, *maps):
        students, teachers = list(maps[:n_maps]), list(maps[n_maps:])
        compute_grad = any(ctx.needs_input_grad[2:2 + n_maps])
        backend = _pick_backend(students[0].device, students, teachers)
        row_sq, grads = _fused_row_sq_and_grads(backend, students, teachers, compute_grad)  # [K, N]
        inv_numel = _inverse_numel(row_sq.device, row_sq.dtype, tuple(s.numel() for s in students))  # [K]
        per_row = (row_sq * inv_numel[:, None]).sum(dim=0)  # [N]
        zero = per_row.new_zeros(())
        retain = torch.where(is_forget, zero, per_row).sum()
        forget = torch.where(is_forget, per_row, zero).sum()
        ctx.n_maps, ctx.backend, ctx.inv_numel = n_maps, backend, inv_numel
        ctx.save_for_backward(is_forget, *(grads or []))
        return retain, forget

    @staticmethod
    def backward(ctx, grad_retain, grad_forget):
        refuse_double_backward(_OP)
        is_forget, *grads = ctx.saved_tensors
        none_teachers = (None,) * ctx.n_maps
        if not grads:
            return (None, None) + none_teachers + none_teachers
        per_row = torch.where(is_forget, grad_forget, grad_retain).to(ctx.inv_numel.dtype)  # [N]
        row_scale = ctx.inv_numel[:, None] * per_row[None, :]  # [K, N]
        outs = _scale_rows(ctx.backend, grads, row_scale)
        outs = [o if ctx.needs_input_grad[2 + k] else None for k, o in enumerate(outs)]
        return (None, None, *outs) + none_teachers


def _check_map_pairs(features_student, features_teacher) -> None:
    """Two equally long, non-empty lists of tensors, map k of one shape ``[N, ...]`` in both (shared by the twin)."""
    for name, maps in (("features_student", features_student), ("features_teacher", features_teacher)):
        if not isinstance(maps, SequenceABC) or isinstance(maps, (str, bytes)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(maps).__name__}")
    if len(features_student) == 0 or len(features_student) != len(features_teacher):
        raise ValueError(f"need the same non-zero number of student and teacher maps, got {len(features_student)} "
                         f"and {len(features_teacher)}")
    for k, (fs, ft) in enumerate(zip(features_student, features_teacher)):
        if not torch.is_tensor(fs) or not torch.is_tensor(ft):
            raise TypeError(f"map {k}: student and teacher maps must be tensors, got {type(fs).__name__} and "
                            f"{type(ft).__name__}")
        if fs.shape != ft.shape or fs.dim() < 1:
            raise ValueError(f"map {k}: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}: need one shape "
                             "[N, ...]")
        if fs.shape[0] != features_student[0].shape[0]:  # the twin would broadcast or fail deep inside torch
            raise ValueError(f"map {k} has N = {fs.shape[0]}, map 0 has N = {features_student[0].shape[0]}")


def _check_inputs(features_student, features_teacher, is_forget) -> torch.Tensor:
    _check_map_pairs(features_student, features_teacher)
    first_s, first_t = features_student[0], features_teacher[0]
    for k, (fs, ft) in enumerate(zip(features_student, features_teacher)):
        if fs.numel() == 0:
            raise ValueError(f"map {k} has no elements: {tuple(fs.shape)}")
        if not fs.is_floating_point() or not ft.is_floating_point():
            raise TypeError(f"map {k}: maps must be floating point, got {fs.dtype} and {ft.dtype}")
        if fs.dtype != first_s.dtype or ft.dtype != first_t.dtype:
            raise TypeError(f"map {k}: all student maps must share one dtype and all teacher maps one dtype, got "
                            f"{fs.dtype}/{ft.dtype} vs map 0's {first_s.dtype}/{first_t.dtype}")
        if fs.device != first_s.device or ft.device != first_s.device:
            raise ValueError(f"map {k}: all maps must be on {first_s.device}, got {fs.device} and {ft.device}")
    return forget_mask(is_forget, first_s.shape[0], first_s.device)


@eager_under_compile
def multi_map_retain_forget_l2_loss(features_student: Sequence[torch.Tensor], features_teacher: Sequence[torch.Tensor],
                                    is_forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference-semantics (retain, forget) summed over the K maps (see the module docstring), fused.
    ``features_student[k], features_teacher[k]: [N, C_k, H_k, W_k]`` (any ``[N, ...]``), ``is_forget: [N]``."""
    is_forget = _check_inputs(features_student, features_teacher, is_forget)
    if any(ft.requires_grad for ft in features_teacher):
        return multi_map_retain_forget_l2_loss_reference(features_student, features_teacher, is_forget)
    students = [fs.contiguous() for fs in features_student]
    teachers = [ft.detach().contiguous() for ft in features_teacher]
    return MultiMapRetainForgetL2Function.apply(is_forget, len(students), *students, *teachers)


__all__ = ["multi_map_retain_forget_l2_loss", "multi_map_retain_forget_l2_loss_reference",
           "MultiMapRetainForgetL2Function"]
