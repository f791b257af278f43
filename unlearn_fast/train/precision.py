"""Precision modes (REFERENCE.md §1.2, §11).

- ``reference`` (default): student under fp16 autocast on GPU (bf16 on CPU, where fp16 autocast is
  not useful), teacher in fp32 outside autocast, GradScaler for fp16, as the official trainer.
- ``bf16``: student and teacher in bf16 autocast; no loss scaling. Opt-in.
- ``fp32``: no autocast anywhere (exact comparisons, debugging).
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("reference", "bf16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def student_dtype(precision: str, device: torch.device):
    if precision == "fp32":
        return None
    if precision == "reference" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16


def student_autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    """``cache_enabled=False`` inside CUDA-graph capture (autocast's weight-cast cache is not capturable)."""
    dt = student_dtype(precision, device)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt, cache_enabled=cache_enabled)


def teacher_autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return torch.autocast(device_type=device.type, enabled=False)  # fp32 teacher, as the reference


def uses_loss_scaling(precision: str, device: torch.device) -> bool:
    return student_dtype(precision, device) == torch.float16


def make_grad_scaler(precision: str, device: torch.device):
    return torch.amp.GradScaler(device.type, enabled=uses_loss_scaling(precision, device))
