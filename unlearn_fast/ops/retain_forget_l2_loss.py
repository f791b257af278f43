"""The retain/forget L2 loss of the paper, reference semantics (REFERENCE.md §1.3), fused.

With s_i = +1 for retain rows and -1 for forget rows, and m_i / f_i the per-sample mean of squared
differences over all non-batch dims::

    retain_loss = (1/N) Σ_i (1 + s_i) m_i = (2/N) Σ_{i retain} mean((latent_i - guide_i)^2)
    forget_loss = (1/N) Σ_i (1 - s_i) f_i = (2/N) Σ_{i forget} mean((latent_i - noise_guide_i)^2)

Both divide by the whole batch N (not by the subset size), as the official trainer does.

Three entry points share one fused kernel (Triton on CUDA, the C++ extension on CPU, a PyTorch twin
everywhere). The kernel reads the student latent and, per row, the one target row that matters (guide
for retain rows, noise guide for forget rows), and writes the per-row sums and the latent gradient in
one pass; backward only scales that gradient per row. No difference tensor is materialised.

Device work per call on the Triton path (each counted by tests/ops/test_op_launch_counts.py): forward is the
main kernel plus one finalize kernel that writes the two losses (the full-size entry point passes no row
index at all: row i reads guide row i); backward is one kernel that reads both upstream gradients from
device memory. The compact/prenorm entry points add one tiny kernel for the default ``row_index``. Nothing
syncs the host, so every entry point can be captured in a CUDA graph.

- :func:`retain_forget_l2_loss`: full-size guides ``[N, ...]`` (drop-in for the reference).
- :func:`retain_forget_l2_loss_compact`: guides only for the rows that need them (pruned teacher).
- :func:`retain_forget_l2_loss_prenorm`: compact, and the teacher's final LayerNorm is applied inside
  the kernel to its pre-norm hidden state, so the teacher latent is never written to memory.

Guides are treated as constants (teacher outputs under no_grad). If a guide requires grad, or a tensor is
fp64 (the kernels take fp32 / fp16 / bf16), the plain differentiable twin runs instead, so gradients still
reach the guide. Every path reads only the target of a row's own class (as the pruned teacher of REFERENCE.md
§11 computes only those), and a row's value reaches only its own class's loss: a NaN/inf in the guide of a
forget row or the noise guide of a retain row is ignored, one in a row's own target or latent makes that class's
loss non-finite and leaves the other finite (the reference's (1 ± s)·m, as 0·NaN, would make both NaN; the total
retain_alpha·L_R + forget_alpha·L_F is non-finite either way). The fused op has no second derivative: backward
with ``create_graph=True`` raises.
``is_forget`` is a bool ``[N]`` (True = forget); see :mod:`unlearn_fast.ops.forget_mask`.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .backend import choose_backend, eager_under_compile, extension, refuse_double_backward, say_once, triton_kernels
from .forget_mask import forget_mask

_OP = "retain_forget_l2_loss"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def retain_forget_l2_loss_reference(latent: torch.Tensor, guide: torch.Tensor, noise_guide: torch.Tensor,
                                    is_forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch twin, written as the reference does (the test oracle). fp32 math (fp64 for fp64 input).
    As the reference's (1 ± s) factors, a NaN/inf in the guide of a forget row (or the noise guide of a retain
    row) makes both losses NaN; the fused op never reads those rows (see :func:`retain_forget_l2_loss`)."""
    for name, g in (("guide", guide), ("noise_guide", noise_guide)):  # broadcasting would hide a wrong shape
        if not torch.is_tensor(latent) or not torch.is_tensor(g) or g.shape != latent.shape:
            raise ValueError(f"latent, guide and noise_guide must be tensors of one shape, got {name} "
                             f"{tuple(g.shape) if torch.is_tensor(g) else type(g).__name__} for latent "
                             f"{tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__}")
    is_forget = forget_mask(is_forget, latent.shape[0], latent.device)
    acc = torch.promote_types(latent.dtype, torch.float32)
    s = torch.where(is_forget, -1.0, 1.0).to(acc)  # [N]
    dims = tuple(range(1, latent.dim()))
    m = (latent.to(acc) - guide.to(acc)).pow(2).mean(dim=dims)  # [N]
    f = (latent.to(acc) - noise_guide.to(acc)).pow(2).mean(dim=dims)  # [N]
    n = latent.shape[0]
    return ((1 + s) * m).sum() / n, ((1 - s) * f).sum() / n


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    # [N, ...] -> [N, T, D] with D the last dim (the norm's dim)
    if x.dim() == 2:
        return x.unsqueeze(1)
    t = 1
    for size in x.shape[1:-1]:
        t *= size
    return x.reshape(x.shape[0], t, x.shape[-1])  # T spelled out: a table with 0 rows cannot infer -1


