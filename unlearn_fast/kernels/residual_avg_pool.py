"""Residual add + 2x2 average pool in one forward pass: ``avg_pool2d(a + b, kernel 2, stride 2)``.

Where the VQGAN encoder leaves a resolution level, the last ResnetBlock's residual sum ``a + b`` feeds nothing but
the pool. Written as two torch ops, the sum is a full-resolution tensor written once and read back (add: read 2,
write 1; pool: read 1, write 1/4); here each program reads its tiles of ``a`` and ``b`` and writes the pooled
quarter (read 2, write 1/4), and the sum never reaches memory.

Rounding as torch's two ops, so the result is the same bits on a GPU: the sum is formed in fp32 and rounded to
the inputs' dtype (torch's add), then the four sums of a window are added in fp32 in torch's order (row by row,
left to right: ``((top_left + top_right) + bottom_left) + bottom_right``) and divided by 4 (exact), then
rounded to the dtype (torch's CUDA avg_pool2d accumulates in fp32 in that order).

Layouts (the op layer checks the arguments and picks one):
- NCHW-contiguous ``[N, C, H, W]``: a program covers output rows ``[BLOCK_I]`` by columns ``[BLOCK_J]`` of one
  (n, c) plane; it loads the input rows as ``[BLOCK_I, 2, 2*BLOCK_J]`` contiguous runs (wide vector loads) and
  splits rows and columns by parity in registers.
- channels_last: a program covers ``[BLOCK_P]`` output pixels by ``[BLOCK_C]`` channels; each of the four window
  positions is a contiguous run of channels (wide vector loads as they are).
H and W must be even (the encoder's maps are powers of two). Offsets are int64 at the plane / pixel level.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_device import check_launch_device, interpreted

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE_ELEMENTS = 2048  # NCHW: input elements per program and tensor, 16 per thread at 4 warps (two 16-byte
# bf16 vectors); NHWC: half of it per window position (four positions)


@triton.jit
def _rounded_sum(a_ptr, b_ptr, offs, mask):
    """``a + b`` at ``offs`` as torch's add leaves it: formed in fp32, rounded to the inputs' dtype, back in fp32."""
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (a + b).to(a_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _add_avg_pool_nchw_kernel(a_ptr, b_ptr, out_ptr, width, out_h, out_w, BLOCK_I: tl.constexpr,
                              BLOCK_J: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # n * C + c
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # output rows [BLOCK_I]
    k = tl.program_id(2) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J)  # input columns [2*BLOCK_J]
    parity = tl.arange(0, 2)
    rows = 2 * i[:, None, None] + parity[None, :, None]  # [BLOCK_I, 2, 1] input rows
    offs = rows * width + k[None, None, :]  # [BLOCK_I, 2, 2*BLOCK_J] within the plane (< H*W)
    mask = (i[:, None, None] < out_h) & (k[None, None, :] < 2 * out_w)
    s = _rounded_sum(a_ptr + plane * (2 * out_h) * width, b_ptr + plane * (2 * out_h) * width, offs, mask)
    s = tl.reshape(s, (BLOCK_I, 2, BLOCK_J, 2))  # [row, row parity, column, column parity]
    left, right = tl.split(s)  # [BLOCK_I, 2, BLOCK_J] each: columns 2j and 2j + 1
    top_left, bottom_left = tl.split(tl.permute(left, (0, 2, 1)))  # [BLOCK_I, BLOCK_J]
    top_right, bottom_right = tl.split(tl.permute(right, (0, 2, 1)))
    pooled = (((top_left + top_right) + bottom_left) + bottom_right) / 4.0
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    out_offs = plane * out_h * out_w + i[:, None] * out_w + j[None, :]
    out_mask = (i[:, None] < out_h) & (j[None, :] < out_w)
    tl.store(out_ptr + out_offs, pooled.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _add_avg_pool_nhwc_kernel(a_ptr, b_ptr, out_ptr, out_pixels, width, channels, out_h, out_w,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels over N*out_h*out_w
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = q // (out_h * out_w)
    rem = q % (out_h * out_w)
    i, j = rem // out_w, rem % out_w
    top_left = ((n * (2 * out_h) + 2 * i) * width + 2 * j) * channels  # [BLOCK_P] input element offsets
    offs = top_left[:, None] + c[None, :]  # [BLOCK_P, BLOCK_C]
    mask = (q[:, None] < out_pixels) & (c[None, :] < channels)
    below = width * channels  # the next input row
    pooled = _rounded_sum(a_ptr, b_ptr, offs, mask) + _rounded_sum(a_ptr, b_ptr, offs + channels, mask)
    pooled = (pooled + _rounded_sum(a_ptr, b_ptr, offs + below, mask)) + _rounded_sum(
        a_ptr, b_ptr, offs + below + channels, mask)
    out_offs = q[:, None] * channels + c[None, :]
    tl.store(out_ptr + out_offs, (pooled / 4.0).to(out_ptr.dtype.element_ty), mask=mask)


_IN_INTERPRETER = interpreted(_add_avg_pool_nchw_kernel)


def _launch_nchw(a, b, out) -> None:
    n, c, h, w = a.shape
    out_h, out_w = h // 2, w // 2
    block_j = min(64, triton.next_power_of_2(out_w))
    block_i = min(max(1, _TILE_ELEMENTS // (4 * block_j)), triton.next_power_of_2(out_h))
    grid = (n * c, triton.cdiv(out_h, block_i), triton.cdiv(out_w, block_j))
    _add_avg_pool_nchw_kernel[grid](a, b, out, w, out_h, out_w, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4)


def _launch_nhwc(a, b, out) -> None:
    n, c, h, w = a.shape
    out_h, out_w = h // 2, w // 2
    block_c = min(128, triton.next_power_of_2(c))
    block_p = max(1, _TILE_ELEMENTS // (2 * block_c))  # 8 channels per thread and load: 16 bytes in bf16
    out_pixels = n * out_h * out_w
    grid = (triton.cdiv(out_pixels, block_p), triton.cdiv(c, block_c))
    _add_avg_pool_nhwc_kernel[grid](a, b, out, out_pixels, w, c, out_h, out_w, BLOCK_P=block_p, BLOCK_C=block_c,
                                    num_warps=4)


def add_avg_pool2d_forward(a: torch.Tensor, b: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``avg_pool2d(a + b, 2, 2)`` of two ``[N, C, H, W]`` tensors of one kernel dtype with even H and W, both
    NCHW-contiguous (``channels_last=False``) or both channels_last; the output has their layout. Arguments are
    checked by the op layer (ops/residual_avg_pool.py); here only where the kernels can run."""
    check_launch_device(_IN_INTERPRETER, a.device, "a is")
    n, c, h, w = a.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, h // 2, w // 2), device=a.device, dtype=a.dtype, memory_format=fmt)
    if out.numel():
        (_launch_nhwc if channels_last else _launch_nchw)(a, b, out)
    return out


__all__ = ["KERNEL_DTYPES", "add_avg_pool2d_forward"]
