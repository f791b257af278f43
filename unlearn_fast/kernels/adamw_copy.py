"""AdamW over many tensors in one launch: fp32 weights and moments, half-precision gradients in, and a
half-precision copy of each updated weight out.

Under bf16 autocast a step reads every fp32 weight to cast it to bf16 (the forward's matmuls), casts every bf16
weight gradient back to fp32, and the optimizer then reads the fp32 gradient again. When the optimizer writes the
bf16 copy itself, the forward reads the copy, the gradients stay bf16 and this kernel reads them once: per element
it reads the fp32 weight, both moments and the 2-byte gradient and writes the weight, the moments and the 2-byte
copy (28 bytes), where the casts, the clip's scale and torch's fused AdamW move about 50.

Math per element, in fp32, as torch's fused AdamW (``amsgrad=False``, ``maximize=False``) with the step count
already advanced: ``g = grad * coef`` (the clip's coefficient, a device scalar); ``p -= lr * wd * p``;
``m = b1 * m + (1 - b1) * g``; ``v = b2 * v + (1 - b2) * g * g``; ``p -= (lr / (1 - b1^t)) * m /
(sqrt(v) / sqrt(1 - b2^t) + eps)``; ``copy = p`` rounded to the copy's dtype. ``b^t`` is ``exp2(t * log2 b)``.

The tensors are separate allocations: each is reached through a table of addresses (``addresses [6, T]`` int64,
rows param, exp_avg, exp_avg_sq, step, grad, copy; the step is a 0-d fp32 tensor per weight, as torch keeps it),
and a chunk table maps each program to ``BLOCK`` elements of one tensor (``chunk_tensor [P]``, ``chunk_start
[P]``). Whole chunks load and store without a mask (vector accesses); a tensor's last chunk is masked. ``lr`` and
``wd`` are read per tensor from small device arrays indexed by its parameter group, so a CUDA graph replays the
schedule's current lr. ``grad_sum_of_squares`` reads the gradients the same way for the clip's global norm.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch_device import check_launch_device, interpreted

ADAMW_ROLES = ("param", "exp_avg", "exp_avg_sq", "step", "grad", "copy")  # the rows of the address table
ADAMW_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the gradient's and the copy's dtype codes


@triton.jit
def _pointer(addresses_ptr, row: tl.constexpr, num_tensors, t, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in ``row`` of tensor ``t`` as a pointer to fp32 (KIND 0), bf16 (1) or fp16 (2)."""
    address = tl.load(addresses_ptr + row * num_tensors + t)
    if KIND == 1:
        pointer = address.to(tl.pointer_type(tl.bfloat16))
    elif KIND == 2:
        pointer = address.to(tl.pointer_type(tl.float16))
    else:
        pointer = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every address a multiple of 16 bytes (the launcher checked): 16-byte vector accesses. The hint
        pointer = tl.multiple_of(pointer, 16)  # must be on the pointer: one on the integer is lost in the cast
    return pointer


@triton.jit
def _rounded_copy(x, KIND: tl.constexpr):
    """``x`` (fp32) in the copy's dtype, rounded to nearest even as torch's ``.to()``. bf16 by its bits (Triton's
    interpreter truncates fp32 -> bf16, so the CPU tests would otherwise see other copies than a GPU writes);
    a NaN stays a quiet NaN as in torch (adding the rounding bias to a NaN's bits could make it an infinity)."""
    if KIND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        upper = tl.where(x != x, 0x7FC0, upper)
        return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif KIND == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _adamw_math(p, m, v, g, coef, lr, wd, beta1, beta2, bias_correction1, bias_correction2_sqrt, eps):
    g = g * coef
    p = p - lr * wd * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - (lr / bias_correction1) * m / denom
    return p, m, v


