"""The frozen teacher with its matrix-product weights already in bf16, for the fast step in bf16 mode.

Under autocast every Linear and conv casts its fp32 weight and bias to bf16 on every call: a frozen teacher's
parameters do not require grad, so autocast never caches those casts (and a CUDA graph replays them anyway).
For MAE-L that is 303 M parameters read and written again every step (about 1.8 GB, some 190 launches). A copy
of the teacher whose Linear and conv weights and biases are bf16 computes the same bits: autocast rounds fp32
to bf16 in the same way and leaves bf16 tensors as they are. Everything else (LayerNorm, GroupNorm,
embeddings, buffers) stays fp32, since autocast runs those ops in fp32. The fast and graphed steps use the copy
while the teacher runs under bf16 autocast (``--precision bf16``); the fp32 teacher stays for the reference step
and evaluation. The copy costs half the teacher's matrix weights in memory once.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

_GEMM_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def with_half_gemm_weights(teacher: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A frozen copy of ``teacher`` whose Linear / conv weights and biases are ``dtype``; the rest unchanged."""
    half = copy.deepcopy(teacher).eval().requires_grad_(False)
    for m in half.modules():
        if isinstance(m, _GEMM_MODULES):
            m.to(dtype)  # a Linear / conv holds only its weight and bias
    return half


def step_teacher(setup) -> nn.Module:
    """The teacher the fast step runs: in bf16 mode the bf16-weight copy (made on first use, kept on the setup),
    else (or with ``setup.half_teacher_weights`` off) the teacher itself."""
    if setup.precision != "bf16" or not setup.half_teacher_weights:
        return setup.teacher
    if setup.half_teacher is None:
        setup.half_teacher = with_half_gemm_weights(setup.teacher)
    return setup.half_teacher


__all__ = ["with_half_gemm_weights", "step_teacher"]
