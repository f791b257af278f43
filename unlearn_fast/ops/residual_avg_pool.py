"""Residual add + 2x2 average pool, forward-only when fused: ``avg_pool2d(a + b, kernel_size=2, stride=2)``.

The VQGAN encoder ends each resolution level but the last with a ResnetBlock whose residual sum goes only into a
2x2 average pool (REFERENCE.md §1.1). Two torch ops write the full-resolution sum and read it back; the Triton
kernel (unlearn_fast/kernels/residual_avg_pool.py) reads ``a`` and ``b`` once and writes the pooled quarter,
rounding as torch's add and pool do (the same bits on a GPU).

Dispatch: the kernel for CUDA tensors (or any device with ``UNLEARN_FAST_BACKEND=triton``, e.g. the CPU under
TRITON_INTERPRET=1) when no gradient is needed, both inputs are fp32/fp16/bf16 of one dtype, H and W are even,
and both are NCHW-contiguous or both channels_last (the output keeps that layout, as torch's pool does); the
plain PyTorch twin, ``F.avg_pool2d(a + b, 2, 2)``, otherwise (it floors odd sizes, as torch does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import choose_triton_or_twin

_OP = "add_avg_pool2d"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(a, b) -> None:
    for name, t in (("a", a), ("b", b)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if a.dim() != 4:
        raise ValueError(f"a and b must be [N, C, H, W], got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}")
    if a.shape[1] < 1:
        raise ValueError(f"a and b need at least one channel, got shape {tuple(a.shape)}")
    if a.shape[2] < 2 or a.shape[3] < 2:
        raise ValueError(f"a 2x2 pool needs H and W of at least 2, got shape {tuple(a.shape)}")


def add_avg_pool2d_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch twin (differentiable; the test oracle and the fallback)."""
    _check_inputs(a, b)
    return F.avg_pool2d(a + b, 2, 2)


def _kernel_layout(a: torch.Tensor, b: torch.Tensor):
    """False (NCHW), True (channels_last) or None (the kernel cannot read this pair in place)."""
    if a.is_contiguous() and b.is_contiguous():
        return False
    cl = torch.channels_last
    if a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl):
        return True
    return None


def add_avg_pool2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(a + b, 2, 2)``: ``a, b: [N, C, H, W]`` of one shape -> ``[N, C, H // 2, W // 2]``.

    One fused pass on CUDA without autograd (see the module docstring for when); the twin otherwise."""
    _check_inputs(a, b)
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    layout = _kernel_layout(a, b)
    fusable = (not needs_grad and a.dtype == b.dtype and a.dtype in _KERNEL_DTYPES and layout is not None
               and a.shape[2] % 2 == 0 and a.shape[3] % 2 == 0)
    if not fusable or choose_triton_or_twin(a.device, _OP) != "triton":
        return F.avg_pool2d(a + b, 2, 2)
    from ..kernels.residual_avg_pool import add_avg_pool2d_forward  # importable: the backend checked Triton
    return add_avg_pool2d_forward(a.detach(), b.detach(), layout)


__all__ = ["add_avg_pool2d", "add_avg_pool2d_reference"]