@triton.jit
def _adamw_copy_kernel(addresses_ptr, numel_ptr, group_ptr, chunk_tensor_ptr, chunk_start_ptr, lr_ptr, wd_ptr,
                       coef_ptr, num_tensors, beta1, beta2, log2_beta1, log2_beta2, eps, GRAD_KIND: tl.constexpr,
                       COPY_KIND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(chunk_start_ptr + pid), BLOCK)  # int64
    n = tl.load(numel_ptr + t)
    group = tl.load(group_ptr + t)
    p_ptr = _pointer(addresses_ptr, 0, num_tensors, t, 0, ALIGNED)
    m_ptr = _pointer(addresses_ptr, 1, num_tensors, t, 0, ALIGNED)
    v_ptr = _pointer(addresses_ptr, 2, num_tensors, t, 0, ALIGNED)
    step_ptr = _pointer(addresses_ptr, 3, num_tensors, t, 0, False)
    g_ptr = _pointer(addresses_ptr, 4, num_tensors, t, GRAD_KIND, ALIGNED)
    c_ptr = _pointer(addresses_ptr, 5, num_tensors, t, COPY_KIND, ALIGNED)
    step = tl.load(step_ptr)
    bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
    lr = tl.load(lr_ptr + group)
    wd = tl.load(wd_ptr + group)
    coef = tl.load(coef_ptr)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # a whole chunk: no mask
        p, m, v = _adamw_math(tl.load(p_ptr + offs), tl.load(m_ptr + offs), tl.load(v_ptr + offs),
                              tl.load(g_ptr + offs).to(tl.float32), coef, lr, wd, beta1, beta2, bias_correction1,
                              bias_correction2_sqrt, eps)
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        tl.store(c_ptr + offs, _rounded_copy(p, COPY_KIND))
    else:
        mask = offs < n
        p, m, v = _adamw_math(tl.load(p_ptr + offs, mask=mask, other=0.0), tl.load(m_ptr + offs, mask=mask, other=0.0),
                              tl.load(v_ptr + offs, mask=mask, other=0.0),
                              tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), coef, lr, wd, beta1, beta2,
                              bias_correction1, bias_correction2_sqrt, eps)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(c_ptr + offs, _rounded_copy(p, COPY_KIND), mask=mask)


@triton.jit
def _sum_of_squares_kernel(addresses_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, out_ptr, num_tensors,
                           GRAD_KIND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(chunk_start_ptr + pid), BLOCK)
    n = tl.load(numel_ptr + t)
    g_ptr = _pointer(addresses_ptr, 4, num_tensors, t, GRAD_KIND, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(g * g, axis=0))


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else float("-inf")  # beta 0: beta^t = exp2(-inf) = 0


def _check_tables(addresses: torch.Tensor, numels: torch.Tensor, chunk_tensor: torch.Tensor,
                  chunk_start: torch.Tensor) -> None:
    check_launch_device(interpreted(_adamw_copy_kernel), addresses.device, "the tables are")
    t = numels.shape[0]
    if addresses.dtype != torch.int64 or tuple(addresses.shape) != (len(ADAMW_ROLES), t):
        raise ValueError(f"addresses must be int64 [{len(ADAMW_ROLES)}, {t}], got {addresses.dtype} "
                         f"{tuple(addresses.shape)}")
    if chunk_tensor.shape != chunk_start.shape or chunk_tensor.dim() != 1:
        raise ValueError("chunk_tensor and chunk_start must be 1-D of one length")


def adamw_copy_update(addresses: torch.Tensor, numels: torch.Tensor, groups: torch.Tensor, chunk_tensor: torch.Tensor,
                      chunk_start: torch.Tensor, block: int, lrs: torch.Tensor, weight_decays: torch.Tensor,
                      coef: torch.Tensor, betas, eps: float, grad_kind: int, copy_kind: int, aligned: bool) -> None:
    """One AdamW update of every tensor in the tables (module docstring), in place; the step counts must already
    be advanced. ``block``: the chunk size of the chunk table (a power of two; 2048 = 16 elements per thread at 4
    warps). ``lrs`` / ``weight_decays``: fp32 ``[G]`` indexed by ``groups [T]``; ``coef``: fp32 0-d."""
    _check_tables(addresses, numels, chunk_tensor, chunk_start)
    beta1, beta2 = (float(b) for b in betas)
    if chunk_tensor.numel() == 0:
        return
    _adamw_copy_kernel[(chunk_tensor.numel(),)](
        addresses, numels, groups, chunk_tensor, chunk_start, lrs, weight_decays, coef, numels.shape[0], beta1, beta2,
        _log2(beta1), _log2(beta2), float(eps), GRAD_KIND=grad_kind, COPY_KIND=copy_kind, ALIGNED=bool(aligned),
        BLOCK=block, num_warps=4)


def grad_sum_of_squares(addresses: torch.Tensor, numels: torch.Tensor, chunk_tensor: torch.Tensor,
                        chunk_start: torch.Tensor, block: int, grad_kind: int, aligned: bool) -> torch.Tensor:
    """fp32 0-d: the sum of the squares of every gradient in the tables (row ``grad``), per-chunk sums in fp32."""
    _check_tables(addresses, numels, chunk_tensor, chunk_start)
    if chunk_tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=addresses.device)
    partials = torch.empty(chunk_tensor.numel(), dtype=torch.float32, device=addresses.device)  # every one written
    _sum_of_squares_kernel[(chunk_tensor.numel(),)](addresses, numels, chunk_tensor, chunk_start, partials,
                                                     numels.shape[0], GRAD_KIND=grad_kind, ALIGNED=bool(aligned),
                                                     BLOCK=block, num_warps=4)
    return partials.sum()


__all__ = ["ADAMW_ROLES", "ADAMW_KINDS", "adamw_copy_update", "grad_sum_of_squares"]
