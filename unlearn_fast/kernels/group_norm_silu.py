"""Forward-only fused GroupNorm (+ optional SiLU) for frozen networks (the VQGAN tokenizer's norm -> swish).

Math, for ``x: [N, C, *spatial]`` viewed as ``[N, G, M]`` with ``M = C/G * prod(spatial)`` (a group is one
contiguous chunk of M elements in NCHW)::

    mean, var = mean(x[n, g]), biased var(x[n, g])          fp32, whatever x's dtype
    y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]   c = the element's channel
    y = y * sigmoid(y)                                       if silu
    out = y rounded to out's dtype                           (fp32 / fp16 / bf16)

Statistics without cancellation when mean^2 >> var: every lane l of the reduction block keeps sums of
``x - k_l``, where its shift ``k_l`` is the first element that lane sees; lanes are combined with Chan's
parallel formula around ``k_ref`` (the group's first element), so every fp32 quantity summed is of the size of
the spread, never of the mean. The output is normalised as ``((x - k_ref) - (mean - k_ref)) * rstd``:
``x - k_ref`` is exact for values near each other, so a large mean costs no digits there either.

Launch shapes: one program per (n, group) reads its group twice (statistics, then output) when there are
enough groups to fill the GPU (``N*G >= 2 * SMs``). Otherwise each group is split into S chunks: one launch
writes fp32 (mean - k_ref, M2) per chunk, a second normalises with grid (N*G, S), each program combining its
group's S partials again (in a fixed order: deterministic, no atomics). When a channel's H*W is a multiple of
the block (VQGAN's 256x256 .. 32x32 maps), each block lies in one channel and weight/bias are two scalar loads
per block; otherwise each element finds its channel by ``offset // HW`` and gathers them.

Offsets are int64 at the group base (N*C*HW may exceed 2^31); within a group int32 (a group holds fewer than
2^31 - 4096 elements).

channels_last (NHWC) x is read in place by the kernels of :mod:`.group_norm_silu_nhwc`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch_device import check_launch_device, interpreted

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK = 4096  # elements per loop step on a GPU (16 per thread at 8 warps)
_MIN_BLOCK = 64
_MAX_GROUP_NUMEL = 2 ** 31 - 1 - _MAX_BLOCK  # int32 offsets inside a group, with one block of headroom
_PROGRAMS_PER_SM = 4  # target for the split path: enough programs in flight to saturate HBM
_MAX_SPLIT = 256


@triton.jit
def _silu_fp32(y):
    """y * sigmoid(y) in fp32, the exponential of -|y| only (in (0, 1]: no overflow for large |y|)."""
    e = tl.exp(-tl.abs(y))
    r = 1.0 / (1.0 + e)
    return y * tl.where(y >= 0.0, r, e * r)


@triton.jit
def _chunk_moments(x_ptr, base, start, stop, k_ref, BLOCK: tl.constexpr):
    """(mean - k_ref, M2) in fp32 of the elements ``x[base + start : base + stop]`` (stop > start)."""
    lanes = tl.arange(0, BLOCK)
    length = stop - start
    k_lane = tl.load(x_ptr + base + start + lanes, mask=lanes < length, other=0.0).to(tl.float32)  # [BLOCK]
    s1 = tl.zeros((BLOCK,), tl.float32)  # per-lane sums of (x - k_lane) and its square
    s2 = tl.zeros((BLOCK,), tl.float32)
    for off in range(start, stop, BLOCK):
        offs = off + lanes
        mask = offs < stop
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - k_lane, 0.0)
        s1 += d
        s2 += d * d
    n_lane = ((length - lanes + BLOCK - 1) // BLOCK).to(tl.float32)  # elements lane l saw (0 past the end)
    seen = n_lane > 0.0
    inv_n = 1.0 / tl.maximum(n_lane, 1.0)
    lane_mean = tl.where(seen, (k_lane - k_ref) + s1 * inv_n, 0.0)  # relative to k_ref: spread-sized
    lane_m2 = tl.where(seen, s2 - s1 * s1 * inv_n, 0.0)
    mean = tl.sum(n_lane * lane_mean, axis=0) / (length * 1.0)  # (* 1.0: length may be a constexpr)
    dev = tl.where(seen, lane_mean - mean, 0.0)
    m2 = tl.sum(lane_m2, axis=0) + tl.sum(n_lane * dev * dev, axis=0)
    return mean, m2


@triton.jit
def _group_norm_moments_kernel(x_ptr, partial_ptr, group_numel, chunk, n_chunks, BLOCK: tl.constexpr):
    # split path, launch 1: chunk `part` of group `row` -> partial[row, part] = (mean - k_ref, M2)
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = row.to(tl.int64) * group_numel
    k_ref = tl.load(x_ptr + base).to(tl.float32)
    start = part * chunk
    stop = tl.minimum(start + chunk, group_numel)
    mean, m2 = _chunk_moments(x_ptr, base, start, stop, k_ref, BLOCK)
    slot = (row.to(tl.int64) * n_chunks + part) * 2
    tl.store(partial_ptr + slot, mean)
    tl.store(partial_ptr + slot + 1, m2)


@triton.jit
def _group_norm_silu_forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, group_numel, hw,
                                    channels_per_group, num_groups, chunk, n_chunks, eps,
                                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                                    SPLIT: tl.constexpr, MAX_CHUNKS: tl.constexpr,
                                    ONE_CHANNEL_PER_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # grid (N*G, n_chunks): program (row, part) writes chunk `part` of group `row`; with SPLIT the statistics
    # come from the partials of _group_norm_moments_kernel, else (n_chunks == 1) from a first pass here.
    # ONE_CHANNEL_PER_BLOCK (hw % BLOCK == 0): each block lies in one channel, so weight/bias are two scalar
    # loads per block instead of a division and two gathers per element
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = row.to(tl.int64) * group_numel
    k_ref = tl.load(x_ptr + base).to(tl.float32)
    total = group_numel * 1.0  # fp32 (group_numel is a constexpr when it is 1)
    if SPLIT:
        j = tl.arange(0, MAX_CHUNKS)
        ok = j < n_chunks
        count = tl.where(ok, tl.minimum(group_numel - j * chunk, chunk), 0).to(tl.float32)  # [MAX_CHUNKS]
        slots = (row.to(tl.int64) * n_chunks + j) * 2
        chunk_mean = tl.load(partial_ptr + slots, mask=ok, other=0.0)
        chunk_m2 = tl.load(partial_ptr + slots + 1, mask=ok, other=0.0)
        mean = tl.sum(count * chunk_mean, axis=0) / total
        dev = tl.where(ok, chunk_mean - mean, 0.0)
        m2 = tl.sum(chunk_m2, axis=0) + tl.sum(count * dev * dev, axis=0)
    else:
        mean, m2 = _chunk_moments(x_ptr, base, 0, group_numel, k_ref, BLOCK)
    var = tl.maximum(m2 / total, 0.0)  # biased, as GroupNorm
    rstd = 1.0 / tl.sqrt(var + eps)
    c0 = (row % num_groups) * channels_per_group  # the group's first channel
    lanes = tl.arange(0, BLOCK)
    start = part * chunk
    stop = tl.minimum(start + chunk, group_numel)
    for off in range(start, stop, BLOCK):
        offs = off + lanes
        mask = offs < stop
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = ((x - k_ref) - mean) * rstd
        if ONE_CHANNEL_PER_BLOCK:
            c_block = c0 + off // hw  # the block's channel
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + c_block).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + c_block).to(tl.float32)
        elif HAS_WEIGHT or HAS_BIAS:
            c = c0 + offs // hw  # [BLOCK] channel of each element
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = _silu_fp32(y)
        tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_IN_INTERPRETER = interpreted(_group_norm_silu_forward_kernel)  # fixed when triton defines the kernels


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_and_warps(group_numel: int, hw: int, block: Optional[int]):
    if block is None:
        block = min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(group_numel)))
        if hw % block and hw >= 1024 and not hw & (hw - 1):
            block = hw  # a power-of-two channel of 1024 or 2048: blocks of one channel (scalar weight/bias)
    elif block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return block, (8 if block >= 4096 else 4 if block >= 1024 else 2)


def _split_count(device: torch.device, rows: int, n_blocks: int, split: Optional[int]) -> int:
    """Chunks per group: 1 when N*G programs already fill the GPU (or on the CPU interpreter), else enough to
    give about _PROGRAMS_PER_SM programs per SM. Always so that every chunk is a whole number of blocks."""
    if split is None:
        if device.type != "cuda":
            return 1
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if rows >= 2 * sms:
            return 1
        split = triton.cdiv(_PROGRAMS_PER_SM * sms, rows)
    elif split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    split = max(1, min(split, n_blocks, _MAX_SPLIT))
    return triton.cdiv(n_blocks, triton.cdiv(n_blocks, split))  # no empty chunk


def reads_channels_last(x: torch.Tensor, num_groups: int) -> bool:
    """Whether :func:`group_norm_silu_forward` reads ``x`` in place as NHWC (and writes channels_last): x is 4-D,
    channels_last-contiguous and not NCHW-contiguous (when both hold, C == 1 or H*W == 1, the layouts are the
    same memory and the NCHW kernel runs), with at most _MAX_BLOCK channels per group and C small enough for
    int32 offsets within a tile of up to _MAX_BLOCK pixels. Other strided x must be made contiguous first."""
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    c = x.shape[1]
    return (num_groups >= 1 and c % num_groups == 0 and c // num_groups <= _MAX_BLOCK
            and c * (_MAX_BLOCK + 1) < 2 ** 31)


def _check_launch(x, num_groups, weight, bias, out_dtype) -> None:
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError("x must be a tensor [N, C, *spatial]")
    if x.dtype not in _DTYPES or out_dtype not in _DTYPES:
        raise ValueError(f"x and out dtypes must be fp32, fp16 or bf16, got {x.dtype} and {out_dtype}")
    check_launch_device(_IN_INTERPRETER, x.device, "x is")
    if num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {num_groups} groups")
    if not x.is_contiguous() and not reads_channels_last(x, num_groups):
        raise ValueError(f"x must be contiguous (NCHW) or channels_last-contiguous [N, C, H, W] with at most "
                         f"{_MAX_BLOCK} channels per group, got shape {tuple(x.shape)} strides {x.stride()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (x.shape[1],) or t.dtype not in _DTYPES or t.device != x.device
                              or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32/fp16/bf16 tensor [{x.shape[1]}] on {x.device}")


def group_norm_silu_forward(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], eps: float, silu: bool,
                            out_dtype: Optional[torch.dtype] = None, *, block: Optional[int] = None,
                            split: Optional[int] = None, groups_per_program: Optional[int] = None,
                            flat_tiles: Optional[bool] = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) of ``x [N, C, *spatial]`` into a new tensor of ``out_dtype`` (default x's).

    x is contiguous (NCHW; out is contiguous) or 4-D channels_last-contiguous (see :func:`reads_channels_last`;
    read in place, out is channels_last). ``weight, bias: [C]`` or None (identity). No autograd. ``block``
    (elements per loop step, a power of two) and ``split`` (chunks per group) override the heuristics, for
    tests of the block loop and the split path; ``groups_per_program`` (a power of two, channels_last only)
    overrides how many adjacent groups one program walks, ``flat_tiles`` (channels_last only) whether its tiles
    are flat [pixels, GPP*Cg] (the default where every group is present and Cg is a power of two) or 3-D
    [pixels, GPP, next_pow2(Cg)]. Launches: 1 (one program per group, or per GPP groups) or 2 (split: partial
    moments, then normalise).
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_launch(x, num_groups, weight, bias, out_dtype)
    if not x.is_contiguous():  # channels_last, checked
        from .group_norm_silu_nhwc import group_norm_silu_nhwc_forward  # imports this module's helpers
        return group_norm_silu_nhwc_forward(x, num_groups, weight, bias, eps, silu, out_dtype, block, split,
                                      groups_per_program, flat_tiles)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // (n * c)
    group_numel = (c // num_groups) * hw
    if group_numel > _MAX_GROUP_NUMEL:
        raise ValueError(f"a group holds {group_numel} elements, more than the kernel's {_MAX_GROUP_NUMEL}")
    rows = n * num_groups
    block, warps = _block_and_warps(group_numel, hw, block)
    n_blocks = triton.cdiv(group_numel, block)
    n_chunks = _split_count(x.device, rows, n_blocks, split)
    chunk = triton.cdiv(n_blocks, n_chunks) * block
    partial = x  # unused pointer stand-in when not split
    if n_chunks > 1:
        partial = torch.empty((rows, n_chunks, 2), dtype=torch.float32, device=x.device)  # (mean - k_ref, M2)
        _group_norm_moments_kernel[(rows, n_chunks)](x, partial, group_numel, chunk, n_chunks, BLOCK=block,
                                                     num_warps=warps)
    _group_norm_silu_forward_kernel[(rows, n_chunks)](
        x, x if weight is None else weight, x if bias is None else bias, out, partial, group_numel, hw,
        c // num_groups, num_groups, chunk, n_chunks, float(eps), HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, SILU=bool(silu), SPLIT=n_chunks > 1,
        MAX_CHUNKS=triton.next_power_of_2(n_chunks), ONE_CHANNEL_PER_BLOCK=hw % block == 0, BLOCK=block,
        num_warps=warps)
    return out


__all__ = ["group_norm_silu_forward", "reads_channels_last"]
