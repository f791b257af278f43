"""Forward-only fused GroupNorm (+ optional SiLU) for channels_last (NHWC) input. The math, the statistics
(shifted sums, Chan's combination, fp32) and the split path are those of :mod:`.group_norm_silu`, which checks
the arguments and dispatches here.

channels_last (NHWC) x ``[N, C, H, W]`` is read in place and the output written channels_last (the VQGAN's
bf16 convs run NHWC; a copy would cost a transpose each way). Element (n, c, p) sits at ``n*HW*C + p*C + c``,
so group g is Cg = C/G contiguous channels at each of the HW pixels, C apart. A program handles GPP adjacent
groups of one sample (GPP*Cg channels side by side: enough bytes per pixel to fill a 32-byte sector, where one
group of 4 bf16 channels alone would use a quarter of each) and walks pixel tiles ``[BLOCK_P, GPP, BLOCK_C]``,
``BLOCK_C = next_power_of_2(Cg)`` masked to Cg; weight/bias are loaded once per program. Statistics are the
same shifted/Chan scheme, a lane being (pixel row of the tile, group, channel); the split path splits the
pixels. Offsets: int64 at each tile's first pixel, int32 within a tile.

Flat tiles: where every program's groups exist (GPP divides G) and CG is a power of two, a tile is
``[BLOCK_P, GPP*CG]``: a pixel row of the program's groups is one contiguous run, loaded and stored as wide
vectors (the 3-D tile's last dim is CG, so at CG = 4 in bf16 its accesses were 8 bytes); per-group values are
spread over their columns and column sums gathered back per group. Same per-element arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .group_norm_silu import _MAX_BLOCK, _MAX_GROUP_NUMEL, _MIN_BLOCK, _silu_fp32, _split_count

_NHWC_SECTOR_BYTES = 32  # a program's groups together span at least this many bytes per pixel
# a pixel row of at most this many bytes goes to one program whole (every group): H100 run 3, VQGAN 128 channels
# bf16 (256 B), 96x128x256x256: 2.19 ms whole rows vs 2.49 ms at 4 groups (the 32-byte rule), 0.57 vs 0.60 ms at
# 128x128 (benchmarks/results/h100_2026-11-27_run3_profile_group_norm.json)
_NHWC_WHOLE_ROW_BYTES = 256


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
def _spread_groups(v, GPP: tl.constexpr, CG: tl.constexpr):
    """[GPP] -> [GPP*CG]: each group's value over its CG channels (the columns of a flat tile)."""
    return tl.reshape(tl.broadcast_to(v[:, None], (GPP, CG)), (GPP * CG,))


@triton.jit
def _sum_groups(v, GPP: tl.constexpr, CG: tl.constexpr):
    """[GPP*CG] -> [GPP]: the sum over each group's CG columns."""
    return tl.sum(tl.reshape(v, (GPP, CG)), axis=1)


