"""Multi-map L2: per-(map, row) squared distances and the student gradient of K feature maps in ONE launch.

Palette's loss (REFERENCE.md §3.2) sums a retain/forget MSE over 13 feature maps of different sizes. Launching
a kernel per map costs 13× the launches and leaves the GPU idle between the small ones; here every map is a
contiguous slab ``[N, M_k]`` reached through a table of its address, and one grid covers all of them.

Math, for every map k and row i (``s_k``, ``t_k``: student and teacher map k, viewed as ``[N, M_k]``)::

    row_sq[k, i] = Σ_j (s_k[i, j] − t_k[i, j])²            # [K, N] fp32
    grad_k[i, j] = grad_scale · (s_k[i, j] − t_k[i, j])     # [N, M_k], the student's dtype

Launch layout: a *work list* of tiles (map, row, chunk), each tile BLOCK consecutive elements of one row of
one map, built once on the host per shape signature (cached: nothing is rebuilt for fixed shapes). A tile
reads its map's addresses from int64 tables of ``data_ptr()``s and casts them to typed pointers; it writes
its partial sum to a zero-padded ``[K·N, max_chunks]`` buffer that a torch sum reduces in a fixed order
(deterministic, no atomics). :func:`multi_map_l2_scale` multiplies every stored ``grad_k`` row by an fp32
per-(map, row) factor, also in one launch (the op's backward).

Shapes and dtypes:
- ``students[k]``, ``teachers[k]``: contiguous, same shape ``[N, ...]`` (N shared by all maps, at least one
  element per row). All students share one dtype, all teachers one dtype (fp32 / fp16 / bf16; the two may
  differ). Arithmetic is fp32.
- Address tables are cached by address (a training loop at fixed shapes gets the same addresses from the
  caching allocator); a new table is an async copy from pinned memory, so no call syncs the host.
  The tensors themselves stay referenced by the caller's arguments until the launch is queued; the
  stream-ordered allocator keeps their memory valid for the kernel after that.

Limits: a map row may be any length (int64 offsets); the tile count must fit grid axis 0 (2^31 − 1).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch_device import check_launch_device, interpreted

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK = 4096
_POINTER_CACHE_SIZE = 64


@triton.jit
def _multi_map_l2_forward_kernel(student_table, teacher_table, grad_table, row_elems_table, tiles_ptr, partial_ptr,
                                 student_dtype_ref, teacher_dtype_ref, n_rows, max_chunks, grad_scale,
                                 WRITE_GRAD: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # program = one tile (map k, row, chunk): BLOCK consecutive elements of row `row` of map k
    tile = tl.program_id(0).to(tl.int64)
    k = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    row = tl.load(tiles_ptr + 3 * tile + 1).to(tl.int64)
    chunk = tl.load(tiles_ptr + 3 * tile + 2).to(tl.int64)
    m = tl.load(row_elems_table + k)  # int64: elements per row of map k
    x_ptr = tl.load(student_table + k).to(tl.pointer_type(student_dtype_ref.dtype.element_ty))
    y_ptr = tl.load(teacher_table + k).to(tl.pointer_type(teacher_dtype_ref.dtype.element_ty))
    if ALIGNED:  # host checked: every address 16-byte aligned and every M_k a multiple of 8 -> vector loads
        m = tl.multiple_of(m, 8)
        x_ptr = tl.multiple_of(x_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m
    base = row * m
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    diff = tl.where(mask, x - y, 0.0)
    tl.store(partial_ptr + (k * n_rows + row) * max_chunks + chunk, tl.sum(diff * diff, axis=0))
    if WRITE_GRAD:
        g_ptr = tl.load(grad_table + k).to(tl.pointer_type(student_dtype_ref.dtype.element_ty))
        if ALIGNED:
            g_ptr = tl.multiple_of(g_ptr, 16)
        tl.store(g_ptr + base + offs, (diff * grad_scale).to(student_dtype_ref.dtype.element_ty), mask=mask)


_IN_INTERPRETER = interpreted(_multi_map_l2_forward_kernel)  # fixed when triton defines the kernels


@triton.jit
def _multi_map_l2_scale_kernel(grad_table, out_table, row_elems_table, tiles_ptr, row_scale_ptr, grad_dtype_ref,
                               n_rows, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # out_k[row, chunk] = grad_k[row, chunk] * row_scale[k, row], in fp32, rounded once
    tile = tl.program_id(0).to(tl.int64)
    k = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    row = tl.load(tiles_ptr + 3 * tile + 1).to(tl.int64)
    chunk = tl.load(tiles_ptr + 3 * tile + 2).to(tl.int64)
    m = tl.load(row_elems_table + k)
    g_ptr = tl.load(grad_table + k).to(tl.pointer_type(grad_dtype_ref.dtype.element_ty))
    o_ptr = tl.load(out_table + k).to(tl.pointer_type(grad_dtype_ref.dtype.element_ty))
    if ALIGNED:
        m = tl.multiple_of(m, 8)
        g_ptr = tl.multiple_of(g_ptr, 16)
        o_ptr = tl.multiple_of(o_ptr, 16)
    scale = tl.load(row_scale_ptr + k * n_rows + row)  # fp32
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m
    base = row * m
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + base + offs, (g * scale).to(grad_dtype_ref.dtype.element_ty), mask=mask)


class _Plan:
    """The work list of one shape signature: tiles [T, 3] int32 (map, row, chunk) and the row lengths."""

    def __init__(self, device: torch.device, n: int, row_elems: Tuple[int, ...]):
        self.block = min(triton.next_power_of_2(max(row_elems)), MAX_BLOCK)
        chunks = [triton.cdiv(m, self.block) for m in row_elems]
        self.max_chunks = max(chunks)
        parts = []
        for k, c in enumerate(chunks):  # map-major, then row, then chunk
            rows, cols = torch.meshgrid(torch.arange(n), torch.arange(c), indexing="ij")
            parts.append(torch.stack([torch.full_like(rows, k), rows, cols], dim=-1).reshape(-1, 3))
        tiles = torch.cat(parts).to(torch.int32)  # [T, 3]
        self.n_tiles = tiles.shape[0]
        if self.n_tiles > 2 ** 31 - 1:
            raise ValueError(f"{self.n_tiles} tiles exceed the grid limit; split the maps")
        self.tiles = tiles.to(device)
        self.row_elems = torch.tensor(row_elems, dtype=torch.int64).to(device)  # [K]
        self.num_warps = 8 if self.block >= 2048 else 4


@lru_cache(maxsize=64)
def _plan(device: torch.device, n: int, row_elems: Tuple[int, ...]) -> _Plan:
    return _Plan(device, n, row_elems)


_pointer_tables: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()


def _pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 [K] of the tensors' addresses on ``device``; cached by address (LRU), no host sync."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    key = (device, ptrs)
    hit = _pointer_tables.get(key)
    if hit is not None:
        _pointer_tables.move_to_end(key)
        return hit[1]
    host = torch.tensor(ptrs, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()  # async copy; the host tensor is kept alive with the entry
        table = host.to(device, non_blocking=True)
    else:
        table = host
    _pointer_tables[key] = (host, table)
    if len(_pointer_tables) > _POINTER_CACHE_SIZE:
        _pointer_tables.popitem(last=False)
    return table


@lru_cache(maxsize=None)
def _dtype_ref(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a one-element tensor that only carries the element type into the kernel (never read or written)
    return torch.zeros(1, dtype=dtype, device=device)


def _aligned(tensors: Sequence[torch.Tensor], row_elems: Sequence[int]) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(m % 8 == 0 for m in row_elems)


def _check_maps(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]):
    if not isinstance(students, (list, tuple)) or not isinstance(teachers, (list, tuple)):
        raise TypeError("students and teachers must be lists (or tuples) of tensors")
    if len(students) == 0 or len(students) != len(teachers):
        raise ValueError(f"need the same non-zero number of student and teacher maps, got {len(students)} and "
                         f"{len(teachers)}")
    for k, (s, t) in enumerate(zip(students, teachers)):
        if not torch.is_tensor(s) or not torch.is_tensor(t):
            raise TypeError(f"map {k}: students and teachers must be tensors")
        if s.shape != t.shape or s.dim() < 1:
            raise ValueError(f"map {k}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must have the same "
                             f"shape [N, ...]")
        if s.shape[0] != students[0].shape[0]:
            raise ValueError(f"map {k} has N = {s.shape[0]}, map 0 has N = {students[0].shape[0]}")
        if s.numel() == 0:
            raise ValueError(f"map {k} has no elements: {tuple(s.shape)}")
        if s.dtype != students[0].dtype or t.dtype != teachers[0].dtype:
            raise TypeError(f"map {k}: all student maps must share one dtype, and all teacher maps one dtype; got "
                            f"{s.dtype}/{t.dtype} vs map 0's {students[0].dtype}/{teachers[0].dtype}")
        if s.dtype not in _FLOAT_DTYPES or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"map {k}: dtypes must be fp32, fp16 or bf16, got {s.dtype} and {t.dtype}")
        if s.device != students[0].device or t.device != students[0].device:
            raise ValueError(f"map {k}: all maps must be on {students[0].device}, got {s.device} and {t.device}")
        if not s.is_contiguous() or not t.is_contiguous():
            raise ValueError(f"map {k} must be contiguous")
    dev = students[0].device
    check_launch_device(_IN_INTERPRETER, dev, "maps are")


def multi_map_l2_forward(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], grad_scale: float = 2.0,
                         compute_grad: bool = True) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """(row_sq [K, N] fp32, [grad_k] in the students' dtype or None); see the module docstring."""
    _check_maps(students, teachers)
    dev, n = students[0].device, students[0].shape[0]
    row_elems = tuple(s.numel() // n for s in students)
    students = [s.detach() for s in students]
    teachers = [t.detach() for t in teachers]
    plan = _plan(dev, n, row_elems)
    grads = [torch.empty_like(s) for s in students] if compute_grad else None
    aligned = _aligned(students + teachers + (grads or []), row_elems)
    s_table, t_table = _pointer_table(students, dev), _pointer_table(teachers, dev)
    g_table = _pointer_table(grads, dev) if compute_grad else s_table  # unused when WRITE_GRAD is False
    k = len(students)
    partial = torch.zeros((k * n, plan.max_chunks), device=dev, dtype=torch.float32)  # [K·N, chunks]
    _multi_map_l2_forward_kernel[(plan.n_tiles,)](
        s_table, t_table, g_table, plan.row_elems, plan.tiles, partial, _dtype_ref(students[0].dtype, dev),
        _dtype_ref(teachers[0].dtype, dev), n, plan.max_chunks, float(grad_scale), WRITE_GRAD=bool(compute_grad),
        ALIGNED=aligned, BLOCK=plan.block, num_warps=plan.num_warps)
    return partial.sum(dim=1).view(k, n), grads


def multi_map_l2_scale(grads: Sequence[torch.Tensor], row_scale: torch.Tensor) -> List[torch.Tensor]:
    """``[grad_k · row_scale[k, i]]`` (per row i, fp32 math, grads' dtype) for all maps in one launch.
    ``grads``: as returned by :func:`multi_map_l2_forward`; ``row_scale``: ``[K, N]``."""
    _check_maps(grads, grads)
    dev, n, k = grads[0].device, grads[0].shape[0], len(grads)
    if tuple(row_scale.shape) != (k, n) or row_scale.device != dev:
        raise ValueError(f"row_scale must be [{k}, {n}] on {dev}, got {tuple(row_scale.shape)} on {row_scale.device}")
    row_elems = tuple(g.numel() // n for g in grads)
    plan = _plan(dev, n, row_elems)
    grads = [g.detach() for g in grads]
    outs = [torch.empty_like(g) for g in grads]
    scale = row_scale.detach().to(torch.float32).contiguous()
    _multi_map_l2_scale_kernel[(plan.n_tiles,)](
        _pointer_table(grads, dev), _pointer_table(outs, dev), plan.row_elems, plan.tiles, scale,
        _dtype_ref(grads[0].dtype, dev), n, ALIGNED=_aligned(grads + outs, row_elems), BLOCK=plan.block,
        num_warps=plan.num_warps)
    return outs


__all__ = ["multi_map_l2_forward", "multi_map_l2_scale"]
