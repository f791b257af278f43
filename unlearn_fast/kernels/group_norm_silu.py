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

channels_last (NHWC) x ``[N, C, H, W]`` is read in place and the output written channels_last (the VQGAN's
bf16 convs run NHWC; a copy would cost a transpose each way). Element (n, c, p) sits at ``n*HW*C + p*C + c``,
so group g is Cg = C/G contiguous channels at each of the HW pixels, C apart. A program handles GPP adjacent
groups of one sample (GPP*Cg channels side by side: enough bytes per pixel to fill a 32-byte sector, where one
group of 4 bf16 channels alone would use a quarter of each) and walks pixel tiles ``[BLOCK_P, GPP, BLOCK_C]``,
``BLOCK_C = next_power_of_2(Cg)`` masked to Cg; weight/bias are loaded once per program. Statistics are the
same shifted/Chan scheme, a lane being (pixel row of the tile, group, channel); the split path splits the
pixels. Offsets: int64 at each tile's first pixel, int32 within a tile.
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
_NHWC_SECTOR_BYTES = 32  # channels_last: a program's groups together span at least this many bytes per pixel


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


@triton.jit
def _nhwc_program_groups(hw, channels, num_groups, CG: tl.constexpr, GPP: tl.constexpr):
    """The groups of program_id(0), sample n's groups g0 .. g0+GPP-1: (int64 offset of (n, pixel 0, channel
    g0*CG), g0, group lanes gi [GPP], which of them exist [GPP], their rows n*G + g [GPP])."""
    pid = tl.program_id(0)
    group_blocks = tl.cdiv(num_groups, GPP)
    n = pid // group_blocks
    g0 = (pid % group_blocks) * GPP
    gi = tl.arange(0, GPP)
    group_ok = g0 + gi < num_groups
    rows = n.to(tl.int64) * num_groups + g0 + gi  # [GPP]
    base = n.to(tl.int64) * hw * channels + g0 * CG
    return base, g0, gi, group_ok, rows


