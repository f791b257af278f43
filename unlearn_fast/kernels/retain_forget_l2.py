"""Fused retain/forget L2: per-row squared distances and the latent gradient in one pass (REFERENCE.md §1.3).

Math, for every row i of the student latent ``x [N, T, D]``::

    y_i      = forget_table[row_index[i]]  if row_is_forget[i]  else  retain_table[row_index[i]]    # [T, D]
    y_i      = LayerNorm_D(y_i) * norm_weight + norm_bias        (only if norm_weight is given)
    row_sq_i = Σ_{t,d} (x_i - y_i)^2                              # [N] fp32
    grad_i   = grad_scale * (x_i - y_i)                           # [N, T, D], latent's dtype

and, from ``row_sq`` (``loss_scale`` applied in fp32)::

    retain_loss = loss_scale * Σ_{i retain} row_sq_i        forget_loss = loss_scale * Σ_{i forget} row_sq_i

The teacher target of each row is read once and no difference tensor is kept besides ``grad``. Launches, all
graph-capturable (no host sync, nothing data-dependent on the host):

- :func:`retain_forget_l2_loss_forward`: the main kernel writes per-(row, chunk) partial sums (and ``grad``);
  one single-program *finalize* kernel sums them in a fixed order (deterministic, no atomics) into ``row_sq``
  and the two 0-d losses. Two launches.
- :func:`retain_forget_l2_backward`: ``grad_latent_i = (grad_i * g_i) * loss_scale`` with ``g_i`` the upstream
  gradient of the forget loss for forget rows and of the retain loss otherwise, both read from device memory,
  all in fp32, one rounding into the latent's dtype (the fp16-subnormal-safe order: the stored gradient is
  ``2·(x - y)``, the tiny ``loss_scale`` comes last). One launch.
- :func:`rank_within_class`: ``row_index`` for compact tables (rank of each row within its class), one
  single-program launch.
- :func:`retain_forget_l2_forward`: the main kernel and the finalize, returning ``(row_sq, grad)``.

Shapes and dtypes:
- ``latent``: contiguous ``[N, T, D]``, fp32 / fp16 / bf16. ``grad`` has the latent's dtype.
- ``retain_table [R, T, D]`` / ``forget_table [F, T, D]``: contiguous, fp32 / fp16 / bf16, both the same dtype
  (which may differ from the latent's); either may be None or empty. Full-size tables use ``row_index=None``
  (row i reads table row i; no index tensor is made or read); compact tables hold only their class's rows and
  ``row_index`` (any integer dtype, read as is) is the rank within the class.
  Indices are clamped into the table (no out-of-bounds read, no host sync to check them); a row whose table
  is empty gets the target 0 (then ``norm_bias`` after the norm), as the op's PyTorch twin does.
- ``norm_weight / norm_bias [D]``: LayerNorm over D with biased variance and ``eps``, in fp32.
- ``row_is_forget [N]``: bool or any integer dtype (non-zero = forget), read as is (a bool tensor is viewed as
  uint8: no conversion kernel).
- All arithmetic is fp32. ``row_sq`` and the losses are reduced from per-program partials by one program in a
  fixed order: deterministic, run to run.

Limits: without the norm any D works (a row is treated as one flat slab of T*D elements); with the norm a
whole D row lives in registers, so D <= MAX_NORM_D (ValueError beyond). N <= 65535 (grid axis 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch_device import check_launch_device, interpreted

MAX_NORM_D = 8192  # one [BLOCK_T, next_pow2(D)] fp32 tile per program
MAX_ROWS = 65535  # rows go on grid axis 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_target(retain_ptr, forget_ptr, is_forget, idx, retain_last, forget_last, row_elems, offs, mask,
                 HAS_RETAIN: tl.constexpr, HAS_FORGET: tl.constexpr):
    """fp32 target elements ``offs`` of one row: from the forget or the retain table (index clamped into it),
    0 if that table is empty. The loads are masked by the row's class, so only one table is read."""
    y = tl.zeros(offs.shape, tl.float32)
    if HAS_RETAIN:
        r_row = tl.minimum(tl.maximum(idx, 0), retain_last)
        y += tl.load(retain_ptr + r_row * row_elems + offs, mask=mask & (is_forget == 0), other=0.0).to(tl.float32)
    if HAS_FORGET:
        f_row = tl.minimum(tl.maximum(idx, 0), forget_last)
        y += tl.load(forget_ptr + f_row * row_elems + offs, mask=mask & (is_forget != 0), other=0.0).to(tl.float32)
    return y


