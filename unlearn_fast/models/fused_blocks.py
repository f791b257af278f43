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
    branch = None  # the last block's MLP output, not yet added to x
    for blk in blocks:
        if not fusable_block(blk, x.shape[-1]):
            x = blk(x if branch is None else x + branch)
            branch = None
            continue
        x, h = add_layer_norm(x, branch, *_norm_args(blk.norm1), out_dtype=out_dtype)
        x, h = add_layer_norm(x, blk.attn(h), *_norm_args(blk.norm2), out_dtype=out_dtype)
        branch = blk.mlp(h)
    return x if branch is None else x + branch


__all__ = ["fused_block_norms", "run_blocks", "fusable_block"]