@triton.jit
def _nhwc_chunk_moments_flat(x_tile, channels, length, k_ref, CG: tl.constexpr, BLOCK_P: tl.constexpr,
                             GPP: tl.constexpr):
    """:func:`_nhwc_chunk_moments` on a flat tile [BLOCK_P, GPP*CG] (every group present, CG a power of two): a
    pixel row of the program's groups is one contiguous run, loaded as wide vectors; lanes are (p, column)."""
    pix = tl.arange(0, BLOCK_P)[:, None]
    offs = pix * channels + tl.arange(0, GPP * CG)[None, :]  # [BLOCK_P, GPP*CG]
    k_lane = tl.load(x_tile + offs, mask=pix < length, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_P, GPP * CG), tl.float32)
    s2 = tl.zeros((BLOCK_P, GPP * CG), tl.float32)
    for p0 in range(0, length, BLOCK_P):
        row_ok = pix < length - p0  # [BLOCK_P, 1]: uniform along a row, so the load stays vectorised
        x = tl.load(x_tile + offs, mask=row_ok, other=0.0).to(tl.float32)
        d = tl.where(row_ok, x - k_lane, 0.0)
        s1 += d
        s2 += d * d
        x_tile += BLOCK_P * channels
    n_lane = ((length - pix + BLOCK_P - 1) // BLOCK_P).to(tl.float32) + tl.zeros((BLOCK_P, GPP * CG), tl.float32)
    seen = n_lane > 0.0
    inv_n = 1.0 / tl.maximum(n_lane, 1.0)
    lane_mean = tl.where(seen, (k_lane - _spread_groups(k_ref, GPP, CG)[None, :]) + s1 * inv_n, 0.0)
    lane_m2 = tl.where(seen, s2 - s1 * s1 * inv_n, 0.0)
    mean = _sum_groups(tl.sum(n_lane * lane_mean, axis=0), GPP, CG) / (length * CG * 1.0)  # [GPP]
    dev = tl.where(seen, lane_mean - _spread_groups(mean, GPP, CG)[None, :], 0.0)
    m2 = _sum_groups(tl.sum(lane_m2 + n_lane * dev * dev, axis=0), GPP, CG)
    return mean, m2


@triton.jit
def _group_norm_nhwc_moments_kernel(x_ptr, partial_ptr, hw, channels, num_groups, chunk, n_chunks,
                                    CG: tl.constexpr, BLOCK_P: tl.constexpr, GPP: tl.constexpr,
                                    BLOCK_C: tl.constexpr, FLAT: tl.constexpr):
    # split path, launch 1: pixel chunk `part` of the program's groups -> partial[row, part] = (mean - k_ref, M2)
    part = tl.program_id(1)
    base, g0, gi, group_ok, rows = _nhwc_program_groups(hw, channels, num_groups, CG, GPP)
    k_ref = tl.load(x_ptr + base + gi * CG, mask=group_ok, other=0.0).to(tl.float32)  # [GPP]
    start = part * chunk
    x_tile = x_ptr + base + start.to(tl.int64) * channels
    if FLAT:
        mean, m2 = _nhwc_chunk_moments_flat(x_tile, channels, tl.minimum(chunk, hw - start), k_ref, CG, BLOCK_P,
                                            GPP)
    else:
        mean, m2 = _nhwc_chunk_moments(x_tile, channels, tl.minimum(chunk, hw - start), k_ref, group_ok, CG,
                                       BLOCK_P, GPP, BLOCK_C)
    slot = (rows * n_chunks + part) * 2
    tl.store(partial_ptr + slot, mean, mask=group_ok)
    tl.store(partial_ptr + slot + 1, m2, mask=group_ok)


@triton.jit
def _nhwc_output_loop(x_tile, out_tile, offs, lane_ok, pix, length, k_ref, mean, rstd, w, b, channels,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr):
    """The output pass over a chunk's pixel tiles, either tiling: ``offs`` a tile's offsets, ``lane_ok`` its lanes
    that exist (broadcast over pixels), ``pix`` its pixel rows; k_ref / mean / rstd / w / b broadcast to the tile
    (w, b unused without HAS_WEIGHT / HAS_BIAS)."""
    for p0 in range(0, length, BLOCK_P):
        mask = lane_ok & (pix < length - p0)
        x = tl.load(x_tile + offs, mask=mask, other=0.0).to(tl.float32)
        y = ((x - k_ref) - mean) * rstd
        if HAS_WEIGHT:
            y = y * w
        if HAS_BIAS:
            y = y + b
        if SILU:
            y = _silu_fp32(y)
        tl.store(out_tile + offs, y.to(out_tile.dtype.element_ty), mask=mask)
        x_tile += BLOCK_P * channels
        out_tile += BLOCK_P * channels


@triton.jit
def _nhwc_normalise(x_tile, out_tile, w_ptr, b_ptr, channels, length, k_ref, mean, rstd, gi, group_ok,
                    CG: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_P: tl.constexpr, GPP: tl.constexpr, BLOCK_C: tl.constexpr):
    """The output pass on tiles [BLOCK_P, GPP, BLOCK_C] (pointers at the chunk's first pixel, channel g0*CG; w/b at
    channel g0*CG); groups past G and lanes past CG masked."""
    j = tl.arange(0, BLOCK_C)[None, :]
    col_ok = group_ok[:, None] & (j < CG)  # [GPP, BLOCK_C]
    c = gi[:, None] * CG + j  # [GPP, BLOCK_C] channel - g0*CG
    w = 1.0
    b = 0.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=col_ok, other=1.0).to(tl.float32)[None, :, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
    pix = tl.arange(0, BLOCK_P)[:, None, None]
    offs = pix * channels + c[None, :, :]  # [BLOCK_P, GPP, BLOCK_C]
    _nhwc_output_loop(x_tile, out_tile, offs, col_ok[None, :, :], pix, length, k_ref[None, :, None],
                      mean[None, :, None], rstd[None, :, None], w, b, channels, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_P)


@triton.jit
def _nhwc_normalise_flat(x_tile, out_tile, w_ptr, b_ptr, channels, length, k_ref, mean, rstd, CG: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_P: tl.constexpr, GPP: tl.constexpr):
    """The output pass on flat tiles [BLOCK_P, GPP*CG] (pointers at the chunk's first pixel, channel g0*CG; w/b at
    channel g0*CG): the same per-element arithmetic as the 3-D tiles, in wide vectors (every lane exists)."""
    col = tl.arange(0, GPP * CG)
    w = 1.0
    b = 0.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + col).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + col).to(tl.float32)[None, :]
    pix = tl.arange(0, BLOCK_P)[:, None]
    offs = pix * channels + col[None, :]  # [BLOCK_P, GPP*CG]
    _nhwc_output_loop(x_tile, out_tile, offs, True, pix, length, _spread_groups(k_ref, GPP, CG)[None, :],
                      _spread_groups(mean, GPP, CG)[None, :], _spread_groups(rstd, GPP, CG)[None, :], w, b, channels,
                      HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_P)


