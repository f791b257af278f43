"""The guided-diffusion UNet of Palette (REFERENCE.md §3.1), with the official parameter names.

Residual blocks condition on the noise level γ through ``cond_embed`` (sinusoidal embedding of γ, then an
MLP) with scale-shift GroupNorm; ``resblock_updown`` resamples inside residual blocks (avg-pool down,
nearest up, no parameters). ``attn_res`` is compared with the downsample factor (1, 2, 4, ...), so in the
Places2 config (``attn_res [16]``, four levels) the only attention is the middle block's.

``forward(x, gammas, return_feat=True)`` is the unlearning "encoder": it returns the output of every input
block plus the middle block's (13 maps for Places2) and skips the decoder.

Deliberate differences from the official module, none of which changes the math in fp32:
attention uses ``F.scaled_dot_product_attention`` (same softmax(qkᵀ/√d)v, fused), and ``use_fp16``
(half-precision blocks) is not supported (use autocast).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (the official ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by {groups}, got {channels}")
    return GroupNorm32(groups, channels)


def gamma_embedding(gammas: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the noise level γ ∈ [0, 1]: ``[N] -> [N, dim]`` (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=gammas.device) / half)
    args = gammas[:, None].float() * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class EmbedBlock(nn.Module):
    """A block whose forward also takes the noise-level embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class EmbedSequential(nn.Sequential, EmbedBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, EmbedBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channel: Optional[int] = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channel or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv (key ``op``) or 2x2 average pooling (no parameters)."""

    def __init__(self, channels: int, use_conv: bool, out_channel: Optional[int] = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channel or channels, 3, stride=2, padding=1)
        else:
            if out_channel not in (None, channels):
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(EmbedBlock):
    """GroupNorm-SiLU-conv, γ-embedding (scale-shift or additive), GroupNorm-SiLU-dropout-conv, skip.

    Keys: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection`` (1x1 conv when
    the channel count changes). ``up``/``down`` resample both paths between the in-norm and the in-conv.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channel: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = True, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        out_ch = out_channel or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.out_layers = nn.Sequential(normalization(out_ch), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample after norm+act, before the conv (both paths)
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # [N, 2C or C, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention. Keys ``norm``, ``qkv`` (Conv1d C->3C), ``proj_out`` (Conv1d C->C).

    ``legacy_order`` (the official default): qkv is laid out per head as [q_h, k_h, v_h]; otherwise as
    [q (all heads), k, v].
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, legacy_order: bool = True):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.legacy_order = legacy_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # [N, C, T]
        qkv = self.qkv(self.norm(x))  # [N, 3C, T]
        h = self.attention(qkv)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)

    def split_heads(self, qkv: torch.Tensor):
        """q, k, v as ``[N*heads, T, ch]``."""
        b, width, t = qkv.shape
        ch = width // (3 * self.num_heads)
        if self.legacy_order:
            q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, t).split(ch, dim=1)
        else:
            q, k, v = (z.reshape(b * self.num_heads, ch, t) for z in qkv.chunk(3, dim=1))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, t = qkv.shape
        q, k, v = self.split_heads(qkv)
        a = F.scaled_dot_product_attention(q, k, v)  # [N*heads, T, ch], softmax(q kᵀ/√ch) v
        return a.transpose(1, 2).reshape(b, -1, t)  # [N, C, T]


class UNet(nn.Module):
    """Palette's guided-diffusion UNet; argument names are the official config keys."""

    def __init__(self, image_size: int, in_channel: int, inner_channel: int, out_channel: int, res_blocks: int,
                 attn_res: Sequence[int], dropout: float = 0.0, channel_mults: Sequence[int] = (1, 2, 4, 8),
                 conv_resample: bool = True, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 use_new_attention_order: bool = False):
        super().__init__()
        if use_fp16:
            raise ValueError("use_fp16 is not supported; run the UNet under autocast instead")
        if res_blocks < 1 or not channel_mults:
            raise ValueError(f"need res_blocks >= 1 and at least one channel_mult, got {res_blocks}, {channel_mults}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channel, self.inner_channel = image_size, in_channel, inner_channel
        self.out_channel, self.res_blocks, self.dropout = out_channel, res_blocks, dropout
        self.attn_res, self.channel_mults = tuple(attn_res), tuple(channel_mults)
        legacy = not use_new_attention_order

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_checkpoint, legacy)

        def res(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, cond_dim, dropout, out_channel=ch_out, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        cond_dim = inner_channel * 4
        self.cond_embed = nn.Sequential(nn.Linear(inner_channel, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

        ch = input_ch = int(channel_mults[0] * inner_channel)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channel, ch, 3, padding=1))])
        block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mults):
            for _ in range(res_blocks):
                layers: List[nn.Module] = [res(ch, int(mult * inner_channel))]
                ch = int(mult * inner_channel)
                if ds in self.attn_res:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                block_chans.append(ch)
            if level != len(channel_mults) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(EmbedSequential(down))
                block_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mults))[::-1]:
            for i in range(res_blocks + 1):
                ich = block_chans.pop()
                layers = [res(ch + ich, int(inner_channel * mult))]
                ch = int(inner_channel * mult)
                if ds in self.attn_res:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channel, 3, padding=1))

    def embed_noise_level(self, gammas: torch.Tensor) -> torch.Tensor:
        return self.cond_embed(gamma_embedding(gammas.reshape(-1), self.inner_channel))  # [N, 4*inner]

    def forward(self, x: torch.Tensor, gammas: torch.Tensor, return_feat: bool = False
                ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """``x [N, in_channel, H, W]``, ``gammas [N]`` or ``[N, 1]`` -> predicted noise ``[N, out_channel, H, W]``,
        or with ``return_feat`` the input-block outputs plus the middle output (the decoder is skipped)."""
        if x.dim() != 4 or x.shape[1] != self.in_channel:
            raise ValueError(f"x must be [N, {self.in_channel}, H, W], got {tuple(x.shape)}")
        if gammas.numel() not in (1, x.shape[0]):
            raise ValueError(f"gammas must hold 1 or N = {x.shape[0]} values, got shape {tuple(gammas.shape)}")
        factor = 2 ** (len(self.channel_mults) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"H and W must be multiples of {factor}, got {tuple(x.shape[-2:])}")
        emb = self.embed_noise_level(gammas)
        h = x.type(torch.float32)  # the official UNet always runs its trunk from an fp32 input
        hs = []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        if return_feat:
            return hs + [h]
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))

    def feature_shapes(self, height: int, width: Optional[int] = None):
        """The ``(C, H, W)`` of each map ``return_feat`` gives for an input of ``height x width``."""
        width = height if width is None else width
        shapes = []
        for blk in self.input_blocks:
            first = blk[0]
            if isinstance(first, nn.Conv2d):
                shapes.append((first.out_channels, height, width))
                continue
            if (isinstance(first, ResBlock) and first.updown) or isinstance(first, Downsample):
                height, width = height // 2, width // 2
            c = first.out_layers[-1].out_channels if isinstance(first, ResBlock) else shapes[-1][0]
            shapes.append((c, height, width))
        shapes.append((shapes[-1][0], height, width))
        return shapes


def init_palette_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_in) conv/linear weights and zero biases: the official ``init_type: kaiming``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
