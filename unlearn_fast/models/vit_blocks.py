"""ViT building blocks with timm-0.3.2 / facebookresearch-mae parameter names (so official weights load)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, L, D] with a strided conv (``patch_embed.proj``)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def check_size(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images [N, C, H, W], got shape "
                             f"{tuple(x.shape)}")

    def forward(self, x):
        self.check_size(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, L, D]


def project_out(linear: nn.Linear, x: torch.Tensor, out_bias: bool) -> torch.Tensor:
    """A branch's last Linear: the module itself, or (``out_bias=False``) its GEMM without the bias, which the
    caller adds where it adds the branch to the residual stream (models.fused_blocks)."""
    return linear(x) if out_bias else F.linear(x, linear.weight)


class Attention(nn.Module):
    #: ``forward(x, out_bias=False)`` leaves proj's bias for the caller to add (models.fused_blocks)
    defers_out_bias = True

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, out_bias: bool = True):
        n, l, d = x.shape
        # unbind, not timm's qkv[0], qkv[1], qkv[2]: the same values, but the backward stacks the three grads
        # once instead of zero-filling and summing three [3, N, H, L, d_h] tensors
        q, k, v = self.qkv(x).reshape(n, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # fused SDPA: same math as softmax(q k^T / sqrt(d_h)) v, without materialising the map
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, d_h]
        return project_out(self.proj, out.transpose(1, 2).reshape(n, l, d), out_bias)


class Mlp(nn.Module):
    defers_out_bias = True  # as Attention: fc2's bias

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, out_bias: bool = True):
        return project_out(self.fc2, self.act(self.fc1(x)), out_bias)


class Block(nn.Module):
    """Pre-norm transformer block (``norm1, attn, norm2, mlp``), LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [1 (+1), grid², D], MAE's layout (h-half then w-half)."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # MAE: meshgrid(grid_w, grid_h)

    def one_dim(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_dim(embed_dim // 2, gw), one_dim(embed_dim // 2, gh)], dim=1)  # [G², D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def init_vit_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def xavier_conv_(conv: nn.Conv2d) -> None:
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


__all__ = ["PatchEmbed", "Attention", "Mlp", "project_out", "Block", "sincos_pos_embed_2d", "init_vit_weights",
           "xavier_conv_"]