@triton.jit
def _group_norm_silu_nhwc_forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, hw, channels, num_groups,
                                         chunk, n_chunks, eps, CG: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                         HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr,
                                         MAX_CHUNKS: tl.constexpr, BLOCK_P: tl.constexpr, GPP: tl.constexpr,
                                         BLOCK_C: tl.constexpr, FLAT: tl.constexpr):
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
    elif FLAT:
        mean, m2 = _nhwc_chunk_moments_flat(x_ptr + base, channels, hw, k_ref, CG, BLOCK_P, GPP)
    else:
        mean, m2 = _nhwc_chunk_moments(x_ptr + base, channels, hw, k_ref, group_ok, CG, BLOCK_P, GPP, BLOCK_C)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / total, 0.0) + eps)  # [GPP], biased variance as GroupNorm
    start = part * chunk
    length = tl.minimum(chunk, hw - start)
    tile = base + start.to(tl.int64) * channels
    if FLAT:
        _nhwc_normalise_flat(x_ptr + tile, out_ptr + tile, w_ptr + g0 * CG, b_ptr + g0 * CG, channels, length,
                             k_ref, mean, rstd, CG, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_P, GPP)
    else:
        _nhwc_normalise(x_ptr + tile, out_ptr + tile, w_ptr + g0 * CG, b_ptr + g0 * CG, channels, length, k_ref,
                        mean, rstd, gi, group_ok, CG, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_P, GPP, BLOCK_C)


def _nhwc_tile_and_warps(channels_per_group: int, num_groups: int, hw: int, elem_bytes: int,
                         block: Optional[int], groups_per_program: Optional[int]):
    """(BLOCK_P, GPP, BLOCK_C, warps) of the channels_last kernels: a tile [BLOCK_P, GPP, BLOCK_C] of about
    ``block`` elements (at least one pixel row), GPP groups side by side so a pixel row spans a sector, or the
    whole pixel row where it is short (``_NHWC_WHOLE_ROW_BYTES``)."""
    block_c = triton.next_power_of_2(channels_per_group)
    if groups_per_program is None:
        whole_row = num_groups * channels_per_group * elem_bytes <= _NHWC_WHOLE_ROW_BYTES
        gpp = num_groups if whole_row else triton.cdiv(_NHWC_SECTOR_BYTES, channels_per_group * elem_bytes)
        gpp = max(1, min(triton.next_power_of_2(gpp), triton.next_power_of_2(num_groups), _MAX_BLOCK // block_c))
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


def group_norm_silu_nhwc_forward(x, num_groups, weight, bias, eps, silu, out_dtype, block, split, groups_per_program,
                                 flat):
    """GroupNorm (+ SiLU) of a channels_last ``x [N, C, H, W]`` (checked by the caller,
    :func:`.group_norm_silu.group_norm_silu_forward`), read in place; the output is channels_last."""
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
    # flat tiles (a pixel row of the program's groups as one run of wide vectors) when every program's groups exist
    # and CG needs no lane mask; 3-D tiles [BLOCK_P, GPP, BLOCK_C] with masks otherwise
    flat_ok = block_c == cg and num_groups % gpp == 0
    if flat is None:
        flat = flat_ok
    elif flat and not flat_ok:
        raise ValueError(f"flat tiles need a power-of-two channels per group ({cg}) and groups per program ({gpp}) "
                         f"dividing the {num_groups} groups")
    tile_meta = dict(CG=cg, BLOCK_P=block_p, GPP=gpp, BLOCK_C=block_c, FLAT=bool(flat), num_warps=warps)
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


__all__ = ["group_norm_silu_nhwc_forward"]
