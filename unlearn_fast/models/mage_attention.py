"""MAGE's multi-head self-attention, and the fast step's fused form of it.

The official numerics: QK^T and softmax in fp32 with autocast off, ``attn @ v`` in the dtype of v (the autocast
dtype under autocast). Inside :func:`sdpa_attention` on a CUDA GPU with half-precision q, k, v (the student under
fp16/bf16 autocast, the teacher in bf16 mode) the same attention runs as one
``F.scaled_dot_product_attention`` kernel instead: it forms the same exact products of half-precision q and k,
accumulates them and the softmax in fp32 and multiplies v by probabilities rounded to v's dtype, as the
official code does, without writing the [N, H, T, T] scores (fp32) and probabilities to memory. It rounds the
unnormalised probabilities and divides by their sum after the product (the official code rounds the
normalised ones), and its fp32 sums run in another order. An fp32 teacher (reference precision) and the CPU always
take the official path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_switch import KernelSwitch
from .vit_blocks import project_out

_HALF = (torch.float16, torch.bfloat16)
#: inside ``with sdpa_attention():``, MAGE attention on CUDA half-precision inputs runs as
#: ``scaled_dot_product_attention`` (the fast step turns it on; the reference step keeps the official ops)
sdpa_attention = KernelSwitch("unlearn_fast_mage_sdpa_attention")


class MageAttention(nn.Module):
    """Multi-head self-attention with timm's names (``qkv``, ``proj``); see the module docstring."""
    defers_out_bias = True  # forward(x, out_bias=False): proj's bias left to the caller (models.fused_blocks)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, out_bias: bool = True):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if sdpa_attention.on() and q.is_cuda and q.dtype in _HALF:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [N, H, T, d_h]
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                attn = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # [N, H, T, T] fp32
                attn = (attn - attn.amax(dim=-1, keepdim=True)).softmax(dim=-1)
            out = attn.to(v.dtype) @ v  # [N, H, T, d_h]
        return project_out(self.proj, out.transpose(1, 2).reshape(n, t, d), out_bias)


__all__ = ["MageAttention", "sdpa_attention"]
