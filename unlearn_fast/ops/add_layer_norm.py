"""Residual add + LayerNorm in one op (a ViT block's ``x = x + branch`` then ``norm(x)``), forward and backward.

Semantics, for ``x: [..., D]`` and ``branch`` of x's shape or None::

    s = x if branch is None else x + branch        # torch's promotion: s.dtype = promote(x.dtype, branch.dtype)
    h = F.layer_norm(s.float(), (D,), weight.float(), bias.float(), eps)    # fp32 statistics, biased variance
    return s, h.to(out_dtype or s.dtype)

With ``branch_bias: [D]`` (the bias of the Linear that made the branch, left out of that GEMM):
``s = (x.float() + branch.float() + branch_bias.float()).to(promote(x, branch, branch_bias))`` (for the fp32
residual stream, torch's ``x + branch + branch_bias``); its gradient is the rows' sum of s's whole gradient,
summed in the backward kernel with the norm's own parameter gradients.

This is what torch computes for ``s = x + branch; h = norm(s)`` under autocast (layer_norm runs in fp32)
followed by the next Linear's cast of h to the autocast dtype (pass ``out_dtype`` = that dtype). Why fused:
the add, the fp32 norm and the cast are one kernel forward and one (plus a tiny reduction of the parameter
gradients) backward instead of several per block, each reading and writing the residual stream.

Dtypes: x, branch, weight, bias fp32 / fp16 / bf16, each independently; out_dtype one of those or None.
``weight, bias: [D]`` or None (identity). With ``branch=None``, s is x itself (no copy).

Gradients (w.r.t. x, branch, weight, bias, branch_bias, each only when it requires grad), from g_h (h's) and g_s (s's,
zero when s is not used further), with ``xhat = (s - mean) * rstd`` and ``dxhat = g_h * weight`` in fp32::

    g = g_s + rstd * (dxhat - mean_D(dxhat) - xhat * mean_D(dxhat * xhat))    -> grad_x, grad_branch
    grad_weight = sum_rows(g_h * xhat), grad_bias = sum_rows(g_h)              fp32, then the parameter's dtype

The fused op saves s, and per-row mean and rstd (fp32): backward does not recompute x + branch. It has no
second derivative (backward with ``create_graph=True`` raises; use the twin).

Dispatch: the Triton kernels (unlearn_fast/kernels/add_layer_norm.py) for CUDA tensors, or any device with
``UNLEARN_FAST_BACKEND=triton`` (e.g. the CPU under TRITON_INTERPRET=1); the plain PyTorch twin otherwise (the
CPU, ``UNLEARN_FAST_BACKEND=torch``, ``cext``: the extension has no such kernel), and for D beyond the kernel's
8192. Gradients through the twin come from torch's autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .backend import choose_triton_or_twin, refuse_double_backward, say_once
from .norm_args import NORM_DTYPES, check_affine, check_eps, resolve_out_dtype

_OP = "add_layer_norm"
_MAX_KERNEL_D = 8192  # the kernel's row-in-registers limit (kernels.add_layer_norm.MAX_LAYER_NORM_D)


def _check_inputs(x, branch, weight, bias, eps, out_dtype, branch_bias=None) -> torch.dtype:
    """Raise a clear TypeError/ValueError for bad arguments; return the output dtype."""
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in NORM_DTYPES:
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., D] with D >= 1, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if branch is not None:
        if not torch.is_tensor(branch):
            raise TypeError(f"branch must be a tensor or None, got {type(branch).__name__}")
        if branch.shape != x.shape:
            raise ValueError(f"branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
        if branch.dtype not in NORM_DTYPES:
            raise TypeError(f"branch must be fp32, fp16 or bf16, got {branch.dtype}")
        if branch.device != x.device:
            raise ValueError(f"branch is on {branch.device}, x on {x.device}")
    check_affine(weight, bias, d, x)
    check_eps(eps)
    s_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    if branch_bias is not None:
        if branch is None:
            raise ValueError("branch_bias needs a branch (it is the bias of the layer that made the branch)")
        if not torch.is_tensor(branch_bias):
            raise TypeError(f"branch_bias must be a tensor or None, got {type(branch_bias).__name__}")
        if tuple(branch_bias.shape) != (d,):
            raise ValueError(f"branch_bias must be [D] = ({d},), got shape {tuple(branch_bias.shape)}")
        if branch_bias.dtype not in NORM_DTYPES:
            raise TypeError(f"branch_bias must be fp32, fp16 or bf16, got {branch_bias.dtype}")
        if branch_bias.device != x.device:
            raise ValueError(f"branch_bias is on {branch_bias.device}, x on {x.device}")
        s_dtype = torch.promote_types(s_dtype, branch_bias.dtype)
    return resolve_out_dtype(out_dtype, s_dtype)


def _twin(x, branch, weight, bias, eps, out_dtype, branch_bias=None):
    if branch_bias is None:
        s = x if branch is None else x + branch  # [..., D], torch's promotion
    else:  # one fp32 sum, one rounding, as the kernel
        s_dtype = torch.promote_types(torch.promote_types(x.dtype, branch.dtype), branch_bias.dtype)
        s = (x.float() + branch.float() + branch_bias.float()).to(s_dtype)
    h = F.layer_norm(s.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), float(eps))  # [..., D] fp32
    return s, h.to(out_dtype)


def add_layer_norm_reference(x: torch.Tensor, branch: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], eps: float = 1e-6,
                             out_dtype: Optional[torch.dtype] = None,
                             branch_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch twin (differentiable; the test oracle and the fallback): see the module docstring."""
    out_dtype = _check_inputs(x, branch, weight, bias, eps, out_dtype, branch_bias)
    return _twin(x, branch, weight, bias, eps, out_dtype, branch_bias)


