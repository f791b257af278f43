"""MAE (masked autoencoder ViT), facebookresearch/mae parameter names, behind the I2IModel protocol.

The task transform T is MAE's random patch masking: a per-row uniform noise ``[N, L]`` whose argsort
decides which patches stay visible. Student and teacher receive the same noise, so they see the same T.

Images enter in [0, 1] (the unlearning noise is clamped to that range, as the reference's). Official MAE
weights expect ImageNet-normalised input: the ``mae_vit_*`` sizes normalise inside the model
(non-persistent buffers, so the state-dict keys stay the official ones); ``mae_micro`` does not.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .adapter import I2IModel, TaskDraw
from .fused_blocks import run_blocks
from .registry import register_model
from .visible_patches import embed_visible_patches, gemm_matches_conv, visible_patch_embed
from .vit_blocks import Block, PatchEmbed, init_vit_weights, sincos_pos_embed_2d, xavier_conv_

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MaskedAutoencoderViT(nn.Module, I2IModel):
    family = "mae"
    image_range = (0.0, 1.0)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 mask_ratio: float = 0.75, input_mean: Optional[Sequence[float]] = None,
                 input_std: Optional[Sequence[float]] = None):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.in_chans = in_chans
        # no checkpoint holds these (non-persistent): real values even when built on meta to be loaded later
        here = torch.empty(0).device
        here = torch.device("cpu") if here.type == "meta" else here
        mean = torch.tensor(input_mean if input_mean is not None else [0.0] * in_chans, device=here).view(1, -1, 1, 1)
        std = torch.tensor(input_std if input_std is not None else [1.0] * in_chans, device=here).view(1, -1, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                           decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)
        if not self.cls_token.is_meta:
            self._init_weights()

    def _init_weights(self):
        g = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], g))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], g))
        xavier_conv_(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_vit_weights)

    # ---- geometry --------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def num_visible(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (MAE's order: p, q, c)."""
        p, h = self.patch_embed.patch_size, self.patch_embed.grid_size
        n, c = imgs.shape[:2]
        x = imgs.reshape(n, c, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * h, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, h, c = self.patch_embed.patch_size, self.patch_embed.grid_size, self.in_chans
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def normalize(self, imgs: torch.Tensor) -> torch.Tensor:
        return (imgs - self.input_mean) / self.input_std

    def denormalize(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs * self.input_std + self.input_mean

    # ---- the task transform -----------------------------------------------------------------------
    def sample_task(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> TaskDraw:
        noise = torch.rand(images.shape[0], self.num_patches, generator=generator,
                           device=generator.device if generator is not None else images.device)
        return TaskDraw(noise=noise.to(images.device))  # [N, L]

    def mask_from_task(self, task: TaskDraw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids_keep [N, K], mask [N, L] 1 = hidden, ids_restore [N, L]) from the draw."""
        noise = task["noise"]
        keep = self.num_visible()
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones_like(noise)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore

    # ---- encoder / decoder ------------------------------------------------------------------------
    def _check_images(self, inputs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] float images of the model's size and channels, in the buffers' dtype (what the
        normalisation promotes half precision to anyway; fp64 would meet fp32 weights in the conv)."""
        self.patch_embed.check_size(inputs)
        if inputs.shape[1] != self.in_chans:
            raise ValueError(f"expected images with {self.in_chans} channels [N, C, H, W], got shape "
                             f"{tuple(inputs.shape)}")
        if not inputs.is_floating_point():
            raise TypeError(f"expected floating-point images in [0, 1], got {inputs.dtype} (convert uint8 with /255)")
        return inputs.to(self.input_mean.dtype)

    def forward_encoder_task(self, inputs: torch.Tensor, task: TaskDraw, prenorm: bool = False) -> torch.Tensor:
        inputs = self._check_images(inputs)
        ids_keep, _, _ = self.mask_from_task(task)
        if visible_patch_embed.on() and gemm_matches_conv(inputs):  # the fast step: the K visible patches alone
            x = embed_visible_patches(self.patch_embed, inputs, ids_keep, self.normalize)
            x = x + self.pos_embed[0, 1:, :][ids_keep]  # [N, K, D]
        else:
            x = self.patch_embed(self.normalize(inputs)) + self.pos_embed[:, 1:, :]  # [N, L, D]
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        x = run_blocks(self.blocks, x)  # [N, K, D]
        return x if prenorm else self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, l = ids_restore.shape
        masks = self.mask_token.expand(n, l + 1 - x.shape[1], -1).to(x.dtype)
        x_ = torch.cat([x[:, 1:, :], masks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # [N, L, p*p*C]

    def forward_outputs(self, inputs: torch.Tensor, task: TaskDraw) -> torch.Tensor:
        _, _, ids_restore = self.mask_from_task(task)
        return self.forward_decoder(self.forward_encoder_task(inputs, task), ids_restore)

    def forward(self, imgs: torch.Tensor, task: Optional[TaskDraw] = None):
        """(loss, pred, mask) as upstream MAE's forward, with an optional given mask draw."""
        task = self.sample_task(imgs) if task is None else task
        pred = self.forward_outputs(imgs, task)
        _, mask, _ = self.mask_from_task(task)
        loss_tok, _ = self._pixel_loss(pred, self.task_target(imgs, task), mask)
        return (loss_tok * mask).sum() / mask.sum(), pred, mask

    # ---- losses for the baselines -----------------------------------------------------------------
    def task_target(self, inputs: torch.Tensor, task: TaskDraw) -> torch.Tensor:
        target = self.patchify(self.normalize(inputs))
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target  # [N, L, p*p*C]

    def noisy_task_target(self, target: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        return z * target.std() + target.mean()

    def _pixel_loss(self, pred, target, mask):
        return (pred.float() - target.float()).pow(2).mean(dim=-1), mask  # [N, L], [N, L]

    def task_loss_terms(self, inputs: torch.Tensor, task: TaskDraw, target: Optional[torch.Tensor] = None):
        """Pixel MSE per patch and the mask of hidden patches (MAE's training loss, per token)."""
        return self.task_loss_terms_of_outputs(self.forward_outputs(inputs, task), inputs, task, target)

    def task_loss_terms_of_outputs(self, outputs: torch.Tensor, inputs: torch.Tensor, task: TaskDraw,
                                   target: Optional[torch.Tensor] = None):
        _, mask, _ = self.mask_from_task(task)
        return self._pixel_loss(outputs, self.task_target(inputs, task) if target is None else target, mask)

    # ---- protocol bits ----------------------------------------------------------------------------
    def encoder_final_norm(self) -> nn.LayerNorm:
        return self.norm

    def encoder_parameter_names(self):
        return [n for n, p in self.named_parameters()
                if p.requires_grad and (n.startswith(("patch_embed.", "blocks.", "norm.")) or n == "cls_token")]

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, task: TaskDraw) -> torch.Tensor:
        """Inpainted images in [0, 1]: visible patches from the input, hidden ones from the decoder."""
        pred = self.forward_outputs(imgs, task).float()
        _, mask, _ = self.mask_from_task(task)
        if self.norm_pix_loss:  # de-normalise each patch with the visible input statistics
            t = self.patchify(self.normalize(imgs))
            pred = pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
        full = self.patchify(self.normalize(imgs)) * (1 - mask.unsqueeze(-1)) + pred * mask.unsqueeze(-1)
        return self.denormalize(self.unpatchify(full)).clamp(0, 1)


def _mae(defaults: dict, kwargs: dict) -> MaskedAutoencoderViT:
    cfg = dict(defaults)
    if "input_size" in kwargs:
        if "img_size" in kwargs and kwargs["img_size"] != kwargs["input_size"]:
            raise ValueError(f"input_size={kwargs['input_size']!r} and img_size={kwargs['img_size']!r} name one size "
                             "(input_size is the reference flag's name); give one")
        kwargs["img_size"] = kwargs.pop("input_size")
    for k, v in kwargs.items():  # sizes and counts: a string or float here fails deep inside otherwise
        if k in _INT_ARGS and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


_INT_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads")


_IMAGENET = dict(input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)


@register_model
def mae_micro(**kwargs):
    """Tiny MAE for tests, the demo and quick checks: 32² input, patch 4, 2 blocks of width 128."""
    return _mae(dict(img_size=32, patch_size=4, embed_dim=128, depth=2, num_heads=4, decoder_embed_dim=128,
                     decoder_depth=2, decoder_num_heads=4), kwargs)


@register_model(name="mae_vit_base_patch16")
def mae_vit_base_patch16(**kwargs):
    return _mae(dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                     decoder_depth=8, decoder_num_heads=16, **_IMAGENET), kwargs)


@register_model(name="mae_vit_large_patch16")
def mae_vit_large_patch16(**kwargs):
    return _mae(dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                     decoder_depth=8, decoder_num_heads=16, **_IMAGENET), kwargs)


@register_model(name="mae_vit_huge_patch14")
def mae_vit_huge_patch14(**kwargs):
    return _mae(dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512,
                     decoder_depth=8, decoder_num_heads=16, **_IMAGENET), kwargs)


# upstream constructor names, so `--model` accepts what facebookresearch/mae users type
register_model(mae_vit_base_patch16, name="mae_vit_base_patch16_dec512d8b")
register_model(mae_vit_large_patch16, name="mae_vit_large_patch16_dec512d8b")
register_model(mae_vit_huge_patch14, name="mae_vit_huge_patch14_dec512d8b")
