"""GroupNorm (+ optional SiLU) in one forward-only pass, for frozen networks (the VQGAN tokenizer's
``swish(GroupNorm(32, eps=1e-6)(x))``, REFERENCE.md §1.1).

Semantics, for ``x: [N, C, *spatial]`` (at least ``[N, C]``), ``C`` divisible by ``num_groups``::

    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)   # biased variance, fp32
    y = y * sigmoid(y)                                                          # if silu
    out = y.to(out_dtype)                                                       # default: x.dtype

``weight``/``bias``: ``[C]`` or None (identity affine). Dtypes fp32 / fp16 / bf16 for x, weight, bias and
out, each independently. Why fused: under autocast torch runs group_norm in fp32, so the tokenizer paid a
bf16 -> fp32 copy, two GroupNorm kernels, a SiLU pass and an fp32 -> bf16 copy per norm; here one kernel reads
x in its own dtype and writes ``out_dtype`` (Triton, see unlearn_fast/kernels/group_norm_silu.py).

Dispatch: the Triton kernel for CUDA tensors (or any device with ``UNLEARN_FAST_BACKEND=triton``, e.g. the
CPU under TRITON_INTERPRET=1) when no gradient is needed; the plain PyTorch twin otherwise, i.e. on the CPU,
with ``UNLEARN_FAST_BACKEND=torch``, or when grad mode is on and x, weight or bias requires grad (the twin is
differentiable; the kernel has no backward). The twin's SiLU is written ``y * sigmoid(y)`` (sigmoid rounded,
then the product), as the VQGAN module computes swish on the CPU, so the CPU path keeps its bits.

Memory layout on the kernel: NCHW-contiguous x gives an NCHW-contiguous output; 4-D channels_last x (the VQGAN
run NHWC, so cuDNN's convs need no transposes) is read in place and gives a channels_last output; any other
strided x (or channels_last with more than 4096 channels per group) is copied to NCHW first.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import choose_triton_or_twin
from .norm_args import NORM_DTYPES, check_affine, check_eps, resolve_out_dtype

_OP = "group_norm_silu"


def _check_inputs(x, num_groups, weight, bias, eps, silu, out_dtype) -> torch.dtype:
    """Raise a clear TypeError/ValueError for bad arguments; return the output dtype."""
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [N, C, *spatial] (at least 2 dims), got shape {tuple(x.shape)}")
    if x.dtype not in NORM_DTYPES:
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape[2:]):
        raise ValueError(f"x's spatial sizes must be positive (a group needs elements), got shape {tuple(x.shape)}")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{channels} channels are not divisible into num_groups={num_groups} groups")
    if x.shape[0] * (channels // num_groups) * math.prod(x.shape[2:]) == 1:  # torch's group_norm refuses it too
        raise ValueError(f"x of shape {tuple(x.shape)} with num_groups={num_groups} gives one group of one value: "
                         "nothing to normalise")
    check_affine(weight, bias, channels, x)
    check_eps(eps)
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    return resolve_out_dtype(out_dtype, x.dtype)


def _twin(x, num_groups, weight, bias, eps, silu, out_dtype) -> torch.Tensor:
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), float(eps))  # [N, C, *spatial] fp32
    if silu:
        y = y * torch.sigmoid(y)
    return y.to(out_dtype)


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], eps: float, *, silu: bool,
                              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain PyTorch twin (differentiable; the test oracle and the fallback): see the module docstring."""
    out_dtype = _check_inputs(x, num_groups, weight, bias, eps, silu, out_dtype)
    return _twin(x, num_groups, weight, bias, eps, silu, out_dtype)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float, *, silu: bool, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``silu?(GroupNorm(x))`` rounded to ``out_dtype`` (default x's), forward-only when fused.

    ``x: [N, C, *spatial]``, ``weight, bias: [C]`` or None; returns ``[N, C, *spatial]`` of ``out_dtype``.
    Fused (one or two launches, fp32 statistics) on CUDA without autograd; the twin otherwise (see the module
    docstring). Fused, a channels_last x is read without a copy and the output is channels_last too."""
    out_dtype = _check_inputs(x, num_groups, weight, bias, eps, silu, out_dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad or choose_triton_or_twin(x.device, _OP) != "triton":
        return _twin(x, num_groups, weight, bias, eps, silu, out_dtype)
    from ..kernels.group_norm_silu import (group_norm_silu_forward,  # importable: choose_backend checked Triton
                                           reads_channels_last)
    # channels_last x is read in place and the output is channels_last (no transposes around NHWC convs); any
    # other strided x is copied to NCHW first, and its output is NCHW-contiguous
    x = x.detach()
    if not reads_channels_last(x, num_groups):
        x = x.contiguous()
    weight, bias = (None if t is None else t.detach().contiguous() for t in (weight, bias))
    return group_norm_silu_forward(x, num_groups, weight, bias, float(eps), silu, out_dtype)


__all__ = ["group_norm_silu", "group_norm_silu_reference"]
