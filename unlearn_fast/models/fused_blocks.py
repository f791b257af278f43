"""A stack of pre-norm ViT blocks, and the fast step's form of it with each residual add fused into the next norm.

A block computes ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. Under autocast the residual stream x stays
fp32, each LayerNorm runs in fp32 and writes fp32, and the next Linear casts that to the autocast dtype: an add,
a norm and a cast per pair, and as many kernels again backward. Inside :func:`fused_block_norms` the stack runs
as ``(x, h) = add_layer_norm(x, branch, norm)`` pairs (:mod:`unlearn_fast.ops.add_layer_norm`):
one kernel adds the previous branch to the residual stream, normalises the sum in fp32 and writes it already in
the autocast dtype, and one kernel (plus a small reduction for the norm's parameters) does its backward. The
values are the ones the unfused blocks compute, up to the order of the fp32 statistics' sums (on the CPU the op
is its PyTorch twin: the same arithmetic as the blocks). The fast step turns it on for CUDA where asked
(``--fused_block_norms``); the reference-semantics step keeps the blocks' own forward.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..ops import add_layer_norm
from .kernel_switch import KernelSwitch

#: inside ``with fused_block_norms():`` :func:`run_blocks` fuses each residual add with the next LayerNorm (the
#: fast step turns it on for CUDA where asked; the reference step keeps the blocks' own forward)
fused_block_norms = KernelSwitch("unlearn_fast_vit_fused_block_norms")


def _norm_args(norm: nn.LayerNorm):
    return norm.weight, norm.bias, norm.eps


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x [N, T, D]`` through pre-norm blocks (each with ``norm1, attn, norm2, mlp``): ``blk(x)`` in turn, or
    the fused form described in the module docstring."""
    if not fused_block_norms.on():
        for blk in blocks:
            x = blk(x)
        return x
    # the dtype the next Linear would cast the norm's fp32 output to
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    branch = None
    for blk in blocks:
        x, h = add_layer_norm(x, branch, *_norm_args(blk.norm1), out_dtype=out_dtype)
        x, h = add_layer_norm(x, blk.attn(h), *_norm_args(blk.norm2), out_dtype=out_dtype)
        branch = blk.mlp(h)
    return x if branch is None else x + branch


__all__ = ["fused_block_norms", "run_blocks"]
