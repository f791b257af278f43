"""Fused retain/forget L2: per-row squared distances and the latent gradient in one pass (REFERENCE.md §1.3).

Math, for every row i of the student latent ``x [N, T, D]``::

    y_i      = forget_table[row_index[i]]  if row_is_forget[i]  else  retain_table[row_index[i]]    # [T, D]
    y_i      = LayerNorm_D(y_i) * norm_weight + norm_bias        (only if norm_weight is given)
    row_sq_i = Σ_{t,d} (x_i - y_i)^2                              # [N] fp32
    grad_i   = grad_scale * (x_i - y_i)                           # [N, T, D], latent's dtype

The loss op (unlearn_fast/ops/retain_forget_l2_loss.py) turns ``row_sq`` into the retain and forget losses and
scales ``grad`` per row in backward; the teacher target of each row is read once and no difference tensor is
kept besides ``grad``.

Shapes and dtypes:
- ``latent``: contiguous ``[N, T, D]``, fp32 / fp16 / bf16. ``grad`` has the latent's dtype.
- ``retain_table [R, T, D]`` / ``forget_table [F, T, D]``: contiguous, fp32 / fp16 / bf16, both the same dtype
  (which may differ from the latent's); either may be None or empty. Full-size tables use ``row_index =
  arange(N)``; compact tables hold only their class's rows and ``row_index`` is the rank within the class.
  Indices are clamped into the table (no out-of-bounds read, no host sync to check them); a row whose table
  is empty gets the target 0 (then ``norm_bias`` after the norm), as the op's PyTorch twin does.
- ``norm_weight / norm_bias [D]``: LayerNorm over D with biased variance and ``eps``, in fp32.
- All arithmetic is fp32. ``row_sq`` is reduced from per-program partials by a torch sum: deterministic.

Limits: without the norm any D works (a row is treated as one flat slab of T*D elements); with the norm a
whole D row lives in registers, so D <= MAX_NORM_D (ValueError beyond). N <= 65535 (grid axis 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

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
def _retain_forget_l2_forward_kernel(latent_ptr, retain_ptr, forget_ptr, is_forget_ptr, row_index_ptr,
                                     grad_ptr, partial_ptr, retain_last, forget_last, row_elems, n_chunks, grad_scale,
                                     HAS_RETAIN: tl.constexpr, HAS_FORGET: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                     BLOCK: tl.constexpr):
    # program (chunk, row): BLOCK consecutive elements of the row's flat [T*D] slab
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    is_forget = tl.load(is_forget_ptr + row)
    idx = tl.load(row_index_ptr + row)  # int64
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_elems
    x = tl.load(latent_ptr + row * row_elems + offs, mask=mask, other=0.0).to(tl.float32)
    y = _load_target(retain_ptr, forget_ptr, is_forget, idx, retain_last, forget_last, row_elems, offs, mask,
                     HAS_RETAIN, HAS_FORGET)
    diff = tl.where(mask, x - y, 0.0)
    tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(diff * diff, axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + row * row_elems + offs, (diff * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _retain_forget_l2_prenorm_forward_kernel(latent_ptr, retain_ptr, forget_ptr, is_forget_ptr, row_index_ptr,
                                             weight_ptr, bias_ptr, grad_ptr, partial_ptr, retain_last, forget_last,
                                             T, D, row_elems, n_chunks, eps, grad_scale,
                                             HAS_RETAIN: tl.constexpr, HAS_FORGET: tl.constexpr,
                                             WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (token block, row): BLOCK_T whole tokens, so the norm over D is local to the program
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    is_forget = tl.load(is_forget_ptr + row)
    idx = tl.load(row_index_ptr + row)
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


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


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
    return v


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


def retain_forget_l2_forward(latent: torch.Tensor, retain_table: Optional[torch.Tensor],
                             forget_table: Optional[torch.Tensor], row_is_forget: torch.Tensor,
                             row_index: torch.Tensor, norm_weight: Optional[torch.Tensor] = None,
                             norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6, grad_scale: float = 0.0,
                             compute_grad: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(row_sq [N] fp32, grad [N, T, D] in latent's dtype or None); see the module docstring."""
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
    dev = latent.device
    if dev.type != "cuda" and not _interpreted(_retain_forget_l2_forward_kernel):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 before import), latent is on {dev}")
    retain_table = _check_table("retain_table", retain_table, latent)
    forget_table = _check_table("forget_table", forget_table, latent)
    if retain_table is not None and forget_table is not None and retain_table.dtype != forget_table.dtype:
        raise ValueError(f"retain_table and forget_table must share a dtype, got {retain_table.dtype} and "
                         f"{forget_table.dtype}")
    is_forget = _check_row_vector("row_is_forget", row_is_forget, n, dev, integer=False).to(torch.int8)
    row_index = _check_row_vector("row_index", row_index, n, dev, integer=True).to(torch.int64)
    weight, bias = _check_norm(norm_weight, norm_bias, d, dev)
    eps, grad_scale = float(eps), float(grad_scale)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    latent = latent.detach()
    grad = torch.empty_like(latent) if compute_grad else None
    if n == 0:
        return latent.new_zeros((0,), dtype=torch.float32), grad
    # an empty table is never read (its load is compiled out) but still needs a valid pointer argument
    has_retain = retain_table is not None and retain_table.shape[0] > 0
    has_forget = forget_table is not None and forget_table.shape[0] > 0
    retain = retain_table.detach() if has_retain else latent
    forget = forget_table.detach() if has_forget else latent
    retain_last = retain_table.shape[0] - 1 if has_retain else 0
    forget_last = forget_table.shape[0] - 1 if has_forget else 0
    grad_arg = grad if grad is not None else latent  # unused when WRITE_GRAD is False
    flags = dict(HAS_RETAIN=has_retain, HAS_FORGET=has_forget, WRITE_GRAD=bool(compute_grad))

    row_elems = t * d
    if weight is None:
        block = min(triton.next_power_of_2(row_elems), 4096)
        n_chunks = triton.cdiv(row_elems, block)
        partial = torch.empty((n, n_chunks), device=dev, dtype=torch.float32)  # [N, chunks]
        _retain_forget_l2_forward_kernel[(n_chunks, n)](
            latent, retain, forget, is_forget, row_index, grad_arg, partial, retain_last, forget_last, row_elems,
            n_chunks, grad_scale, **flags, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    else:
        block_d = triton.next_power_of_2(d)
        block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_d))
        n_chunks = triton.cdiv(t, block_t)
        partial = torch.empty((n, n_chunks), device=dev, dtype=torch.float32)  # [N, chunks]
        _retain_forget_l2_prenorm_forward_kernel[(n_chunks, n)](
            latent, retain, forget, is_forget, row_index, weight, bias, grad_arg, partial, retain_last,
            forget_last, t, d, row_elems, n_chunks, eps, grad_scale, **flags, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=8 if block_t * block_d >= 2048 else 4)
    return partial.sum(dim=1), grad


__all__ = ["retain_forget_l2_forward", "MAX_NORM_D"]
