"""MAGE (masked generative encoder) ViT over frozen VQGAN tokens, official ``models_mage.py`` parameter
names, behind the I2IModel protocol (REFERENCE.md §1.1–§1.2, reference-keys/mage_vit_base_patch16.txt).

Token ids (vocabulary ``codebook + num_classes + 1``): ``[0, codebook)`` are VQ codes,
``[codebook, codebook + num_classes)`` class ids, and the last id is [MASK]. The class token prepended to
every sequence is ``codebook + fake_class_index`` (1024 + 76 = 1100 for the official sizes; MAGE writes
it as ``codebook + 1100 - 1024``); the mask id is ``codebook + num_classes`` (2024).

The unlearning forward (``forward_encoder_task``): ids -> [MASK] at the masked positions -> class token in
front -> ``token_emb`` (word + learned position embeddings, LayerNorm, dropout 0.1) -> drop the dropped
positions -> ``blocks`` -> ``norm``. Attention as the reference's: QK^T and softmax in fp32 with autocast
off, ``attn @ v`` in the autocast dtype. Encoder blocks have no dropout (the i2i fork sets it to 0), so
only the embedding dropout differs between train (student) and eval (teacher).

The decoder (``forward_outputs``), as MAGE's code (REFERENCE.md describes only its cost): the encoder
output goes through ``decoder_embed``; every dropped or masked position gets the embedded class token
(``pad_with_cls_token``: ``mask_token`` is stored but unused), kept visible positions their own embedding;
then ``+ decoder_pos_embed_learned``, ``decoder_blocks``, ``decoder_norm`` and the MLM head
``logits = LN(GELU(fc(x))) @ word_embeddings.weight.detach().T + bias``.

Stored but unused by any forward: ``cls_token``, ``pos_embed``, ``mask_token``, ``decoder_pos_embed``,
``patch_embed.*``, ``decoder_pred.*`` (kept so official checkpoints load strictly).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import I2IModel, TaskDraw
from .fused_blocks import run_blocks
from .mage_attention import MageAttention
from .mage_masking import sample_mage_masks
from .registry import register_model
from .vit_blocks import Mlp, PatchEmbed, init_vit_weights, sincos_pos_embed_2d, xavier_conv_
from .state_dict_io import load_state_dict_strict, read_checkpoint
from .vqgan import VQGAN, VQGAN_F16_DDCONFIG, check_id_range, load_vqgan_checkpoint

LABEL_SMOOTHING = 0.1


class BertEmbeddings(nn.Module):
    """ids [N, T] -> LN(word(ids) + position(0..T-1)), then dropout. ``position_ids`` is a persistent
    int64 buffer (official checkpoints contain it)."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions, dtype=torch.long).unsqueeze(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(self.position_ids[:, :ids.shape[1]])
        return self.dropout(self.LayerNorm(x))  # [N, T, D]


