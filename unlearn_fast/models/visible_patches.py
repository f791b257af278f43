"""MAE's patch embedding of the visible patches alone, and the switch the fast step turns it on with.

The official encoder embeds all L patches with the strided conv ``patch_embed.proj``, adds the position
embedding and then keeps the K visible ones (K = L/4 at mask ratio 0.75). Inside :func:`visible_patch_embed`
the visible patches are gathered from the image first and embedded as one matrix product with the conv's
weight viewed as ``[D, C·p·p]``: a conv whose stride equals its kernel is that product, so each kept row gets
the same products and sums, in another summation order. The weight's gradient sums over the visible patches
alone, where the official one also adds the exact zeros of the hidden ones. A quarter of the work at the
default mask ratio, no ``[N, D, g, g]`` conv output, and a GEMM instead of a conv with 3 input channels (which
cuDNN runs with a slow generic kernel in half precision). The reference-semantics step keeps the conv, and so
does the fast step where the GEMM would round differently (fp32 on a GPU, see :func:`gemm_matches_conv`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .kernel_switch import KernelSwitch
from .vit_blocks import PatchEmbed

#: inside ``with visible_patch_embed():`` MAE embeds only the visible patches (the fast step turns it on)
visible_patch_embed = KernelSwitch("unlearn_fast_mae_visible_patch_embed")


def gemm_matches_conv(images: torch.Tensor) -> bool:
    """Whether the GEMM rounds as the official conv does here: on the CPU and under half-precision autocast both
    round their inputs alike and sum in fp32; in fp32 on a GPU only when cuDNN's TF32 setting (on by default, so
    the reference's fp32 teacher embeds patches in TF32) equals cuBLAS's (off by default). Where it does not, the
    fast step keeps the conv, so equal numerics stay equal."""
    if not images.is_cuda:
        return True
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in (torch.float16, torch.bfloat16):
        return True
    return torch.backends.cudnn.allow_tf32 == torch.backends.cuda.matmul.allow_tf32


def gather_patches(patch_embed: PatchEmbed, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """``images [N, C, H, W]`` -> the pixels of patches ``ids_keep [N, K]`` (row-major patch index, as the conv's
    output is flattened), ``[N, K, C, p, p]``."""
    patch_embed.check_size(images)
    n, c = images.shape[:2]
    if c != patch_embed.proj.in_channels:  # else a broadcast error deep in the normalisation or the product
        raise ValueError(f"expected images with {patch_embed.proj.in_channels} channels [N, C, H, W], got shape "
                         f"{tuple(images.shape)}")
    p, g = patch_embed.patch_size, patch_embed.grid_size
    grid = images.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # [N, g, g, C, p, p], a view
    rows = torch.arange(n, device=images.device).unsqueeze(1)  # [N, 1]
    return grid[rows, ids_keep // g, ids_keep % g]  # [N, K, C, p, p]


def embed_visible_patches(patch_embed: PatchEmbed, images: torch.Tensor, ids_keep: torch.Tensor,
                          normalize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``patch_embed(normalize(images))`` at the patches ``ids_keep [N, K]`` alone, ``[N, K, D]``.
    ``normalize`` is the model's per-channel input normalisation (it broadcasts over ``[N, K, C, p, p]``)."""
    patches = normalize(gather_patches(patch_embed, images, ids_keep))  # [N, K, C, p, p]
    n, k = ids_keep.shape
    proj = patch_embed.proj
    cpp = proj.in_channels * patch_embed.patch_size ** 2  # named, not -1: K = 0 (mask ratio near 1) or N = 0 reshape
    return F.linear(patches.reshape(n, k, cpp), proj.weight.reshape(proj.out_channels, cpp), proj.bias)  # [N, K, D]


__all__ = ["visible_patch_embed", "gemm_matches_conv", "gather_patches", "embed_visible_patches"]
