"""Fused residual add + LayerNorm, forward and backward (a ViT block's ``x = x + branch; h = norm(x)``).

Math, per row of ``x, branch: [rows, D]`` (any leading dims flattened)::

    s = x + branch (+ branch_bias)     added in fp32, rounded to s's dtype (torch's promotion of the operands)
    mean = sum(s) / D                  fp32, from the rounded s
    var = sum((s - mean)^2) / D        fp32, biased; two passes over the row in registers (no E[s^2] - E[s]^2)
    rstd = 1 / sqrt(var + eps)
    h = (s - mean) * rstd * weight + bias, rounded to h's dtype

Backward, with ``xhat = (s - mean) * rstd`` and ``dxhat = g_h * weight`` (fp32)::

    g = g_s + rstd * (dxhat - mean_D(dxhat) - xhat * mean_D(dxhat * xhat))   -> grad_x, grad_branch (own dtypes)
    grad_weight = sum_rows(g_h * xhat), grad_bias = sum_rows(g_h)             fp32, then the parameter's dtype
    grad_branch_bias = sum_rows(g)                                            fp32, then branch_bias's dtype

``branch_bias: [D]`` (optional) is the bias of the Linear that made ``branch``, added here instead of in that
GEMM: its gradient is summed over the rows in the same pass as the norm's parameters instead of by a reduction
(and casts) of its own in the Linear's backward.

Launch shapes. Forward: one program per ROWS adjacent rows, a register tile ``[ROWS, BLOCK_D]`` with
``BLOCK_D = next_power_of_2(D)`` and ``ROWS * BLOCK_D`` about 4096 elements (at least one row); it writes s (only
when branch is given), h and per-row mean and rstd (fp32). Backward: a grid fixed by the shape (a few programs
per SM on a GPU), each program walks a contiguous block of rows in tiles of ROWS rows, writes grad_x /
grad_branch and accumulates its rows' grad_weight / grad_bias / grad_branch_bias terms in fp32 registers,
stored to a ``[3, programs, D]`` fp32 partials buffer; a second small kernel sums the partials over programs in a fixed
order (deterministic, no atomics) and writes them in the parameters' dtypes. No host sync: capturable in a
CUDA graph.

Limits and dtypes: D <= 8192 (the row lives in registers); x, branch, weight, bias, gradients fp32 / fp16 /
bf16, each independently; s has torch's promoted dtype of x and branch. Offsets are int64 at each row
(rows * D may exceed 2^31).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch_device import check_launch_device, interpreted

MAX_LAYER_NORM_D = 8192
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 4096  # elements of a program's [ROWS, BLOCK_D] tile
_PROGRAMS_PER_SM = 2  # backward: enough rows in flight per SM, few partial rows to sum
_PROGRAMS_OFF_GPU = 4  # backward grid under the interpreter (no SM count)
_REDUCE_COLS = 64  # partials reduction: columns per program
_REDUCE_PROGRAMS = 32  # partials reduction: program rows summed per loop step
_MAX_PARTIALS = 2 ** 29  # elements of one third of the partials buffer: int32 offsets into all three


@triton.jit
def _add_layer_norm_forward_kernel(x_ptr, branch_ptr, bb_ptr, w_ptr, b_ptr, s_ptr, h_ptr, mean_ptr, rstd_ptr,
                                   n_rows, D, eps, HAS_BRANCH: tl.constexpr, HAS_BRANCH_BIAS: tl.constexpr,
                                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < n_rows
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]  # [ROWS, BLOCK_D]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        s = s + tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BRANCH_BIAS:
            s = s + tl.load(bb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        s_stored = s.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, s_stored, mask=mask)
        s = s_stored.to(tl.float32)  # the statistics of the s the caller sees
    mean = tl.sum(s, axis=1) / D  # [ROWS]
    dev = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(dev * dev, axis=1) / D  # biased, as LayerNorm
    rstd = 1.0 / tl.sqrt(var + eps)
    h = dev * rstd[:, None]
    if HAS_WEIGHT:
        h = h * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        h = h + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_backward_kernel(gh_ptr, gs_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, gx_ptr, gbranch_ptr,
                                    partial_ptr, n_rows, D, rows_per_program, HAS_GS: tl.constexpr,
                                    HAS_WEIGHT: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GBRANCH: tl.constexpr,
                                    GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
                                    GRAD_BRANCH_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # program p: rows [p * rows_per_program, +rows_per_program) in tiles of ROWS; partial[0 / 1 / 2, p, :] its
    # rows' grad_weight / grad_bias / grad_branch_bias terms (rows_per_program is a multiple of ROWS)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_D]
    dw_acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    dbb_acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    start = pid * rows_per_program
    stop = tl.minimum(start + rows_per_program, n_rows)
    for r0 in range(start, stop, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < stop
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)[:, None]  # [ROWS, 1]
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        gh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GRAD_WEIGHT:
            dw_acc += gh * xhat
        if GRAD_BIAS:
            db_acc += gh
        if WRITE_GX or WRITE_GBRANCH or GRAD_BRANCH_BIAS:
            dxhat = gh
            if HAS_WEIGHT:
                dxhat = gh * w
            c_dxhat = tl.sum(dxhat, axis=1)[:, None] / D  # mean_D(dxhat)
            c_xhat = tl.sum(dxhat * xhat, axis=1)[:, None] / D  # mean_D(dxhat * xhat)
            g = rstd * (dxhat - c_dxhat - xhat * c_xhat)
            if HAS_GS:
                g = g + tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if GRAD_BRANCH_BIAS:
                dbb_acc += tl.where(mask, g, 0.0)
            if WRITE_GX:
                tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
            if WRITE_GBRANCH:
                tl.store(gbranch_ptr + offs, g.to(gbranch_ptr.dtype.element_ty), mask=mask)
    slot = pid.to(tl.int64) * D + cols
    if GRAD_WEIGHT:
        tl.store(partial_ptr + slot, tl.sum(dw_acc, axis=0), mask=col_ok)
    if GRAD_BIAS:
        bias_half = tl.num_programs(0) * D  # partial[1]: programs * D < 2^31 (a few per SM, D <= 8192)
        tl.store(partial_ptr + bias_half + slot, tl.sum(db_acc, axis=0), mask=col_ok)
    if GRAD_BRANCH_BIAS:
        tl.store(partial_ptr + 2 * tl.num_programs(0) * D + slot, tl.sum(dbb_acc, axis=0), mask=col_ok)


@triton.jit
def _add_layer_norm_param_grad_kernel(partial_ptr, dw_ptr, db_ptr, dbb_ptr, programs, D, GRAD_WEIGHT: tl.constexpr,
                                      GRAD_BIAS: tl.constexpr, GRAD_BRANCH_BIAS: tl.constexpr,
                                      BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr):
    # columns [pid * BLOCK_COLS, +BLOCK_COLS): dw[c] = sum_p partial[0, p, c], db[c] = sum_p partial[1, p, c],
    # dbb[c] = sum_p partial[2, p, c]
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < D
    ps = tl.arange(0, BLOCK_P)
    dw_acc = tl.zeros((BLOCK_P, BLOCK_COLS), tl.float32)
    db_acc = tl.zeros((BLOCK_P, BLOCK_COLS), tl.float32)
    dbb_acc = tl.zeros((BLOCK_P, BLOCK_COLS), tl.float32)
    for p0 in range(0, programs, BLOCK_P):
        mask = (p0 + ps < programs)[:, None] & col_ok[None, :]
        offs = (p0 + ps)[:, None] * D + cols[None, :]  # int32: programs * D is small
        if GRAD_WEIGHT:
            dw_acc += tl.load(partial_ptr + offs, mask=mask, other=0.0)
        if GRAD_BIAS:
            db_acc += tl.load(partial_ptr + programs * D + offs, mask=mask, other=0.0)
        if GRAD_BRANCH_BIAS:
            dbb_acc += tl.load(partial_ptr + 2 * programs * D + offs, mask=mask, other=0.0)
    if GRAD_WEIGHT:
        tl.store(dw_ptr + cols, tl.sum(dw_acc, axis=0).to(dw_ptr.dtype.element_ty), mask=col_ok)
    if GRAD_BIAS:
        tl.store(db_ptr + cols, tl.sum(db_acc, axis=0).to(db_ptr.dtype.element_ty), mask=col_ok)
    if GRAD_BRANCH_BIAS:
        tl.store(dbb_ptr + cols, tl.sum(dbb_acc, axis=0).to(dbb_ptr.dtype.element_ty), mask=col_ok)


_IN_INTERPRETER = interpreted(_add_layer_norm_forward_kernel)  # fixed when triton defines the kernels


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile(d: int, n_rows: int) -> Tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) of a [ROWS, BLOCK_D] tile of about _TILE elements, no more rows than exist."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(_TILE // block_d, triton.next_power_of_2(max(n_rows, 1))))
    elements = rows * block_d
    return rows, block_d, (8 if elements >= 4096 else 4 if elements >= 1024 else 2)


def _backward_programs(device: torch.device, tiles: int, d: int, programs: Optional[int]) -> int:
    """Programs of the backward grid: a few per SM (fewer when there are fewer tiles), no empty program."""
    if programs is None:
        if device.type == "cuda":
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            programs = _PROGRAMS_PER_SM * sms
        else:
            programs = _PROGRAMS_OFF_GPU
    elif isinstance(programs, bool) or not isinstance(programs, int) or programs < 1:
        raise ValueError(f"programs must be an int >= 1, got {programs!r}")
    programs = max(1, min(programs, tiles, _MAX_PARTIALS // d))
    return triton.cdiv(tiles, triton.cdiv(tiles, programs))


def _check_tensor(name: str, t: torch.Tensor, shape, device: torch.device) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _check_dtype(name: str, dtype) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def _check_d(x: torch.Tensor) -> int:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., D] with D >= 1, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d > MAX_LAYER_NORM_D:
        raise ValueError(f"D = {d} is beyond the kernel's limit of {MAX_LAYER_NORM_D} (a row lives in registers)")
    return d


def add_layer_norm_forward(x: torch.Tensor, branch: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype,
                           branch_bias: Optional[torch.Tensor] = None):
    """(s, h, mean, rstd) for ``x, branch: [..., D]`` (branch may be None: then s is x itself, not copied).

    ``s = x + branch (+ branch_bias)`` summed in fp32 in that order and rounded once to torch's promoted dtype of
    the operands, ``h = LayerNorm(s)`` in ``out_dtype``, ``mean, rstd: [rows]`` fp32 (rows = x.numel() / D) for
    :func:`add_layer_norm_backward`. ``weight, bias, branch_bias: [D]`` or None (identity; branch_bias needs a
    branch). No autograd. One launch.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    check_launch_device(_IN_INTERPRETER, x.device, "x is")
    d = _check_d(x)
    _check_tensor("x", x, x.shape, x.device)
    _check_dtype("out_dtype", out_dtype)
    if branch is not None:
        _check_tensor("branch", branch, x.shape, x.device)
    elif branch_bias is not None:
        raise ValueError("branch_bias needs a branch (it is the bias of the layer that made the branch)")
    for name, t in (("weight", weight), ("bias", bias), ("branch_bias", branch_bias)):
        if t is not None:
            _check_tensor(name, t, (d,), x.device)
    n_rows = x.numel() // d
    s_dtype = None if branch is None else torch.promote_types(x.dtype, branch.dtype)
    if branch_bias is not None:
        s_dtype = torch.promote_types(s_dtype, branch_bias.dtype)
    s = x if branch is None else torch.empty(x.shape, dtype=s_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return s, h, mean, rstd
    rows, block_d, warps = _tile(d, n_rows)
    _add_layer_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](
        x, x if branch is None else branch, x if branch_bias is None else branch_bias,
        x if weight is None else weight, x if bias is None else bias, s, h, mean, rstd, n_rows, d, float(eps),
        HAS_BRANCH=branch is not None, HAS_BRANCH_BIAS=branch_bias is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return s, h, mean, rstd


def add_layer_norm_backward(grad_h: torch.Tensor, grad_s: Optional[torch.Tensor], s: torch.Tensor,
                            weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                            x_dtype: Optional[torch.dtype], branch_dtype: Optional[torch.dtype],
                            weight_grad: bool, bias_grad: bool, bias_dtype: Optional[torch.dtype] = None, *,
                            branch_bias_dtype: Optional[torch.dtype] = None, programs: Optional[int] = None):
    """(grad_x, grad_branch, grad_weight, grad_bias, grad_branch_bias) of :func:`add_layer_norm_forward`; each
    None when not asked.

    ``grad_h: [..., D]`` (h's gradient), ``grad_s`` (s's, or None for zeros), ``s``, ``mean``, ``rstd`` from the
    forward. grad_x is written in ``x_dtype`` and grad_branch in ``branch_dtype`` (None: not wanted); when both
    dtypes are equal one tensor is written and returned for both (the same gradient, as torch's add returns).
    ``weight_grad`` / ``bias_grad`` ask for the parameter gradients (in weight's / ``bias_dtype``, default fp32);
    ``branch_bias_dtype`` (None: not wanted) for branch_bias's, the rows' sum of s's whole gradient.
    ``programs`` overrides the backward grid (tests). Launches: 1, plus 1 for parameter gradients.
    """
    if not torch.is_tensor(s):
        raise TypeError(f"s must be a tensor, got {type(s).__name__}")
    check_launch_device(_IN_INTERPRETER, s.device, "s is")
    d = _check_d(s)
    _check_tensor("s", s, s.shape, s.device)
    _check_tensor("grad_h", grad_h, s.shape, s.device)
    if grad_s is not None:
        _check_tensor("grad_s", grad_s, s.shape, s.device)
    n_rows = s.numel() // d
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check_tensor(name, t, (n_rows,), s.device)
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32, got {t.dtype}")
    if weight is not None:
        _check_tensor("weight", weight, (d,), s.device)
    elif weight_grad:
        raise ValueError("weight_grad needs the weight")
    for name, dtype in (("x_dtype", x_dtype), ("branch_dtype", branch_dtype), ("bias_dtype", bias_dtype),
                        ("branch_bias_dtype", branch_bias_dtype)):
        if dtype is not None:
            _check_dtype(name, dtype)
    device = s.device
    grad_x = None if x_dtype is None else torch.empty(s.shape, dtype=x_dtype, device=device)
    if branch_dtype is None:
        grad_branch = None
    elif branch_dtype == x_dtype:
        grad_branch = grad_x  # one store serves both
    else:
        grad_branch = torch.empty(s.shape, dtype=branch_dtype, device=device)
    grad_weight = torch.empty(d, dtype=weight.dtype, device=device) if weight_grad else None
    grad_bias = torch.empty(d, dtype=bias_dtype or torch.float32, device=device) if bias_grad else None
    grad_bb = None if branch_bias_dtype is None else torch.empty(d, dtype=branch_bias_dtype, device=device)
    if n_rows == 0:
        return (grad_x, grad_branch) + tuple(None if t is None else t.zero_()
                                             for t in (grad_weight, grad_bias, grad_bb))
    rows, block_d, warps = _tile(d, n_rows)
    tiles = triton.cdiv(n_rows, rows)
    n_programs = _backward_programs(device, tiles, d, programs)
    rows_per_program = triton.cdiv(tiles, n_programs) * rows
    params = weight_grad or bias_grad or grad_bb is not None
    partial = torch.empty((3, n_programs, d), dtype=torch.float32, device=device) if params else mean
    write_gbranch = grad_branch is not None and grad_branch is not grad_x
    _add_layer_norm_backward_kernel[(n_programs,)](
        grad_h, s if grad_s is None else grad_s, s, s if weight is None else weight, mean, rstd,
        s if grad_x is None else grad_x, s if not write_gbranch else grad_branch, partial, n_rows, d,
        rows_per_program, HAS_GS=grad_s is not None, HAS_WEIGHT=weight is not None,
        WRITE_GX=grad_x is not None, WRITE_GBRANCH=write_gbranch,
        GRAD_WEIGHT=weight_grad, GRAD_BIAS=bias_grad, GRAD_BRANCH_BIAS=grad_bb is not None, ROWS=rows,
        BLOCK_D=block_d, num_warps=warps)
    if params:
        block_cols = min(_REDUCE_COLS, triton.next_power_of_2(d))
        _add_layer_norm_param_grad_kernel[(triton.cdiv(d, block_cols),)](
            partial, s if grad_weight is None else grad_weight, s if grad_bias is None else grad_bias,
            s if grad_bb is None else grad_bb, n_programs, d, GRAD_WEIGHT=weight_grad, GRAD_BIAS=bias_grad,
            GRAD_BRANCH_BIAS=grad_bb is not None,
            BLOCK_P=min(_REDUCE_PROGRAMS, triton.next_power_of_2(n_programs)), BLOCK_COLS=block_cols,
            num_warps=2)
    return grad_x, grad_branch, grad_weight, grad_bias, grad_bb


__all__ = ["MAX_LAYER_NORM_D", "add_layer_norm_forward", "add_layer_norm_backward"]