@triton.jit
def _nhwc_chunk_moments(x_tile, channels, length, k_ref, group_ok, CG: tl.constexpr, BLOCK_P: tl.constexpr,
                        GPP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per group, (mean - k_ref, M2) in fp32 [GPP] of ``length`` (> 0) pixels from pointer ``x_tile`` (pixel
    start, channel g0*CG). Lane (p, g, j) keeps sums of x - k_lane over pixels p, p + BLOCK_P, ...."""
    pix = tl.arange(0, BLOCK_P)[:, None, None]
    j = tl.arange(0, BLOCK_C)[None, None, :]
    lane_ok = group_ok[None, :, None] & (j < CG)  # [1, GPP, BLOCK_C]
    offs = pix * channels + tl.arange(0, GPP)[None, :, None] * CG + j  # [BLOCK_P, GPP, BLOCK_C]
    k_lane = tl.load(x_tile + offs, mask=lane_ok & (pix < length), other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_P, GPP, BLOCK_C), tl.float32)
    s2 = tl.zeros((BLOCK_P, GPP, BLOCK_C), tl.float32)
    for p0 in range(0, length, BLOCK_P):
        mask = lane_ok & (pix < length - p0)
        x = tl.load(x_tile + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - k_lane, 0.0)
        s1 += d
        s2 += d * d
        x_tile += BLOCK_P * channels  # the pointer carries the int64 offset
    n_row = ((length - pix + BLOCK_P - 1) // BLOCK_P).to(tl.float32)  # [BLOCK_P, 1, 1] pixels a row saw
    n_lane = tl.where(lane_ok, n_row, 0.0)  # [BLOCK_P, GPP, BLOCK_C]
    seen = n_lane > 0.0
    inv_n = 1.0 / tl.maximum(n_lane, 1.0)
    lane_mean = tl.where(seen, (k_lane - k_ref[None, :, None]) + s1 * inv_n, 0.0)
    lane_m2 = tl.where(seen, s2 - s1 * s1 * inv_n, 0.0)
    mean = tl.sum(tl.sum(n_lane * lane_mean, axis=2), axis=0) / (length * CG * 1.0)  # [GPP]
    dev = tl.where(seen, lane_mean - mean[None, :, None], 0.0)
    m2 = tl.sum(tl.sum(lane_m2 + n_lane * dev * dev, axis=2), axis=0)
    return mean, m2


@triton.jit
def _group_norm_nhwc_moments_kernel(x_ptr, partial_ptr, hw, channels, num_groups, chunk, n_chunks,
                                    CG: tl.constexpr, BLOCK_P: tl.constexpr, GPP: tl.constexpr,
                                    BLOCK_C: tl.constexpr):
    # split path, launch 1: pixel chunk `part` of the program's groups -> partial[row, part] = (mean - k_ref, M2)
    part = tl.program_id(1)
    base, g0, gi, group_ok, rows = _nhwc_program_groups(hw, channels, num_groups, CG, GPP)
    k_ref = tl.load(x_ptr + base + gi * CG, mask=group_ok, other=0.0).to(tl.float32)  # [GPP]
    start = part * chunk
    x_tile = x_ptr + base + start.to(tl.int64) * channels
    mean, m2 = _nhwc_chunk_moments(x_tile, channels, tl.minimum(chunk, hw - start), k_ref, group_ok, CG,
                                   BLOCK_P, GPP, BLOCK_C)
    slot = (rows * n_chunks + part) * 2
    tl.store(partial_ptr + slot, mean, mask=group_ok)
    tl.store(partial_ptr + slot + 1, m2, mask=group_ok)


@triton.jit
def _group_norm_silu_nhwc_forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, hw, channels, num_groups,
                                         chunk, n_chunks, eps, CG: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                         HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr,
                                         MAX_CHUNKS: tl.constexpr, BLOCK_P: tl.constexpr, GPP: tl.constexpr,
                                         BLOCK_C: tl.constexpr):
    # grid (N * cdiv(G, GPP), n_chunks): program (pid, part) writes pixel chunk `part` of its GPP groups; out has
    # x's (channels_last) offsets. Statistics from the split partials, or from a first pass here.
    part = tl.program_id(1)
    base, g0, gi, group_ok, rows = _nhwc_program_groups(hw, channels, num_groups, CG, GPP)
    k_ref = tl.load(x_ptr + base + gi * CG, mask=group_ok, other=0.0).to(tl.float32)  # [GPP]
    total = hw * CG * 1.0
    if SPLIT:
        jc = tl.arange(0, MAX_CHUNKS)[None, :]
        ok = group_ok[:, None] & (jc < n_chunks)  # [GPP, MAX_CHUNKS]
        count = tl.where(ok, tl.minimum(hw - jc * chunk, chunk) * CG, 0).to(tl.float32)
        slots = (rows[:, None] * n_chunks + jc) * 2
        chunk_mean = tl.load(partial_ptr + slots, mask=ok, other=0.0)
        chunk_m2 = tl.load(partial_ptr + slots + 1, mask=ok, other=0.0)
        mean = tl.sum(count * chunk_mean, axis=1) / total  # [GPP]
        dev = tl.where(ok, chunk_mean - mean[:, None], 0.0)
        m2 = tl.sum(chunk_m2 + count * dev * dev, axis=1)
    else:
        mean, m2 = _nhwc_chunk_moments(x_ptr + base, channels, hw, k_ref, group_ok, CG, BLOCK_P, GPP, BLOCK_C)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / total, 0.0) + eps)  # [GPP], biased variance as GroupNorm
    k_ref = k_ref[None, :, None]  # [1, GPP, 1]
    mean = mean[None, :, None]
    rstd = rstd[None, :, None]
    j = tl.arange(0, BLOCK_C)[None, :]
    col_ok = group_ok[:, None] & (j < CG)  # [GPP, BLOCK_C]
    c = gi[:, None] * CG + j  # [GPP, BLOCK_C] channel - g0*CG
    if HAS_WEIGHT:
        w = tl.load(w_ptr + g0 * CG + c, mask=col_ok, other=1.0).to(tl.float32)[None, :, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + g0 * CG + c, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
    pix = tl.arange(0, BLOCK_P)[:, None, None]
    offs = pix * channels + c[None, :, :]  # [BLOCK_P, GPP, BLOCK_C]
    start = part * chunk
    length = tl.minimum(chunk, hw - start)
    tile = base + start.to(tl.int64) * channels
    x_tile = x_ptr + tile
    out_tile = out_ptr + tile
    for p0 in range(0, length, BLOCK_P):
        mask = col_ok[None, :, :] & (pix < length - p0)
        x = tl.load(x_tile + offs, mask=mask, other=0.0).to(tl.float32)
        y = ((x - k_ref) - mean) * rstd
        if HAS_WEIGHT:
            y = y * w
        if HAS_BIAS:
            y = y + b
        if SILU:
            y = _silu_fp32(y)
        tl.store(out_tile + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        x_tile += BLOCK_P * channels
        out_tile += BLOCK_P * channels


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


def _nhwc_tile_and_warps(channels_per_group: int, num_groups: int, hw: int, elem_bytes: int,
                         block: Optional[int], groups_per_program: Optional[int]):
    """(BLOCK_P, GPP, BLOCK_C, warps) of the channels_last kernels: a tile [BLOCK_P, GPP, BLOCK_C] of about
    ``block`` elements (at least one pixel row), GPP groups side by side so a pixel row spans a sector."""
    block_c = triton.next_power_of_2(channels_per_group)
    if groups_per_program is None:
        gpp = triton.next_power_of_2(triton.cdiv(_NHWC_SECTOR_BYTES, channels_per_group * elem_bytes))
        gpp = max(1, min(gpp, triton.next_power_of_2(num_groups), _MAX_BLOCK // block_c))
    elif groups_per_program < 1 or groups_per_program & (groups_per_program - 1):
        raise ValueError(f"groups_per_program must be a power of two >= 1, got {groups_per_program}")
    else:
        gpp = groups_per_program
    row = gpp * block_c  # elements of one pixel row of the tile
    if block is None:
        block = min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(hw) * row))
    elif block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    block_p = max(1, block // row)
    tile = block_p * row
    return block_p, gpp, block_c, (8 if tile >= 4096 else 4 if tile >= 1024 else 2)


def _forward_channels_last(x, num_groups, weight, bias, eps, silu, out_dtype, block, split, groups_per_program):
    # x: [N, C, H, W] channels_last, read in place; out the same layout
    out = torch.empty_like(x, dtype=out_dtype, memory_format=torch.channels_last)
    n, c, h, w = x.shape
    hw, cg = h * w, c // num_groups
    if cg * hw > _MAX_GROUP_NUMEL:
        raise ValueError(f"a group holds {cg * hw} elements, more than the kernel's {_MAX_GROUP_NUMEL}")
    block_p, gpp, block_c, warps = _nhwc_tile_and_warps(cg, num_groups, hw, x.element_size(), block,
                                                        groups_per_program)
    if c * (block_p + 1) >= 2 ** 31:
        raise ValueError(f"{c} channels times {block_p} pixels per tile overflow int32 offsets; use a smaller block")
    programs = n * triton.cdiv(num_groups, gpp)
    n_tiles = triton.cdiv(hw, block_p)
    n_chunks = _split_count(x.device, programs, n_tiles, split)
    chunk = triton.cdiv(n_tiles, n_chunks) * block_p  # pixels per chunk
    tile_meta = dict(CG=cg, BLOCK_P=block_p, GPP=gpp, BLOCK_C=block_c, num_warps=warps)
    partial = x  # unused pointer stand-in when not split
    if n_chunks > 1:
        partial = torch.empty((n * num_groups, n_chunks, 2), dtype=torch.float32, device=x.device)
        _group_norm_nhwc_moments_kernel[(programs, n_chunks)](x, partial, hw, c, num_groups, chunk, n_chunks,
                                                              **tile_meta)
    _group_norm_silu_nhwc_forward_kernel[(programs, n_chunks)](
        x, x if weight is None else weight, x if bias is None else bias, out, partial, hw, c, num_groups, chunk,
        n_chunks, float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu),
        SPLIT=n_chunks > 1, MAX_CHUNKS=triton.next_power_of_2(n_chunks), **tile_meta)
    return out


def group_norm_silu_forward(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], eps: float, silu: bool,
                            out_dtype: Optional[torch.dtype] = None, *, block: Optional[int] = None,
                            split: Optional[int] = None, groups_per_program: Optional[int] = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) of ``x [N, C, *spatial]`` into a new tensor of ``out_dtype`` (default x's).

    x is contiguous (NCHW; out is contiguous) or 4-D channels_last-contiguous (see :func:`reads_channels_last`;
    read in place, out is channels_last). ``weight, bias: [C]`` or None (identity). No autograd. ``block``
    (elements per loop step, a power of two) and ``split`` (chunks per group) override the heuristics, for
    tests of the block loop and the split path; ``groups_per_program`` (a power of two, channels_last only)
    overrides how many adjacent groups one program walks. Launches: 1 (one program per group, or per GPP
    groups) or 2 (split: partial moments, then normalise).
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_launch(x, num_groups, weight, bias, out_dtype)
    if not x.is_contiguous():  # channels_last, checked
        return _forward_channels_last(x, num_groups, weight, bias, eps, silu, out_dtype, block, split,
                                      groups_per_program)
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
