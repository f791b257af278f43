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

Guides are treated as constants (teacher outputs under no_grad). If a guide requires grad, the plain
twin runs instead so that gradients still reach it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backend import choose_backend, extension, triton_kernels


def retain_forget_l2_loss_reference(latent: torch.Tensor, guide: torch.Tensor, noise_guide: torch.Tensor,
                                    is_forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch twin, written as the reference does (the test oracle)."""
    s = torch.where(is_forget.to(latent.device), -1.0, 1.0)  # [N]
    dims = tuple(range(1, latent.dim()))
    m = (latent.float() - guide.float()).pow(2).mean(dim=dims)  # [N]
    f = (latent.float() - noise_guide.float()).pow(2).mean(dim=dims)  # [N]
    n = latent.shape[0]
    return ((1 + s) * m).sum() / n, ((1 - s) * f).sum() / n


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    # [N, ...] -> [N, T, D] with D the last dim (the norm's dim)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


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


def _default_row_index(is_forget: torch.Tensor) -> torch.Tensor:
    """Rank within the class for compact tables: one tiny kernel on the Triton path, torch ops elsewhere."""
    if choose_backend(is_forget.device, "retain_forget_l2_loss") == "triton":
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
        backend = choose_backend(latent3.device, "retain_forget_l2_loss")
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
    if not torch.is_tensor(is_forget) or is_forget.dim() != 1 or is_forget.shape[0] != latent.shape[0]:
        raise ValueError(f"is_forget must be a tensor [N] with N = {latent.shape[0]}, got "
                         f"{tuple(is_forget.shape) if torch.is_tensor(is_forget) else type(is_forget).__name__}")
    return is_forget.to(device=latent.device, dtype=torch.bool)


def _check_table(name, table, latent, rows_expected=None):
    if table is None:
        return None
    if table.shape[1:] != latent.shape[1:]:
        raise ValueError(f"{name} rows have shape {tuple(table.shape[1:])}, latent rows {tuple(latent.shape[1:])}")
    if table.device != latent.device:
        raise ValueError(f"{name} is on {table.device}, latent on {latent.device}")
    return _as_3d(table.detach()).contiguous()


def _check_table_rows(is_forget: torch.Tensor, row_index: torch.Tensor, retain_table, forget_table,
                      names=("guide_rows", "noise_guide_rows")) -> None:
    """Each class's table must hold a row for every row of that class. Checked only when the labels live
    on the host (a check on device tensors would cost a sync per step)."""
    if is_forget.device.type != "cpu" or row_index.device.type != "cpu":
        return
    for name, table, rows in ((names[0], retain_table, ~is_forget), (names[1], forget_table, is_forget)):
        needed = int(row_index[rows].max()) + 1 if bool(rows.any()) else 0
        have = 0 if table is None else table.shape[0]
        if needed > have:
            raise ValueError(f"{name} has {have} rows but the batch needs {needed} "
                             f"({int(rows.sum())} rows of that class)")


def retain_forget_l2_loss(latent: torch.Tensor, guide: torch.Tensor, noise_guide: torch.Tensor,
                          is_forget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference-semantics (retain_loss, forget_loss). ``latent, guide, noise_guide: [N, ...]``, ``is_forget: [N]``."""
    is_forget = _check(latent, is_forget)
    for name, g in (("guide", guide), ("noise_guide", noise_guide)):
        if not torch.is_tensor(g) or g.shape != latent.shape:
            raise ValueError(f"{name} must have the latent's shape {tuple(latent.shape)}, got "
                             f"{tuple(g.shape) if torch.is_tensor(g) else type(g).__name__}")
    if guide.requires_grad or noise_guide.requires_grad:
        return retain_forget_l2_loss_reference(latent, guide, noise_guide, is_forget)
    # row_index None: row i reads guide row i (no arange made or read on the Triton path)
    return RetainForgetL2Function.apply(_as_3d(latent).contiguous(), _check_table("guide", guide, latent),
                                        _check_table("noise_guide", noise_guide, latent), is_forget, None,
                                        None, None, 1e-6)


def retain_forget_l2_loss_compact(latent: torch.Tensor, guide_rows: Optional[torch.Tensor],
                                  noise_guide_rows: Optional[torch.Tensor], is_forget: torch.Tensor,
                                  row_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`retain_forget_l2_loss`, with guides only for the rows that use them.

    ``guide_rows [R, ...]``: the guides of the retain rows in batch order (None if there are none);
    ``noise_guide_rows [F, ...]``: those of the forget rows. ``row_index`` (optional, [N]) overrides the
    row -> table-row map (default: rank within the class).
    """
    is_forget = _check(latent, is_forget)
    idx = _default_row_index(is_forget) if row_index is None else row_index.to(latent.device)
    _check_table_rows(is_forget, idx, guide_rows, noise_guide_rows)
    return RetainForgetL2Function.apply(_as_3d(latent).contiguous(), _check_table("guide_rows", guide_rows, latent),
                                        _check_table("noise_guide_rows", noise_guide_rows, latent), is_forget, idx,
                                        None, None, 1e-6)


def retain_forget_l2_loss_prenorm(latent: torch.Tensor, guide_hidden_rows: Optional[torch.Tensor],
                                  noise_hidden_rows: Optional[torch.Tensor], is_forget: torch.Tensor,
                                  norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                                  row_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compact, with the teacher's final LayerNorm (weight/bias ``[D]``, eps) applied to its pre-norm
    hidden states inside the kernel: the guides are ``LayerNorm(hidden_rows)``."""
    is_forget = _check(latent, is_forget)
    d = latent.shape[-1]
    if norm_weight.shape != (d,) or norm_bias.shape != (d,):
        raise ValueError(f"norm weight/bias must have shape ({d},), got {tuple(norm_weight.shape)}, "
                         f"{tuple(norm_bias.shape)}")
    idx = _default_row_index(is_forget) if row_index is None else row_index.to(latent.device)
    _check_table_rows(is_forget, idx, guide_hidden_rows, noise_hidden_rows, ("guide_hidden_rows", "noise_hidden_rows"))
    return RetainForgetL2Function.apply(_as_3d(latent).contiguous(),
                                        _check_table("guide_hidden_rows", guide_hidden_rows, latent),
                                        _check_table("noise_hidden_rows", noise_hidden_rows, latent), is_forget, idx,
                                        norm_weight.detach(), norm_bias.detach(), float(eps))