def _row_index(is_forget: torch.Tensor) -> torch.Tensor:
    """Rank of each row within its own class (retain or forget), on device: no host sync."""
    f = is_forget.to(torch.int64)
    return torch.where(is_forget, torch.cumsum(f, 0) - 1, torch.cumsum(1 - f, 0) - 1)


def _torch_row_sq_and_grad(latent3, retain_table, forget_table, is_forget, row_index, norm, grad_scale,
                           compute_grad):
    """The kernel contract in plain PyTorch (fallback when no fused backend is present)."""
    n, t, d = latent3.shape

    def gather(table):  # [N, T, D] fp32: table rows at row_index (zeros where the table is empty)
        if table is None or table.shape[0] == 0:
            return latent3.new_zeros((n, t, d), dtype=torch.float32)
        return table.float().index_select(0, row_index.clamp(max=table.shape[0] - 1))

    # where() instead of boolean indexing: no host sync
    target = torch.where(is_forget.view(-1, 1, 1), gather(forget_table), gather(retain_table))
    if norm is not None:
        w, b, eps = norm
        target = torch.nn.functional.layer_norm(target, (d,), w.float(), b.float(), eps)
    diff = latent3.float() - target
    row_sq = diff.pow(2).sum(dim=(1, 2))
    grad = (diff * grad_scale).to(latent3.dtype) if compute_grad else None
    return row_sq, grad


def _fused_row_sq_and_grad(backend, latent3, retain_table, forget_table, is_forget, row_index, norm, grad_scale,
                           compute_grad):
    """(row_sq [N], grad or None) on the extension or the twin; ``row_index=None`` means row i -> table row i."""
    if row_index is None:
        row_index = torch.arange(latent3.shape[0], device=latent3.device)
    w, b, eps = norm if norm is not None else (None, None, 1e-6)
    if backend == "cext":
        empty = latent3.new_empty((0,) + tuple(latent3.shape[1:]))
        row_sq, grad = extension().retain_forget_l2_forward(
            latent3, retain_table if retain_table is not None else empty,
            forget_table if forget_table is not None else empty, is_forget, row_index.to(torch.int64),
            w, b, float(eps), float(grad_scale), bool(compute_grad))
        return row_sq, (grad if compute_grad else None)
    return _torch_row_sq_and_grad(latent3, retain_table, forget_table, is_forget, row_index, norm,
                                  grad_scale, compute_grad)


def _pick_backend(latent3: torch.Tensor, norm) -> str:
    """The machine's backend, or the twin where the Triton kernels have a limit (rows, the fused norm's D)."""
    backend = choose_backend(latent3.device, _OP)
    if backend == "triton":
        n, _, d = latent3.shape
        if n > triton_kernels().MAX_ROWS or (norm is not None and d > triton_kernels().MAX_NORM_D):
            say_once(f"{_OP}-triton-limit", f"unlearn_fast: {_OP} with N = {n}, D = {d} is beyond the Triton "
                                            "kernel's limits; using the PyTorch twin")
            return "torch"
    return backend


def _default_row_index(is_forget: torch.Tensor) -> torch.Tensor:
    """Rank within the class for compact tables: one tiny kernel on the Triton path, torch ops elsewhere."""
    if choose_backend(is_forget.device, _OP) == "triton":
        return triton_kernels().rank_within_class(is_forget)
    return _row_index(is_forget)


