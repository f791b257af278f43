"""The frozen VQGAN tokenizer of MAGE (``vqgan_jax_strongaug.ckpt``): a PyTorch port of the JAX (MaskGIT)
tokenizer with taming-transformers parameter names (REFERENCE.md §1.1, reference-keys/vqgan_jax_strongaug.txt).

Layout facts that differ from taming's VQGAN and that the official weights depend on:
- no attention anywhere, although the config sets ``attn_resolutions: [16]`` (the key is accepted, ignored);
- encoder downsampling is a 2x2 average pool (no parameters); the decoder upsamples nearest x2 + 3x3 conv;
- encoder and decoder ResBlock convs have no bias; GroupNorm(32, eps 1e-6); swish written as
  ``x * sigmoid(x)`` on CPU (see :func:`swish`: ``F.silu`` rounds differently and moves near-tie code ids),
  ``F.silu`` on CUDA (speed);
- when a ResBlock changes width, ``nin_shortcut`` (1x1, out -> out) is applied to the block's output ``h``
  and added to it: ``out = nin_shortcut(h) + h`` (the JAX code's quirk, kept: the weights expect it);
- the encoder's ``conv_out`` is 1x1; there is no quant_conv / post_quant_conv; the mid stage always holds
  ``block_1`` and ``block_2``.

Token ids are row-major over the latent grid: ``ids[n, i * w + j]`` is the code at latent row i, column j.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import add_avg_pool2d, group_norm_silu
from .aligned_conv import input_conv
from .kernel_switch import KernelSwitch
from .state_dict_io import load_state_dict_strict, read_checkpoint

#: ddconfig of the official tokenizer (MAGE's config/vqgan.yaml)
VQGAN_F16_DDCONFIG = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                          ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
_DDCONFIG_KEYS = set(VQGAN_F16_DDCONFIG)


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``, rounded as the reference computes it (sigmoid rounded, then the product).

    ``F.silu`` rounds once and differs by an ulp in about a quarter of fp32 elements; over the encoder's 25
    activations that can flip near-tie code ids, so the official fp32 teacher's ids would not be reproduced.
    Without autograd the product is written into the sigmoid's buffer (the tokenizer always runs so)."""
    if x.is_cuda:
        # one fused kernel: the product form moves 2.5x the bytes of this memory-bound pass, and on a GPU the
        # reference's own ids are not bit-reproducible anyway (cudnn.benchmark picks conv algorithms per run)
        return F.silu(x)
    s = torch.sigmoid(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return x * s
    return s.mul_(x)  # same bits as x * s: IEEE products commute


#: inside ``with fused_group_norms():``, :func:`norm_swish` on CUDA without autograd runs GroupNorm + swish as
#: one fused kernel (the fast unlearning step turns it on; the reference-semantics step keeps torch's ops)
fused_group_norms = KernelSwitch("unlearn_fast_vqgan_fused_norms")


#: inside ``with channels_last_tokenizer():`` the encoder runs channels_last (NHWC): cuDNN's half-precision convs
#: work in NHWC and otherwise transpose NCHW in and out of every conv (17.9 of 115.7 ms of the MAGE bf16 step's
#: kernels on an H100); the fused norm reads NHWC in place. The same math in another layout, so other conv
#: algorithms sum in another order, which in half precision can move a near-tie code id (18 of 1024 ids,
#: mage_micro, CPU bf16). On by default in the fast step on CUDA (H100, 2026-11-27: MAGE-B bf16 80.7 -> 67.0 ms,
#: reference precision 156.7 -> 139.2 ms); ``--nchw_tokenizer`` keeps NCHW.
channels_last_tokenizer = KernelSwitch("unlearn_fast_vqgan_channels_last")


#: inside ``with fused_residual_pools():`` each encoder level but the last ends with its last ResnetBlock's
#: residual add and the 2x2 average pool as one pass (:func:`~unlearn_fast.ops.add_avg_pool2d`: the
#: full-resolution sum is never written; the same bits as torch's two ops on a GPU, its twin on the CPU)
fused_residual_pools = KernelSwitch("unlearn_fast_vqgan_fused_residual_pools")


def norm_swish(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``swish(norm(x))``. Under :func:`fused_group_norms` on a CUDA tensor with no gradient to track: one
    fused pass (fp32 statistics and math, as autocast's fp32 group_norm) that writes the autocast dtype
    directly, so the next conv reads what it would have cast to; torch's GroupNorm + SiLU + casts otherwise.
    Rounding differs from torch's only in the order of the fp32 statistics' sums."""
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, norm.weight, norm.bias))
    if fused_group_norms.on() and x.is_cuda and not tracked:
        out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True,
                               out_dtype=out_dtype)
    return swish(norm(x))


def check_id_range(ids: torch.Tensor, size: int, what: str) -> None:
    """ValueError if ``ids`` leave [0, size). Checked on CPU tensors only: on an accelerator the check
    would sync the host every step, and ids there come from the tokenizer (in range by construction)."""
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"{what} must lie in [0, {size}), got min {int(ids.min())}, max {int(ids.max())}")


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        # the JAX port's shortcut maps h (out channels), not x: see the module docstring
        self.nin_shortcut = (nn.Conv2d(out_channels, out_channels, 1, bias=False)
                             if in_channels != out_channels else None)

    def branches(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two terms of the block's output ``left + right`` (the residual add left to the caller)."""
        h = self.conv1(norm_swish(self.norm1, x))
        h = self.conv2(self.dropout(norm_swish(self.norm2, h)))
        if self.nin_shortcut is not None:
            return self.nin_shortcut(h), h
        return x, h

    def forward(self, x):
        left, right = self.branches(x)
        return left + right


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and, in the decoder, ``upsample``."""

    def __init__(self, blocks, upsample: Optional[nn.Module] = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        up = getattr(self, "upsample", None)
        return up(x) if up is not None else x

    def forward_pooled(self, x):
        """``avg_pool2d(self(x), 2, 2)`` (encoder levels); under :data:`fused_residual_pools` the last block's
        residual add and the pool run as one op."""
        if not fused_residual_pools.on() or not len(self.block) or hasattr(self, "upsample"):
            return F.avg_pool2d(self(x), 2, 2)
        for blk in self.block[:-1]:
            x = blk(x)
        return add_avg_pool2d(*self.block[-1].branches(x))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[N, in_channels, R, R] -> [N, z_channels, R / 2^(levels-1), ...]."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z=False, dropout=0.0,
                 norm_groups=32, **_ignored):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        widths = [ch * m for m in ch_mult]
        levels, block_in = [], ch
        for w in widths:
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, w, norm_groups, dropout))
                block_in = w
            levels.append(_Level(blocks))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, norm_groups, dropout)
        self.norm_out = _group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 1)

    def forward(self, x):
        h = input_conv(self.conv_in, x)  # channel-padded in the fast step on a GPU (aligned_conv.py)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            h = level.forward_pooled(h) if i < last else level(h)
        h = self.mid(h)
        return self.conv_out(norm_swish(self.norm_out, h))


class Decoder(nn.Module):
    """[N, z_channels, r, r] -> [N, out_ch, r * 2^(levels-1), ...] (unclamped, about [0, 1] for MAGE)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, out_ch, z_channels, dropout=0.0, norm_groups=32,
                 **_ignored):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, norm_groups, dropout)
        levels = [None] * len(widths)
        for i in reversed(range(len(widths))):  # built top-down, stored by level index (taming's order)
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, widths[i], norm_groups, dropout))
                block_in = widths[i]
            levels[i] = _Level(blocks, Upsample(block_in) if i > 0 else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(norm_swish(self.norm_out, h))


class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup (``quantize.embedding``), taming's distance formula."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest_ids(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, C, h, w] -> ids [N, h*w] int64 (row-major), argmin of |z|^2 + |e|^2 - 2 z.e.

        Written with the reference's ops so autocast treats it the same way (the einsum runs in the
        autocast dtype, the squares and sums in fp32).
        """
        n, c, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, c)  # [N*h*w, C]
        e = self.embedding.weight  # [K, C]
        d = (torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", zf, e.t()))  # [N*h*w, K]
        return torch.argmin(d, dim=1).view(n, h * w)

    def codes(self, ids: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """ids [N, h*w] -> z_q [N, C, h, w]."""
        h, w = grid
        return self.embedding(ids).view(ids.shape[0], h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """Encoder + quantizer + decoder; state-dict keys as the official ``.ckpt`` (encoder, decoder, quantize)."""

    def __init__(self, ddconfig: Optional[Mapping] = None, n_embed: int = 1024, embed_dim: int = 256,
                 norm_groups: int = 32):
        super().__init__()
        cfg = dict(VQGAN_F16_DDCONFIG if ddconfig is None else ddconfig)
        unknown = set(cfg) - _DDCONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown ddconfig keys: {sorted(unknown)} (expected a subset of {sorted(_DDCONFIG_KEYS)})")
        missing = {"ch", "ch_mult", "num_res_blocks", "z_channels", "resolution"} - set(cfg)
        if missing:
            raise ValueError(f"ddconfig lacks {sorted(missing)}")
        cfg.setdefault("in_channels", 3)
        cfg.setdefault("out_ch", 3)
        cfg["ch_mult"] = tuple(cfg["ch_mult"])
        if cfg.get("double_z", False):
            raise ValueError("double_z=True is not supported: the VQ tokenizer quantizes z directly")
        if embed_dim != cfg["z_channels"]:
            raise ValueError(f"codebook width embed_dim={embed_dim} must equal z_channels={cfg['z_channels']} "
                             "(this VQGAN has no quant_conv)")
        down = 2 ** (len(cfg["ch_mult"]) - 1)
        if cfg["resolution"] % down:
            raise ValueError(f"resolution {cfg['resolution']} is not divisible by the downsampling factor {down}")
        self.ddconfig = cfg
        self.grid_size = cfg["resolution"] // down
        self.encoder = Encoder(**cfg, norm_groups=norm_groups)
        self.decoder = Decoder(**cfg, norm_groups=norm_groups)
        self.quantize = VectorQuantizer(n_embed, embed_dim)

    @property
    def n_embed(self) -> int:
        return self.quantize.n_embed

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, R, R] in [0, 1] -> code ids [N, (R/f)^2] int64."""
        res = self.ddconfig["resolution"]
        if images.dim() != 4 or images.shape[1] != self.ddconfig["in_channels"] or images.shape[-2:] != (res, res):
            raise ValueError(f"expected images [N, {self.ddconfig['in_channels']}, {res}, {res}], "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"expected floating-point images in [0, 1], got {images.dtype} (convert uint8 with /255)")
        # a float64 / fp16 batch outside autocast would fail deep in conv_in; the weights' dtype is what's meant
        images = images.to(self.encoder.conv_in.weight.dtype)
        if channels_last_tokenizer.on():  # convs, adds and pools keep the layout they are given
            images = images.contiguous(memory_format=torch.channels_last)
        return self.quantize.nearest_ids(self.encoder(images))

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """code ids [N, h*w] -> images [N, out_ch, R, R] (unclamped)."""
        if ids.dim() != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"expected ids [N, {self.num_tokens}], got {tuple(ids.shape)}")
        check_id_range(ids, self.n_embed, "code ids")
        return self.decoder(self.quantize.codes(ids, (self.grid_size, self.grid_size)))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, ids): tokenize then decode."""
        ids = self.tokenize(images)
        return self.decode_ids(ids), ids


def load_vqgan_checkpoint(model_or_vqgan: nn.Module, path: str) -> nn.Module:
    """Load ``vqgan_jax_strongaug.ckpt`` (or any file in its layout) strictly into a :class:`VQGAN`, or into
    the ``.vqgan`` of a MAGE model. The file is either ``{'state_dict': sd, ...}`` (Lightning) or ``sd``."""
    vqgan = getattr(model_or_vqgan, "vqgan", model_or_vqgan)
    if not isinstance(vqgan, VQGAN):
        raise TypeError(f"expected a VQGAN or a model with a .vqgan, got {type(model_or_vqgan).__name__}")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, expected a dict")
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    load_state_dict_strict(vqgan, state, f"VQGAN checkpoint {path!r}")
    return model_or_vqgan


__all__ = ["VQGAN", "Encoder", "Decoder", "ResnetBlock", "VectorQuantizer", "VQGAN_F16_DDCONFIG", "swish",
           "norm_swish", "fused_group_norms", "channels_last_tokenizer", "fused_residual_pools",
           "load_vqgan_checkpoint", "load_state_dict_strict"]
