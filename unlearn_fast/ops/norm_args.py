"""Argument checks shared by the fused normalisation ops (GroupNorm + SiLU, residual add + LayerNorm): the affine
parameters, eps and the output dtype, each refused with one clear error naming the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch

NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_affine(weight, bias, size: int, x: torch.Tensor) -> None:
    """``weight`` / ``bias``: None or an fp32/fp16/bf16 tensor ``[size]`` on x's device."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype not in NORM_DTYPES:
            raise TypeError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a python number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and positive, got {eps}")


def resolve_out_dtype(out_dtype: Optional[torch.dtype], default: torch.dtype) -> torch.dtype:
    """``out_dtype``, or ``default`` when it is None; anything but fp32/fp16/bf16 is refused."""
    if out_dtype is None:
        return default
    if out_dtype not in NORM_DTYPES:  # also rejects non-dtypes
        raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16 (or None), got "
                        f"{out_dtype!r}")
    return out_dtype


__all__ = ["NORM_DTYPES", "check_affine", "check_eps", "resolve_out_dtype"]