class RetainForgetL2Function(torch.autograd.Function):
    """(retain_loss, forget_loss) from latent ``[N, T, D]`` and per-row target tables.

    ``retain_table [R, T, D]`` / ``forget_table [F, T, D]`` hold the targets; ``row_index[i]`` is row i's
    row in the table of its class (None: row i itself, for full-size tables). ``norm = (weight [D], bias [D],
    eps)`` applies a LayerNorm to the targets first. Losses are fp32 0-d tensors; the latent gradient has the
    latent's dtype.
    """

    @staticmethod
    def forward(ctx, latent3, retain_table, forget_table, is_forget, row_index, norm_weight, norm_bias, eps):
        n, t, d = latent3.shape
        norm = (norm_weight, norm_bias, eps) if norm_weight is not None else None
        backend = _pick_backend(latent3, norm)
        # The kernel stores 2·(x - y), the derivative of (x - y)^2; the 2/(N·T·D) factor is applied in fp32 in
        # backward, because folding it in here would push fp16 gradients into the subnormal range.
        scale = 2.0 / (n * t * d)
        compute_grad = latent3.requires_grad
        if backend == "triton":  # main kernel + finalize: the losses come out of the second launch
            _, retain_loss, forget_loss, grad = triton_kernels().retain_forget_l2_loss_forward(
                latent3, retain_table, forget_table, is_forget, row_index, norm_weight=norm_weight,
                norm_bias=norm_bias, eps=eps, grad_scale=2.0, loss_scale=scale, compute_grad=compute_grad)
        else:
            row_sq, grad = _fused_row_sq_and_grad(backend, latent3, retain_table, forget_table, is_forget,
                                                  row_index, norm, 2.0, compute_grad)
            zero = row_sq.new_zeros(())
            retain_loss = torch.where(is_forget, zero, row_sq).sum() * scale
            forget_loss = torch.where(is_forget, row_sq, zero).sum() * scale
        ctx.loss_scale = scale
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # an unused loss's gradient stays None: no zeros to make
        ctx.save_for_backward(grad, is_forget)
        return retain_loss, forget_loss

    @staticmethod
    def backward(ctx, grad_retain, grad_forget):
        refuse_double_backward(_OP)
        grad, is_forget = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0] or (grad_retain is None and grad_forget is None):
            return (None,) * 8
        if ctx.backend == "triton":  # one launch; the upstream gradients stay on the device
            grad_latent = triton_kernels().retain_forget_l2_backward(grad, is_forget, grad_retain, grad_forget,
                                                                     ctx.loss_scale)
            return (grad_latent,) + (None,) * 7
        grad_retain = grad_retain if grad_retain is not None else torch.zeros_like(grad_forget)
        grad_forget = grad_forget if grad_forget is not None else torch.zeros_like(grad_retain)
        per_row = torch.where(is_forget, grad_forget, grad_retain).float() * ctx.loss_scale  # [N] fp32
        return (grad * per_row.view(-1, 1, 1)).to(grad.dtype), None, None, None, None, None, None, None