class MageBlock(nn.Module):
    """Pre-norm block with timm names (``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``), LN eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MageAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MlmLayer(nn.Module):
    """logits = LN(GELU(fc(x))) @ word_embeddings^T + bias; the output matrix is passed in (tied, detached)."""

    def __init__(self, feat_dim: int, word_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(feat_dim, word_dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(word_dim)  # torch default eps 1e-5, as MAGE's
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.ln(self.gelu(self.fc(x))) @ word_embeddings.t() + self.bias  # [N, T, V]


class MaskedGenerativeEncoderViT(nn.Module, I2IModel):
    family = "mage"
    image_range = (0.0, 1.0)

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 mask_ratio_min: float = 0.5, mask_ratio_max: float = 1.0, mask_ratio_mu: float = 0.55,
                 mask_ratio_std: float = 0.25, ddconfig: Optional[Mapping] = None, n_embed: int = 1024,
                 embed_dim_vq: int = 256, num_classes: int = 1000, fake_class_index: int = 76,
                 token_dropout: float = 0.1, vqgan_norm_groups: int = 32, vqgan_ckpt_path: Optional[str] = None):
        super().__init__()
        if not 0.0 <= mask_ratio_min <= mask_ratio_max <= 1.0:
            raise ValueError(f"need 0 <= mask_ratio_min <= mask_ratio_max <= 1, got {mask_ratio_min}, {mask_ratio_max}")
        if not 0 <= fake_class_index < num_classes:
            raise ValueError(f"fake_class_index {fake_class_index} is not a class id in [0, {num_classes})")
        ddconfig = dict(VQGAN_F16_DDCONFIG if ddconfig is None else ddconfig)
        vqgan = VQGAN(ddconfig, n_embed, embed_dim_vq, norm_groups=vqgan_norm_groups)
        patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = patch_embed.num_patches
        if vqgan.ddconfig["resolution"] != img_size or vqgan.num_tokens != num_patches:
            raise ValueError(f"VQGAN resolution {vqgan.ddconfig['resolution']} / {vqgan.num_tokens} tokens must match "
                             f"img_size {img_size} / {num_patches} patches (the position tables are shared)")
        self.codebook_size = n_embed
        self.num_classes = num_classes
        self.vocab_size = n_embed + num_classes + 1
        self.fake_class_label = n_embed + fake_class_index
        self.mask_token_label = self.vocab_size - 1
        self.num_tokens = num_patches
        self.mask_ratio_min, self.mask_ratio_max = mask_ratio_min, mask_ratio_max
        self.mask_ratio_mu, self.mask_ratio_std = mask_ratio_mu, mask_ratio_std

        # registration order = official state_dict order (own params, then children)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim))
        self.vqgan = vqgan
        self.token_emb = BertEmbeddings(self.vocab_size, embed_dim, num_patches + 1, token_dropout)
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList([MageBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList([MageBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.mlm_layer = MlmLayer(decoder_embed_dim, embed_dim, self.vocab_size)
        self.norm_pix_loss = norm_pix_loss
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                           decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           mask_ratio_min=mask_ratio_min, mask_ratio_max=mask_ratio_max, mask_ratio_mu=mask_ratio_mu,
                           mask_ratio_std=mask_ratio_std, ddconfig=dict(vqgan.ddconfig), n_embed=n_embed,
                           embed_dim_vq=embed_dim_vq, num_classes=num_classes, fake_class_index=fake_class_index,
                           token_dropout=token_dropout)
        if not self.cls_token.is_meta:
            self._init_weights()
        for p in self.vqgan.parameters():
            p.requires_grad_(False)
        if vqgan_ckpt_path:
            load_vqgan_checkpoint(self.vqgan, vqgan_ckpt_path)

    def _init_weights(self):
        g = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], g))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], g))
        xavier_conv_(self.patch_embed.proj)
        for p in (self.cls_token, self.mask_token, self.decoder_pos_embed_learned,
                  self.token_emb.word_embeddings.weight, self.token_emb.position_embeddings.weight):
            nn.init.normal_(p, std=0.02)
        vq = {id(m) for m in self.vqgan.modules()}  # the tokenizer keeps torch's default init
        for m in self.modules():
            if id(m) not in vq:
                init_vit_weights(m)

    # ---- frozen front end -------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """VQGAN code ids [N, L] int64 of images [N, 3, R, R] in [0, 1] (in whatever autocast is active)."""
        return self.vqgan.tokenize(images)

    # ---- the task transform -----------------------------------------------------------------------
    def sample_task(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> TaskDraw:
        """One mask rate for the batch and exact-count drop/mask sets (see :mod:`.mage_masking`)."""
        draw = sample_mage_masks(images.shape[0], self.num_tokens, mask_ratio_min=self.mask_ratio_min,
                                 mask_ratio_max=self.mask_ratio_max, mask_ratio_mu=self.mask_ratio_mu,
                                 mask_ratio_std=self.mask_ratio_std, generator=generator, device=images.device)
        return TaskDraw(draw)

    def _check_task(self, ids: torch.Tensor, task: TaskDraw) -> Tuple[torch.Tensor, torch.Tensor, int]:
        if ids.dim() != 2 or ids.shape[1] != self.num_tokens or ids.dtype != torch.long:
            raise ValueError(f"expected VQ ids int64 [N, {self.num_tokens}] (prepare_inputs(images)), "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        drop, all_ = task["token_drop_mask"].bool(), task["token_all_mask"].bool()
        if drop.shape != ids.shape or all_.shape != ids.shape:
            raise ValueError(f"task masks {tuple(drop.shape)}/{tuple(all_.shape)} do not match ids {tuple(ids.shape)}")
        k = task.get("num_dropped")
        if k is None:  # masks from outside: count them (one host sync) and check the rows agree
            counts = drop.sum(1)
            k = int(counts[0]) if counts.numel() else 0
            if not bool((counts == k).all()):
                raise ValueError("every row must drop the same number of tokens")
        return drop, all_, int(k)

    def _kept_positions(self, drop: torch.Tensor, num_dropped: int) -> torch.Tensor:
        """Ascending positions (class token included) that survive dropping: [N, 1 + L - num_dropped].
        A stable sort of the drop flags instead of boolean indexing, so no host sync."""
        drop_full = F.pad(drop, (1, 0), value=False).to(torch.uint8)  # [N, 1+L]
        order = torch.argsort(drop_full, dim=1, stable=True)
        return order[:, : drop_full.shape[1] - num_dropped]

    # ---- encoder ----------------------------------------------------------------------------------
    def forward_encoder_task(self, inputs: torch.Tensor, task: TaskDraw, prenorm: bool = False) -> torch.Tensor:
        """E(T(x)): VQ ids [N, L] -> latent [N, 1 + L - num_dropped, D] (before ``norm`` if prenorm)."""
        drop, all_, k = self._check_task(inputs, task)
        check_id_range(inputs, self.vocab_size, "token ids")  # [MASK] ids are valid input (generation)
        ids = torch.where(all_, torch.full_like(inputs, self.mask_token_label), inputs)
        ids = F.pad(ids, (1, 0), value=self.fake_class_label)  # [N, 1+L]
        x = self.token_emb(ids)  # [N, 1+L, D]
        keep = self._kept_positions(drop, k)  # [N, K]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]
        x = run_blocks(self.blocks, x)  # [N, K, D]
        return x if prenorm else self.norm(x)

    def _reference_task(self, images, token_drop_mask_raw, token_all_mask_raw):
        """(task, drop_raw, all_raw): the given raw masks, or masks sampled from the global RNG; the raw masks
        are returned as the reference returns them (float [N, L] when sampled, as given otherwise)."""
        if (token_drop_mask_raw is None) != (token_all_mask_raw is None):
            raise ValueError("give both token_drop_mask_raw and token_all_mask_raw (the student's masks) or neither")
        if token_drop_mask_raw is None:
            task = self.sample_task(images)
            return task, task["token_drop_mask"].float(), task["token_all_mask"].float()
        task = TaskDraw(token_drop_mask=token_drop_mask_raw.bool(), token_all_mask=token_all_mask_raw.bool())
        return task, token_drop_mask_raw, token_all_mask_raw

    def forward_encoder(self, images: torch.Tensor, token_drop_mask_raw: Optional[torch.Tensor] = None,
                        token_all_mask_raw: Optional[torch.Tensor] = None):
        """Reference API, the reference's 7-tuple: (latent [N, K, D], gt ids [N, L] int64, token_drop_mask
        [N, 1+L], token_all_mask [N, 1+L] (float, a leading 0 for the class token), token_indices [N, 1+L]
        int64 (class token, then ids with [MASK] at masked positions), token_drop_mask_raw [N, L],
        token_all_mask_raw [N, L]). Masks are sampled when not given (global RNG)."""
        ids = self.prepare_inputs(images)
        task, drop_raw, all_raw = self._reference_task(images, token_drop_mask_raw, token_all_mask_raw)
        latent = self.forward_encoder_task(ids, task)
        pad = lambda m: F.pad(m.float(), (1, 0), value=0.0)  # noqa: E731
        masked = torch.where(task["token_all_mask"], torch.full_like(ids, self.mask_token_label), ids)
        token_indices = F.pad(masked, (1, 0), value=self.fake_class_label)
        return (latent, ids, pad(task["token_drop_mask"]), pad(task["token_all_mask"]), token_indices,
                drop_raw, all_raw)

    # ---- decoder + MLM head -----------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, task: TaskDraw) -> torch.Tensor:
        """latent [N, K, D] -> logits [N, 1+L, vocab]; masked and dropped positions get the class token."""
        drop, all_ = task["token_drop_mask"].bool(), task["token_all_mask"].bool()
        x = self.decoder_embed(latent)  # [N, K, Dd]
        keep_full = ~F.pad(drop, (1, 0), value=False)  # [N, 1+L]
        visible = keep_full & ~F.pad(all_, (1, 0), value=False)
        slot = (keep_full.long().cumsum(1) - 1).clamp_min(0)  # index in x of each kept position
        placed = torch.gather(x, 1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, 1+L, Dd]
        x = torch.where(visible.unsqueeze(-1), placed, x[:, :1]) + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.mlm_layer(self.decoder_norm(x), self.token_emb.word_embeddings.weight.detach())

    def forward_outputs(self, inputs: torch.Tensor, task: TaskDraw) -> torch.Tensor:
        """Full logits [N, 1+L, vocab] of the encoder + decoder + MLM head."""
        return self.forward_decoder(self.forward_encoder_task(inputs, task), task)

    def forward(self, imgs: torch.Tensor, labels: Optional[torch.Tensor] = None, forget_alpha: float = 0.0,
                return_logits: bool = False, ratio=None, train_encoder: bool = False, token_drop_mask_raw=None,
                token_all_mask_raw=None, use_noise: bool = False):
        """The reference's ``forward`` (its engines unpack these tuples):

        - ``train_encoder=True``: :meth:`forward_encoder`'s 7-tuple (the unlearning path);
        - ``return_logits=True``: (logits [N, 1+L, V], token_drop_mask_raw, token_all_mask_raw);
        - ``labels`` given (the whole-model baselines; label >= 100 retain, else forget):
          (loss, logits, token_all_mask [N, 1+L], retain_loss, forget_loss) with loss = retain - alpha * forget,
          or with ``use_noise`` retain + alpha * forget where forget is the CE against noisy ids;
        - otherwise MAGE's training loss: (loss, logits, token_all_mask [N, 1+L]).
        The reference puts the input images where logits are returned here; its engines discard that slot.
        ``ratio`` (the reference's ``forward_encoder_mask`` path, which crashes there) is not supported."""
        if ratio is not None:
            raise ValueError("forward(ratio=...) is not supported (the reference's path unpacks 7 values from 4 "
                             "and crashes); inpaint/outpaint with unlearn_fast.models.mage_generate")
        if train_encoder:
            return self.forward_encoder(imgs, token_drop_mask_raw, token_all_mask_raw)
        ids = self.prepare_inputs(imgs)
        task, drop_raw, all_raw = self._reference_task(imgs, token_drop_mask_raw, token_all_mask_raw)
        logits = self.forward_outputs(ids, task)
        if return_logits:
            return logits, drop_raw, all_raw
        ce, w = self._token_ce(logits, ids, task)
        mask = F.pad(w, (1, 0), value=0.0)
        if labels is None:
            return (ce * w).sum() / w.sum().clamp_min(1), logits, mask
        sign = torch.where(torch.as_tensor(labels, device=ids.device) < 100, -1.0, 1.0)[:, None]  # [N, 1]
        if use_noise:
            ce_forget, _ = self._token_ce(logits, self.noisy_task_target(ids), task)
        else:
            ce_forget = ce
        denom = w.sum()
        retain = (ce * w * (1.0 + sign) * 0.5).sum() / denom
        forget = (ce_forget * w * (1.0 - sign) * 0.5).sum() / denom
        loss = retain + forget_alpha * forget if use_noise else retain - forget_alpha * forget
        return loss, logits, mask, retain, forget

    # ---- losses for the baselines -----------------------------------------------------------------
    def task_target(self, inputs: torch.Tensor, task: TaskDraw) -> torch.Tensor:
        return inputs  # the VQ ids [N, L]

    def noisy_task_target(self, target: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """round(clamp(randn * std(ids) + mean(ids), 0, codebook - 1)) as int64 ids (scalar batch std/mean)."""
        t = target.float()
        dev = generator.device if generator is not None else target.device
        z = torch.randn(target.shape, generator=generator, device=dev).to(target.device)
        return torch.round((z * t.std() + t.mean()).clamp(0, self.codebook_size - 1)).long()

    def _token_ce(self, logits, target, task):
        n, l = target.shape
        ce = F.cross_entropy(logits[:, 1:, : self.codebook_size].reshape(n * l, -1), target.reshape(-1),
                             label_smoothing=LABEL_SMOOTHING, reduction="none").view(n, l)
        return ce, task["token_all_mask"].float()

    def task_loss_terms(self, inputs: torch.Tensor, task: TaskDraw, target: Optional[torch.Tensor] = None):
        """MAGE's loss per token: label-smoothed (0.1) CE over the code logits, weight = all masked positions."""
        return self.task_loss_terms_of_outputs(self.forward_outputs(inputs, task), inputs, task, target)

    def task_loss_terms_of_outputs(self, outputs: torch.Tensor, inputs: torch.Tensor, task: TaskDraw,
                                   target: Optional[torch.Tensor] = None):
        return self._token_ce(outputs, self.task_target(inputs, task) if target is None else target, task)

    # ---- protocol bits ----------------------------------------------------------------------------
    def encoder_final_norm(self) -> nn.LayerNorm:
        return self.norm

    def encoder_parameter_names(self):
        return [n for n, p in self.named_parameters()
                if p.requires_grad and n.startswith(("token_emb.", "blocks.", "norm."))]


def load_mage_checkpoint(model: MaskedGenerativeEncoderViT, path: str) -> MaskedGenerativeEncoderViT:
    """Strictly load an official MAGE checkpoint (``{'model': sd, ...}``, e.g. ``mage-vitb-1600.pth`` or a
    ``checkpoint-N.pth`` whose ``args`` is a pickled ``argparse.Namespace``, allow-listed for
    ``weights_only=True``), or a bare state dict. Raises ValueError listing missing/unexpected/mis-shaped keys."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, expected a dict")
    load_state_dict_strict(model, ckpt, f"MAGE checkpoint {path!r}")  # its 'model' entry, or a bare state dict
    return model


def _mage(defaults: dict, kwargs: dict) -> MaskedGenerativeEncoderViT:
    cfg = dict(defaults)
    if "input_size" in kwargs:
        kwargs["img_size"] = kwargs.pop("input_size")
    kwargs.pop("norm_layer", None)  # the reference passes partial(nn.LayerNorm, eps=1e-6); always that here
    cfg.update(kwargs)
    return MaskedGenerativeEncoderViT(**cfg)


@register_model
def mage(**kwargs):
    """Generic MAGE: the reference's constructor kwargs, plus ddconfig / n_embed / embed_dim_vq for the VQGAN."""
    return _mage({}, kwargs)


@register_model
def mage_vit_base_patch16(**kwargs):
    return _mage(dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                      decoder_num_heads=16, mlp_ratio=4.0), kwargs)


@register_model
def mage_vit_large_patch16(**kwargs):
    return _mage(dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
                      decoder_num_heads=16, mlp_ratio=4.0), kwargs)


MICRO_DDCONFIG = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32,
                      ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)


@register_model
def mage_micro(**kwargs):
    """Tiny MAGE for tests: 32² images -> VQGAN (ch 32, mult (1,1,2)) -> 8x8 = 64 tokens, codebook 64,
    100 classes (vocab 165: codes 0-63, classes 64-163, class token 64+76 = 140, mask 164), ViT width 64,
    2 encoder blocks, 1 decoder block."""
    return _mage(dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64,
                      decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0, ddconfig=MICRO_DDCONFIG, n_embed=64,
                      embed_dim_vq=32, num_classes=100, fake_class_index=76), kwargs)


__all__ = ["MaskedGenerativeEncoderViT", "BertEmbeddings", "MageAttention", "MageBlock", "MlmLayer",
           "load_mage_checkpoint", "mage", "mage_vit_base_patch16", "mage_vit_large_patch16", "mage_micro"]