def _pick_backend(device: torch.device, d: int) -> str:
    backend = choose_triton_or_twin(device, _OP)
    if backend == "triton" and d > _MAX_KERNEL_D:
        say_once(f"{_OP}-triton-limit", f"unlearn_fast: {_OP} with D = {d} is beyond the Triton kernel's limit "
                                        f"of {_MAX_KERNEL_D}; using the PyTorch twin")
        return "torch"
    return backend


class AddLayerNormFunction(torch.autograd.Function):
    """``(s, h)`` (with a branch) or ``h`` (without: s is x, outside this Function) of the fused kernel.

    ``x, branch: [..., D]`` contiguous, ``weight, bias, branch_bias: [D]`` contiguous or None; h in
    ``out_dtype``. Saves s, weight, and per-row mean / rstd ``[rows]`` fp32 for backward.
    """

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, out_dtype, branch_bias=None):
        from ..kernels.add_layer_norm import add_layer_norm_forward  # importable: choose_backend checked Triton
        s, h, mean, rstd = add_layer_norm_forward(x, branch, weight, bias, eps, out_dtype, branch_bias)
        ctx.has_branch = branch is not None
        ctx.dtypes = (x.dtype, None if branch is None else branch.dtype, None if bias is None else bias.dtype,
                      None if branch_bias is None else branch_bias.dtype)
        ctx.set_materialize_grads(False)  # an unused s's gradient stays None: no zeros to read
        ctx.save_for_backward(s, weight, mean, rstd)
        return (s, h) if ctx.has_branch else h

    @staticmethod
    def backward(ctx, *grads):
        refuse_double_backward(_OP)
        grad_s, grad_h = grads if ctx.has_branch else (None, grads[0])
        s, weight, mean, rstd = ctx.saved_tensors
        need_x, need_branch, need_weight, need_bias = ctx.needs_input_grad[:4]
        need_bb = ctx.needs_input_grad[6]
        x_dtype, branch_dtype, bias_dtype, bb_dtype = ctx.dtypes
        if grad_h is None:  # h unused: s's gradient passes through the add, the norm's parameters get none
            if grad_s is None:
                return (None,) * 7
            grad_bb = grad_s.float().reshape(-1, s.shape[-1]).sum(0).to(bb_dtype) if need_bb else None
            return (grad_s.to(x_dtype) if need_x else None, grad_s.to(branch_dtype) if need_branch else None,
                    None, None, None, None, grad_bb)
        from ..kernels.add_layer_norm import add_layer_norm_backward
        grad_x, grad_branch, grad_weight, grad_bias, grad_bb = add_layer_norm_backward(
            grad_h.contiguous(), None if grad_s is None else grad_s.contiguous(), s, weight, mean, rstd,
            x_dtype if need_x else None, branch_dtype if need_branch else None, bool(need_weight),
            bool(need_bias), bias_dtype, branch_bias_dtype=bb_dtype if need_bb else None)
        return grad_x, grad_branch, grad_weight, grad_bias, None, None, grad_bb


def add_layer_norm(x: torch.Tensor, branch: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None,
                   branch_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, h)``: ``s = x + branch`` (x itself when branch is None; ``+ branch_bias`` when given) and
    ``h = LayerNorm(s)`` in ``out_dtype``.

    ``x, branch: [..., D]``, ``weight, bias, branch_bias: [D]`` or None; s has torch's promoted dtype of x, branch
    (and branch_bias), h ``out_dtype`` (default s's). Fused on CUDA (one kernel forward; one plus a tiny
    reduction backward), differentiable in x, branch, weight, bias and branch_bias; the twin elsewhere (see the
    module docstring)."""
    out_dtype = _check_inputs(x, branch, weight, bias, eps, out_dtype, branch_bias)
    if x.numel() == 0 or _pick_backend(x.device, x.shape[-1]) != "triton":
        return _twin(x, branch, weight, bias, eps, out_dtype, branch_bias)
    x_in = x.contiguous()  # a no-op for the residual stream; strided views are copied (differentiably)
    branch, weight, bias, branch_bias = (None if t is None else t.contiguous()
                                         for t in (branch, weight, bias, branch_bias))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x_in, branch, weight, bias, branch_bias))
    if not needs_grad:  # teacher / eval: the launcher alone, nothing saved
        from ..kernels.add_layer_norm import add_layer_norm_forward
        s, h, _, _ = add_layer_norm_forward(x_in, branch, weight, bias, float(eps), out_dtype, branch_bias)
        return (x if branch is None else s), h
    out = AddLayerNormFunction.apply(x_in, branch, weight, bias, float(eps), out_dtype, branch_bias)
    return out if branch is not None else (x, out)


__all__ = ["add_layer_norm", "add_layer_norm_reference", "AddLayerNormFunction"]