@triton.jit
def _table_row(row_index_ptr, row, IDENTITY_ROWS: tl.constexpr):
    """int64 table row of batch row ``row``: ``row`` itself for full-size tables, else row_index[row]."""
    if IDENTITY_ROWS:
        idx = row
    else:
        idx = tl.load(row_index_ptr + row).to(tl.int64)
    return idx


@triton.jit
def _retain_forget_l2_forward_kernel(latent_ptr, retain_ptr, forget_ptr, is_forget_ptr, row_index_ptr,
                                     grad_ptr, partial_ptr, retain_last, forget_last, row_elems, n_chunks, grad_scale,
                                     HAS_RETAIN: tl.constexpr, HAS_FORGET: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                     IDENTITY_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # program (chunk, row): BLOCK consecutive elements of the row's flat [T*D] slab
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    is_forget = tl.load(is_forget_ptr + row)
    idx = _table_row(row_index_ptr, row, IDENTITY_ROWS)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_elems
    x = tl.load(latent_ptr + row * row_elems + offs, mask=mask, other=0.0).to(tl.float32)
    y = _load_target(retain_ptr, forget_ptr, is_forget, idx, retain_last, forget_last, row_elems, offs, mask,
                     HAS_RETAIN, HAS_FORGET)
    diff = tl.where(mask, x - y, 0.0)
    tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(diff * diff, axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + row * row_elems + offs, (diff * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)


_IN_INTERPRETER = interpreted(_retain_forget_l2_forward_kernel)  # fixed when triton defines the kernels


@triton.jit
def _retain_forget_l2_prenorm_forward_kernel(latent_ptr, retain_ptr, forget_ptr, is_forget_ptr, row_index_ptr,
                                             weight_ptr, bias_ptr, grad_ptr, partial_ptr, retain_last, forget_last,
                                             T, D, row_elems, n_chunks, eps, grad_scale,
                                             HAS_RETAIN: tl.constexpr, HAS_FORGET: tl.constexpr,
                                             WRITE_GRAD: tl.constexpr, IDENTITY_ROWS: tl.constexpr,
                                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (token block, row): BLOCK_T whole tokens, so the norm over D is local to the program
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    is_forget = tl.load(is_forget_ptr + row)
    idx = _table_row(row_index_ptr, row, IDENTITY_ROWS)
    tok = chunk * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    col = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = col < D
    mask = (tok < T)[:, None] & col_ok[None, :]  # [BLOCK_T, BLOCK_D]
    offs = tok.to(tl.int64)[:, None] * D + col[None, :]
    x = tl.load(latent_ptr + row * row_elems + offs, mask=mask, other=0.0).to(tl.float32)
    h = _load_target(retain_ptr, forget_ptr, is_forget, idx, retain_last, forget_last, row_elems, offs, mask,
                     HAS_RETAIN, HAS_FORGET)
    mean = tl.sum(h, axis=1) / D  # [BLOCK_T]
    hc = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / D + eps)  # biased variance, as LayerNorm
    w = tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    y = hc * rstd[:, None] * w[None, :] + b[None, :]
    diff = tl.where(mask, x - y, 0.0)
    tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + row * row_elems + offs, (diff * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "n_chunks"])
def _retain_forget_l2_finalize_kernel(partial_ptr, is_forget_ptr, row_sq_ptr, retain_loss_ptr, forget_loss_ptr,
                                      n_rows, n_chunks, loss_scale, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: partial [N, n_chunks] -> row_sq [N] and the two 0-d losses, in a fixed order
    lanes_n = tl.arange(0, BLOCK_N)
    lanes_c = tl.arange(0, BLOCK_C)
    retain_acc = tl.zeros((BLOCK_N,), tl.float32)
    forget_acc = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + lanes_n
        row_ok = rows < n_rows
        row_sq = tl.zeros((BLOCK_N,), tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            cols = c0 + lanes_c
            ok = row_ok[:, None] & (cols < n_chunks)[None, :]
            part = tl.load(partial_ptr + rows.to(tl.int64)[:, None] * n_chunks + cols[None, :], mask=ok, other=0.0)
            row_sq += tl.sum(part, axis=1)  # [BLOCK_N, BLOCK_C] -> [BLOCK_N]
        tl.store(row_sq_ptr + rows, row_sq, mask=row_ok)
        forget = tl.load(is_forget_ptr + rows, mask=row_ok, other=0) != 0
        forget_acc += tl.where(forget, row_sq, 0.0)  # rows past the end have row_sq 0
        retain_acc += tl.where(forget, 0.0, row_sq)
    tl.store(retain_loss_ptr, tl.sum(retain_acc, axis=0) * loss_scale)
    tl.store(forget_loss_ptr, tl.sum(forget_acc, axis=0) * loss_scale)


@triton.jit
def _retain_forget_l2_backward_kernel(grad_ptr, is_forget_ptr, grad_retain_ptr, grad_forget_ptr, out_ptr, row_elems,
                                      loss_scale, HAS_GRAD_RETAIN: tl.constexpr, HAS_GRAD_FORGET: tl.constexpr,
                                      BLOCK: tl.constexpr):
    # program (chunk, row): out = (grad * upstream gradient of the row's loss) * loss_scale, fp32 until the store
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    upstream_retain = 0.0  # an absent upstream gradient (the loss was not used) is zero
    upstream_forget = 0.0
    if HAS_GRAD_RETAIN:
        upstream_retain = tl.load(grad_retain_ptr).to(tl.float32)
    if HAS_GRAD_FORGET:
        upstream_forget = tl.load(grad_forget_ptr).to(tl.float32)
    weight = tl.where(tl.load(is_forget_ptr + row) != 0, upstream_forget, upstream_retain)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_elems
    g = tl.load(grad_ptr + row * row_elems + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * row_elems + offs, ((g * weight) * loss_scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _rank_within_class_kernel(is_forget_ptr, rank_ptr, n_rows, BLOCK: tl.constexpr):
    # one program: rank[i] = #forget rows before i (forget row) or #retain rows before i (retain row)
    lanes = tl.arange(0, BLOCK)
    forget_before = tl.zeros((), tl.int32)  # forget rows in earlier blocks
    for start in range(0, n_rows, BLOCK):
        rows = start + lanes
        ok = rows < n_rows
        forget = (tl.load(is_forget_ptr + rows, mask=ok, other=0) != 0).to(tl.int32)
        forget_upto = forget_before + tl.cumsum(forget, axis=0)  # forget rows in [0, i]
        rank = tl.where(forget != 0, forget_upto - 1, rows - forget_upto)  # retain rows in [0, i] = i + 1 - forget
        tl.store(rank_ptr + rows, rank, mask=ok)
        forget_before += tl.sum(forget, axis=0)


def _check_device(device: torch.device, what: str) -> None:
    check_launch_device(_IN_INTERPRETER, device, f"{what} is")


def _check_table(name: str, table: Optional[torch.Tensor], latent: torch.Tensor) -> Optional[torch.Tensor]:
    if table is None:
        return None
    if not torch.is_tensor(table):
        raise TypeError(f"{name} must be a tensor or None, got {type(table).__name__}")
    if table.dim() != 3 or tuple(table.shape[1:]) != tuple(latent.shape[1:]):
        raise ValueError(f"{name} must have shape [rows, {latent.shape[1]}, {latent.shape[2]}], "
                         f"got {tuple(table.shape)}")
    if table.device != latent.device:
        raise ValueError(f"{name} is on {table.device}, latent on {latent.device}")
    if table.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp32, fp16 or bf16, got {table.dtype}")
    if not table.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return table


def _check_row_vector(name: str, v: torch.Tensor, n: int, device: torch.device, integer: bool) -> torch.Tensor:
    if not torch.is_tensor(v) or v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must be a tensor [N] with N = {n}, got "
                         f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, latent on {device}")
    if v.is_floating_point() or v.is_complex():
        raise ValueError(f"{name} must be {'an integer' if integer else 'a bool or integer'} tensor, got {v.dtype}")
    if integer and v.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got torch.bool")
    v = v.contiguous()  # the kernels index it densely (no copy when it already is)
    return v.view(torch.uint8) if v.dtype == torch.bool else v  # same bytes: no conversion kernel


def _check_norm(norm_weight, norm_bias, d: int, device: torch.device):
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight and norm_bias must be given together")
    if norm_weight is None:
        return None, None
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if not torch.is_tensor(p) or tuple(p.shape) != (d,):
            raise ValueError(f"{name} must be a tensor [{d}], got "
                             f"{tuple(p.shape) if torch.is_tensor(p) else type(p).__name__}")
        if p.device != device:
            raise ValueError(f"{name} is on {p.device}, latent on {device}")
        if p.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp32, fp16 or bf16, got {p.dtype}")
    if d > MAX_NORM_D:
        raise ValueError(f"the fused norm supports D <= {MAX_NORM_D}, got D = {d}")
    return norm_weight.detach().contiguous(), norm_bias.detach().contiguous()


def _check_latent(latent) -> None:
    if not torch.is_tensor(latent) or latent.dim() != 3:
        raise ValueError(f"latent must be a tensor [N, T, D], got "
                         f"{tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__}")
    n, t, d = latent.shape
    if t == 0 or d == 0:
        raise ValueError(f"latent must have T >= 1 and D >= 1, got {tuple(latent.shape)}")
    if n > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows per launch, got N = {n}")
    if latent.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"latent must be fp32, fp16 or bf16, got {latent.dtype}")
    if not latent.is_contiguous():
        raise ValueError("latent must be contiguous")
    _check_device(latent.device, "latent")


def _flat_block(row_elems: int) -> int:
    """Elements per program of the plain forward and of the backward: a row is one flat slab of T*D."""
    return min(triton.next_power_of_2(row_elems), 4096)


def retain_forget_l2_loss_forward(latent: torch.Tensor, retain_table: Optional[torch.Tensor],
                                  forget_table: Optional[torch.Tensor], row_is_forget: torch.Tensor,
                                  row_index: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                                  norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6, grad_scale: float = 2.0,
                                  loss_scale: float = 1.0, compute_grad: bool = True
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(row_sq [N] fp32, retain_loss [] fp32, forget_loss [] fp32, grad [N, T, D] or None); two launches.

    ``row_index=None``: row i reads table row i (full-size tables). See the module docstring for the rest.
    """
    _check_latent(latent)
    n, t, d = latent.shape
    dev = latent.device
    retain_table = _check_table("retain_table", retain_table, latent)
    forget_table = _check_table("forget_table", forget_table, latent)
    if retain_table is not None and forget_table is not None and retain_table.dtype != forget_table.dtype:
        raise ValueError(f"retain_table and forget_table must share a dtype, got {retain_table.dtype} and "
                         f"{forget_table.dtype}")
    is_forget = _check_row_vector("row_is_forget", row_is_forget, n, dev, integer=False)
    identity_rows = row_index is None
    if not identity_rows:
        row_index = _check_row_vector("row_index", row_index, n, dev, integer=True)
    weight, bias = _check_norm(norm_weight, norm_bias, d, dev)
    eps, grad_scale, loss_scale = float(eps), float(grad_scale), float(loss_scale)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    latent = latent.detach()
    grad = torch.empty_like(latent) if compute_grad else None
    row_sq = torch.empty((n,), device=dev, dtype=torch.float32)
    retain_loss = torch.empty((), device=dev, dtype=torch.float32)
    forget_loss = torch.empty((), device=dev, dtype=torch.float32)
    if n == 0:  # nothing to launch (an empty batch is never captured in a training graph)
        return row_sq, retain_loss.zero_(), forget_loss.zero_(), grad
    # an empty table is never read (its load is compiled out) but still needs a valid pointer argument
    has_retain = retain_table is not None and retain_table.shape[0] > 0
    has_forget = forget_table is not None and forget_table.shape[0] > 0
    retain = retain_table.detach() if has_retain else latent
    forget = forget_table.detach() if has_forget else latent
    retain_last = retain_table.shape[0] - 1 if has_retain else 0
    forget_last = forget_table.shape[0] - 1 if has_forget else 0
    grad_arg = grad if grad is not None else latent  # unused when WRITE_GRAD is False
    index_arg = is_forget if identity_rows else row_index  # unused when IDENTITY_ROWS is True
    flags = dict(HAS_RETAIN=has_retain, HAS_FORGET=has_forget, WRITE_GRAD=bool(compute_grad),
                 IDENTITY_ROWS=identity_rows)

    row_elems = t * d
    if weight is None:
        block = _flat_block(row_elems)
        n_chunks = triton.cdiv(row_elems, block)
        partial = torch.empty((n, n_chunks), device=dev, dtype=torch.float32)  # [N, chunks]
        _retain_forget_l2_forward_kernel[(n_chunks, n)](
            latent, retain, forget, is_forget, index_arg, grad_arg, partial, retain_last, forget_last, row_elems,
            n_chunks, grad_scale, **flags, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    else:
        block_d = triton.next_power_of_2(d)
        block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_d))
        n_chunks = triton.cdiv(t, block_t)
        partial = torch.empty((n, n_chunks), device=dev, dtype=torch.float32)  # [N, chunks]
        _retain_forget_l2_prenorm_forward_kernel[(n_chunks, n)](
            latent, retain, forget, is_forget, index_arg, weight, bias, grad_arg, partial, retain_last,
            forget_last, t, d, row_elems, n_chunks, eps, grad_scale, **flags, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=8 if block_t * block_d >= 2048 else 4)
    _launch_finalize(partial, is_forget, row_sq, retain_loss, forget_loss, loss_scale)
    return row_sq, retain_loss, forget_loss, grad


def _launch_finalize(partial: torch.Tensor, is_forget: torch.Tensor, row_sq: torch.Tensor, retain_loss: torch.Tensor,
                     forget_loss: torch.Tensor, loss_scale: float, block_n: Optional[int] = None,
                     block_c: Optional[int] = None) -> None:
    """partial [N, chunks] -> row_sq [N], retain_loss [], forget_loss [] (one program; blocks overridable for
    tests of the loops)."""
    n, n_chunks = partial.shape
    block_c = block_c or min(triton.next_power_of_2(n_chunks), 128)
    block_n = block_n or max(1, min(triton.next_power_of_2(n), 4096 // block_c))
    _retain_forget_l2_finalize_kernel[(1,)](partial, is_forget, row_sq, retain_loss, forget_loss, n, n_chunks,
                                            float(loss_scale), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4)


def retain_forget_l2_forward(latent: torch.Tensor, retain_table: Optional[torch.Tensor],
                             forget_table: Optional[torch.Tensor], row_is_forget: torch.Tensor,
                             row_index: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor] = None,
                             norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6, grad_scale: float = 0.0,
                             compute_grad: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(row_sq [N] fp32, grad [N, T, D] in latent's dtype or None); see the module docstring."""
    row_sq, _, _, grad = retain_forget_l2_loss_forward(latent, retain_table, forget_table, row_is_forget, row_index,
                                                       norm_weight, norm_bias, eps, grad_scale, 1.0, compute_grad)
    return row_sq, grad


def _check_upstream(name: str, g, device: torch.device) -> Optional[torch.Tensor]:
    if g is None:
        return None
    if not torch.is_tensor(g) or g.numel() != 1 or not g.is_floating_point():
        raise ValueError(f"{name} must be None or a 1-element float tensor, got "
                         f"{tuple(g.shape) if torch.is_tensor(g) else type(g).__name__}")
    if g.device != device:
        raise ValueError(f"{name} is on {g.device}, grad on {device}")
    return g.detach()


def retain_forget_l2_backward(grad: torch.Tensor, row_is_forget: torch.Tensor, grad_retain: Optional[torch.Tensor],
                              grad_forget: Optional[torch.Tensor], loss_scale: float) -> torch.Tensor:
    """``(grad_i * g_i) * loss_scale`` per row, in fp32, stored in ``grad``'s dtype; one launch.

    ``grad [N, T, D]``: the forward's stored gradient. ``g_i``: ``grad_forget`` for forget rows, ``grad_retain``
    otherwise; 1-element device tensors (read by the kernel: no sync) or None (zero, a loss that was not used).
    """
    _check_latent(grad)
    n, t, d = grad.shape
    dev = grad.device
    is_forget = _check_row_vector("row_is_forget", row_is_forget, n, dev, integer=False)
    grad_retain = _check_upstream("grad_retain", grad_retain, dev)
    grad_forget = _check_upstream("grad_forget", grad_forget, dev)
    out = torch.empty_like(grad)
    if n == 0:
        return out
    row_elems = t * d
    block = _flat_block(row_elems)
    _retain_forget_l2_backward_kernel[(triton.cdiv(row_elems, block), n)](
        grad.detach(), is_forget, grad if grad_retain is None else grad_retain,
        grad if grad_forget is None else grad_forget, out, row_elems, float(loss_scale),
        HAS_GRAD_RETAIN=grad_retain is not None, HAS_GRAD_FORGET=grad_forget is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
    return out


def rank_within_class(row_is_forget: torch.Tensor, _block: Optional[int] = None) -> torch.Tensor:
    """int32 ``[N]``: the rank of each row among the rows of its own class (retain or forget), in batch order:
    the ``row_index`` of compact tables. One single-program launch, no host sync. (``_block``: rows per loop
    step, for tests.)"""
    if not torch.is_tensor(row_is_forget) or row_is_forget.dim() != 1:
        got = tuple(row_is_forget.shape) if torch.is_tensor(row_is_forget) else type(row_is_forget).__name__
        raise ValueError(f"row_is_forget must be a tensor [N], got {got}")
    n = row_is_forget.shape[0]
    _check_device(row_is_forget.device, "row_is_forget")
    is_forget = _check_row_vector("row_is_forget", row_is_forget, n, row_is_forget.device, integer=False)
    rank = torch.empty((n,), device=is_forget.device, dtype=torch.int32)
    if n == 0:
        return rank
    if n >= 2 ** 31:
        raise ValueError(f"at most 2^31 - 1 rows, got {n}")
    block = _block or min(triton.next_power_of_2(n), 1024)
    _rank_within_class_kernel[(1,)](is_forget, rank, n, BLOCK=block, num_warps=4)
    return rank


__all__ = ["retain_forget_l2_forward", "retain_forget_l2_loss_forward", "retain_forget_l2_backward",
           "rank_within_class", "MAX_NORM_D"]
