"""A stack of pre-norm ViT blocks, and the fast step's form of it with each residual add fused into the next norm.

A block computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. Under autocast the residual stream x stays
fp32, each LayerNorm runs in fp32 and writes fp32, and the next Linear casts that to the autocast dtype: an add,
a norm and a cast per pair, and as many kernels again backward. Inside :func:`fused_block_norms` the stack runs
as ``(x, h) = add_layer_norm(x, branch, norm)`` pairs (:mod:`unlearn_fast.ops.add_layer_norm`):
one kernel adds the previous branch to the residual stream, normalises the sum in fp32 and writes it already in
the autocast dtype, and one kernel (plus a small reduction for the norm's parameters) does its backward. The
values are the ones the unfused blocks compute, up to the order of the fp32 statistics' sums (on the CPU the op
is its PyTorch twin: the blocks' own arithmetic, bit for bit). The fast step turns it on for CUDA
(``--unfused_block_norms`` keeps the blocks' own forward, as the reference-semantics step always does).

Inside :func:`deferred_branch_bias` as well (an A/B form, off by default until timed on a GPU), the attention's
``proj`` and the MLP's ``fc2`` run their GEMMs without their biases and each bias is added in the next fused
add + LayerNorm, which also sums its gradient over the rows in the pass it already makes for the norm's
parameters: per block two bias casts (autocast's, forward) and two bias-gradient reductions and casts
(backward) fewer. The branch is then rounded to the autocast dtype before its bias is added, not after: a
difference of half-precision rounding, not only of summation order.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..ops import add_layer_norm
from .kernel_switch import KernelSwitch

#: inside ``with fused_block_norms():`` :func:`run_blocks` fuses each residual add with the next LayerNorm (the
#: fast step turns it on for CUDA; the reference step keeps the blocks' own forward)
fused_block_norms = KernelSwitch("unlearn_fast_vit_fused_block_norms")
#: inside ``with deferred_branch_bias():`` (and fused_block_norms) the fused form adds proj's and fc2's biases in
#: the add + LayerNorm kernel instead of in their GEMMs (A/B, off by default)
deferred_branch_bias = KernelSwitch("unlearn_fast_vit_deferred_branch_bias")


_FUSABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the op's dtypes (ops.add_layer_norm)
_EXTRAS = ("ls1", "ls2", "drop_path", "drop_path1", "drop_path2")  # timm's layer scale / drop path: must be identity


def _plain_layer_norm(norm, d: int) -> bool:
    """A torch LayerNorm over the last dim alone (a subclass may override forward: it runs as it is)."""
    return (type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (d,)
            and all(t is None or t.dtype in _FUSABLE_DTYPES for t in (norm.weight, norm.bias)))


def fusable_block(blk: nn.Module, d: int) -> bool:
    """Whether ``blk`` is a pre-norm block the fused form computes exactly (``norm1, attn, norm2, mlp``, plain
    LayerNorms over width ``d``, no layer scale or drop path); any other block runs its own forward."""
    return (hasattr(blk, "attn") and hasattr(blk, "mlp") and _plain_layer_norm(getattr(blk, "norm1", None), d)
            and _plain_layer_norm(getattr(blk, "norm2", None), d)
            and all(isinstance(getattr(blk, e, None), (nn.Identity, type(None))) for e in _EXTRAS))


def _plain_out_linear(linear, d: int) -> bool:
    """A branch's last Linear whose bias the fused form may add itself: a plain nn.Linear to width ``d`` with a
    bias and no hooks of its own (its GEMM then runs without the module's forward)."""
    return (type(linear) is nn.Linear and linear.bias is not None and linear.out_features == d
            and not (linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks
                     or linear._backward_pre_hooks))


def defers_branch_biases(blk: nn.Module, d: int) -> bool:
    """Whether ``blk``'s attention and MLP can leave their last biases to the fused add + LayerNorm (modules
    that offer ``forward(x, out_bias=False)``, over plain Linears)."""
    attn, mlp = blk.attn, blk.mlp
    return (getattr(type(attn), "defers_out_bias", False) and getattr(type(mlp), "defers_out_bias", False)
            and _plain_out_linear(getattr(attn, "proj", None), d) and _plain_out_linear(getattr(mlp, "fc2", None), d)
            and not (attn._forward_hooks or attn._forward_pre_hooks or mlp._forward_hooks
                     or mlp._forward_pre_hooks))


def _branch(module: nn.Module, last: str, h: torch.Tensor, defer: bool):
    """(branch, its deferred bias or None): ``module(h)``, or its output before ``last``'s bias and that bias."""
    if not defer:
        return module(h), None
    return module(h, out_bias=False), getattr(module, last).bias


def _add(x: torch.Tensor, branch: torch.Tensor, bias) -> torch.Tensor:
    """The residual add outside the fused op, a deferred bias included (fp32 stream: as add_layer_norm adds)."""
    return x + branch if bias is None else x + branch + bias


def _norm_args(norm: nn.LayerNorm):
    return norm.weight, norm.bias, norm.eps


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x [N, T, D]`` through pre-norm blocks (each with ``norm1, attn, norm2, mlp``): ``blk(x)`` in turn, or
    the fused form described in the module docstring. In the fused form a block that is not
    :func:`fusable_block`, and a residual stream of another dtype (fp64), run the blocks' own forward."""
    if not fused_block_norms.on() or x.dtype not in _FUSABLE_DTYPES:
        for blk in blocks:
            x = blk(x)
        return x
    # the dtype the next Linear would cast the norm's fp32 output to
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    defer_on = deferred_branch_bias.on()
    branch, bias = None, None  # the last block's MLP output (and its deferred bias), not yet added to x
    for blk in blocks:
        if not fusable_block(blk, x.shape[-1]):
            x = blk(x if branch is None else _add(x, branch, bias))
            branch, bias = None, None
            continue
        defer = defer_on and defers_branch_biases(blk, x.shape[-1])
        x, h = add_layer_norm(x, branch, *_norm_args(blk.norm1), out_dtype=out_dtype, branch_bias=bias)
        attn_out, attn_bias = _branch(blk.attn, "proj", h, defer)
        x, h = add_layer_norm(x, attn_out, *_norm_args(blk.norm2), out_dtype=out_dtype, branch_bias=attn_bias)
        branch, bias = _branch(blk.mlp, "fc2", h, defer)
    return x if branch is None else _add(x, branch, bias)


__all__ = ["fused_block_norms", "deferred_branch_bias", "run_blocks", "fusable_block", "defers_branch_biases"]