def _check(latent: torch.Tensor, is_forget: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(latent) or latent.dim() < 2:
        raise ValueError(f"latent must be a tensor [N, ...] with at least 2 dims, got "
                         f"{tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__}")
    if not latent.is_floating_point():
        raise TypeError(f"latent must be floating point, got {latent.dtype}")
    if latent.numel() == 0:
        raise ValueError(f"latent has no elements: {tuple(latent.shape)} (the loss divides by N and by the row size)")
    if latent.device.type == "meta":
        raise ValueError("latent is on the meta device (it has no values)")
    return forget_mask(is_forget, latent.shape[0], latent.device)


def _check_table(name, table, latent):
    """``table`` validated against the latent's rows (None stays None); not yet detached or reshaped."""
    if table is None:
        return None
    if not torch.is_tensor(table):
        raise TypeError(f"{name} must be a tensor or None, got {type(table).__name__}")
    if table.dim() != latent.dim() or table.shape[1:] != latent.shape[1:]:
        raise ValueError(f"{name} rows have shape {tuple(table.shape[1:])}, latent rows {tuple(latent.shape[1:])}")
    if not table.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {table.dtype}")
    if table.device != latent.device:
        raise ValueError(f"{name} is on {table.device}, latent on {latent.device}")
    return table


def _kernel_tables(retain_table, forget_table):
    """Detached contiguous ``[R, T, D]`` tables of one dtype (the Triton kernel reads both with one type)."""
    if retain_table is not None and forget_table is not None and retain_table.dtype != forget_table.dtype:
        common = torch.promote_types(retain_table.dtype, forget_table.dtype)  # rare: a copy of each table
        retain_table, forget_table = retain_table.to(common), forget_table.to(common)
    return tuple(None if t is None else _as_3d(t.detach()).contiguous() for t in (retain_table, forget_table))


def _use_twin(latent: torch.Tensor, *tables) -> bool:
    """The differentiable twin runs for dtypes the kernels do not take (fp64) and for guides that require
    grad (so that gradients reach them)."""
    return latent.dtype not in _KERNEL_DTYPES or any(
        t is not None and (t.dtype not in _KERNEL_DTYPES or t.requires_grad) for t in tables)


def _twin_loss(latent, retain_table, forget_table, is_forget, row_index, norm):
    """Compact tables in plain PyTorch, differentiable in latent and tables: gather each row's target, then
    the reference twin. Norm parameters are constants. Indices are clamped into the table as the kernels do."""
    acc = torch.promote_types(latent.dtype, torch.float32)

    def gather(table):  # [N, ...] in acc: the table's rows at row_index, zeros where the table is empty
        if table is None or table.shape[0] == 0:
            return latent.new_zeros(latent.shape, dtype=acc)
        return table.to(acc).index_select(0, row_index.long().clamp(0, table.shape[0] - 1))

    target = torch.where(is_forget.view(-1, *([1] * (latent.dim() - 1))), gather(forget_table), gather(retain_table))
    if norm is not None:
        w, b, eps = norm
        target = torch.nn.functional.layer_norm(target, (latent.shape[-1],), w.detach().to(acc),
                                                b.detach().to(acc), eps)
    return _own_class_twin(latent, target, is_forget)


def _own_class_twin(latent: torch.Tensor, target: torch.Tensor, is_forget: torch.Tensor):
    """The twin's math with each row's target chosen, differentiable in both: row i's mean squared difference
    goes only into its own class's loss, as on the fused path (the reference's (1 ± s)·m would carry a NaN/inf
    row into the other loss as 0·NaN). Same bits as the reference twin for finite values: 2·m_i summed, / N."""
    acc = torch.promote_types(latent.dtype, torch.float32)
    m = (latent.to(acc) - target.to(acc)).pow(2).mean(dim=tuple(range(1, latent.dim())))  # [N]
    two_m, zero = 2 * m, m.new_zeros(())
    n = latent.shape[0]
    return torch.where(is_forget, zero, two_m).sum() / n, torch.where(is_forget, two_m, zero).sum() / n


def _check_row_index(row_index, latent: torch.Tensor) -> torch.Tensor:
    n = latent.shape[0]
    if not torch.is_tensor(row_index) or row_index.dim() != 1 or row_index.shape[0] != n:
        got = tuple(row_index.shape) if torch.is_tensor(row_index) else type(row_index).__name__
        raise ValueError(f"row_index must be a tensor [N] with N = {n}, got {got}")
    if row_index.is_floating_point() or row_index.is_complex() or row_index.dtype == torch.bool:
        raise TypeError(f"row_index must be an integer tensor, got {row_index.dtype}")
    return row_index.to(latent.device)


def _check_table_rows(is_forget: torch.Tensor, row_index: torch.Tensor, retain_table, forget_table, names) -> None:
    """Each class's table must hold a row for every row of that class. Checked only when the labels live
    on the host (a check on device tensors would cost a sync per step)."""
    if is_forget.device.type != "cpu" or row_index.device.type != "cpu":
        return
    if bool((row_index < 0).any()):
        raise ValueError(f"row_index has negative entries: {row_index.tolist()[:16]}")
    for name, table, rows in ((names[0], retain_table, ~is_forget), (names[1], forget_table, is_forget)):
        needed = int(row_index[rows].max()) + 1 if bool(rows.any()) else 0
        have = 0 if table is None else table.shape[0]
        if needed > have:
            raise ValueError(f"{name} has {have} rows but the batch needs {needed} "
                             f"({int(rows.sum())} rows of that class)")


@eager_under_compile
def retain_forget_l2_loss(latent: torch.Tensor, guide: torch.Tensor, noise_guide: torch.Tensor,
                          is_forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference-semantics (retain_loss, forget_loss). ``latent, guide, noise_guide: [N, ...]``, ``is_forget: [N]``
    bool (True = forget). Losses are fp32 0-d tensors (fp64 for fp64 input)."""
    is_forget = _check(latent, is_forget)
    for name, g in (("guide", guide), ("noise_guide", noise_guide)):
        if not torch.is_tensor(g) or g.shape != latent.shape:
            raise ValueError(f"{name} must have the latent's shape {tuple(latent.shape)}, got "
                             f"{tuple(g.shape) if torch.is_tensor(g) else type(g).__name__}")
        _check_table(name, g, latent)
    if _use_twin(latent, guide, noise_guide):
        # each row's own target only, as the kernels read it: a NaN/inf in a row's unused guide must not reach
        # the losses here either (the reference's 0·NaN would make them NaN on this path alone)
        target = torch.where(is_forget.view(-1, *([1] * (latent.dim() - 1))), noise_guide, guide)
        return _own_class_twin(latent, target, is_forget)
    # row_index None: row i reads guide row i (no arange made or read on the Triton path)
    return RetainForgetL2Function.apply(_as_3d(latent).contiguous(), *_kernel_tables(guide, noise_guide), is_forget,
                                        None, None, None, 1e-6)


@eager_under_compile
def retain_forget_l2_loss_compact(latent: torch.Tensor, guide_rows: Optional[torch.Tensor],
                                  noise_guide_rows: Optional[torch.Tensor], is_forget: torch.Tensor,
                                  row_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`retain_forget_l2_loss`, with guides only for the rows that use them.

    ``guide_rows [R, ...]``: the guides of the retain rows in batch order (None if there are none);
    ``noise_guide_rows [F, ...]``: those of the forget rows. ``row_index`` (optional, integer [N]) overrides the
    row -> table-row map (default: rank within the class). Indices are checked when the labels are on the
    host; on a GPU they are clamped into the table (no sync).
    """
    is_forget = _check(latent, is_forget)
    return _compact_loss(latent, guide_rows, noise_guide_rows, is_forget, row_index, ("guide_rows", "noise_guide_rows"),
                         None)


@eager_under_compile
def retain_forget_l2_loss_prenorm(latent: torch.Tensor, guide_hidden_rows: Optional[torch.Tensor],
                                  noise_hidden_rows: Optional[torch.Tensor], is_forget: torch.Tensor,
                                  norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                                  row_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compact, with the teacher's final LayerNorm (weight/bias ``[D]``, eps) applied to its pre-norm
    hidden states inside the kernel: the guides are ``LayerNorm(hidden_rows)``. The norm's parameters are
    constants (the frozen teacher's): no gradient reaches them."""
    is_forget = _check(latent, is_forget)
    d = latent.shape[-1]
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if not torch.is_tensor(p) or p.shape != (d,):
            raise ValueError(f"norm weight/bias must be tensors of shape ({d},), got {name} "
                             f"{tuple(p.shape) if torch.is_tensor(p) else type(p).__name__}")
        if p.device != latent.device:
            raise ValueError(f"{name} is on {p.device}, latent on {latent.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (the LayerNorm's), got {eps!r}")
    norm = (norm_weight.detach(), norm_bias.detach(), float(eps))
    return _compact_loss(latent, guide_hidden_rows, noise_hidden_rows, is_forget, row_index,
                         ("guide_hidden_rows", "noise_hidden_rows"), norm)


def _compact_loss(latent, retain_table, forget_table, is_forget, row_index, names, norm):
    """The compact and prenorm ops after their own checks: tables and row map checked, then the kernel (or
    the twin, see :func:`_use_twin`). ``norm``: None or the constant (weight, bias, eps) of the fused LayerNorm."""
    retain_table = _check_table(names[0], retain_table, latent)
    forget_table = _check_table(names[1], forget_table, latent)
    idx = _default_row_index(is_forget) if row_index is None else _check_row_index(row_index, latent)
    _check_table_rows(is_forget, idx, retain_table, forget_table, names)
    if _use_twin(latent, retain_table, forget_table):
        return _twin_loss(latent, retain_table, forget_table, is_forget, idx, norm)
    weight = bias = None
    eps = 1e-6
    if norm is not None:
        weight, bias, eps = norm
        weight, bias = (p if p.dtype in _KERNEL_DTYPES else p.float() for p in (weight, bias))
    return RetainForgetL2Function.apply(_as_3d(latent).contiguous(), *_kernel_tables(retain_table, forget_table),
                                        is_forget, idx, weight, bias, eps)


