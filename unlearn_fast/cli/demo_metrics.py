"""The demo's numbers: inpainting error on held-out images, and the error that perfect forgetting would give.

- ``inpaint_mse``: mean squared error, over the hidden pixels only (every channel), between the model's
  inpainting (visible patches from the input, hidden ones from the decoder) and the true image, pixels in
  [0, 1], under random patch masks drawn from a fixed seed (the same masks before and after unlearning).
- ``noise_ceiling_mse``: the same error when the encoder output is replaced by the *original* (teacher)
  encoder's embedding of a noise image built like the training noise (clamp(randn * std + mean, 0, 1) with
  the held-out set's mean and std, same masks), decoded by the original decoder. Unlearning trains only
  the encoder, so the decoder is the same before and after; this is what an encoder that forgot perfectly
  (maps forget images exactly where the objective pushes them) would give. It uses the original model
  only, so it is the same number before and after.

    task = fixed_mask_draw(model, n=len(images), seed=0, name="forget")
    noise = eval_noise_images(images, seed=0, name="forget")
    m = set_metrics(model, teacher, images, task, noise)   # {"inpaint_mse": ..., "noise_ceiling_mse": ...}
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models import TaskDraw
from ..ops import sample_batch_noise
from ..train.seeding import derive_seed

EVAL_CHUNK = 256  # rows per forward pass (bounds memory for large held-out sets)


def fixed_mask_draw(model: nn.Module, n: int, seed: int, name: str) -> TaskDraw:
    """The mask draw for ``n`` held-out images of set ``name``: a CPU generator seeded by (seed, name)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "demo_eval_masks", name))
    return model.sample_task(torch.empty(n, 1), g)  # only the batch size is read


def eval_noise_images(images: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """clamp(randn * std + mean, 0, 1) with the statistics of the whole held-out set (the training noise's
    formula), from a generator seeded by (seed, name)."""
    g = torch.Generator(device=images.device).manual_seed(derive_seed(seed, "demo_eval_noise", name))
    return sample_batch_noise(images, "normal", generator=g, low=0.0, high=1.0)


def hidden_pixel_mask(model: nn.Module, task: TaskDraw) -> torch.Tensor:
    """[N, 1, H, W] float, 1 where the pixel lies in a hidden patch."""
    _, mask, _ = model.mask_from_task(task)  # [N, L]
    p = model.patch_embed.patch_size
    per_patch = mask.unsqueeze(-1).expand(-1, -1, p * p * model.in_chans)  # [N, L, p*p*C]
    return model.unpatchify(per_patch)[:, :1]


@torch.no_grad()
def inpaint_from_latent(model: nn.Module, images: torch.Tensor, latent: torch.Tensor, task: TaskDraw) -> torch.Tensor:
    """What ``model.reconstruct`` returns, with the encoder output replaced by ``latent [N, 1+K, D]``."""
    _, mask, ids_restore = model.mask_from_task(task)
    pred = model.forward_decoder(latent, ids_restore).float()  # [N, L, p*p*C]
    target = model.patchify(model.normalize(images))
    if model.norm_pix_loss:  # de-normalise each patch with the visible input statistics, as reconstruct
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask.unsqueeze(-1)
    return model.denormalize(model.unpatchify(target * (1 - m) + pred * m)).clamp(0, 1)  # [N, C, H, W]


def masked_mse_sum(recon: torch.Tensor, images: torch.Tensor, pixel_mask: torch.Tensor):
    """(sum of squared errors over hidden pixels and channels, number of such values), in fp64."""
    err = (recon.double() - images.double()).pow(2) * pixel_mask.double()
    return err.sum().item(), pixel_mask.double().sum().item() * images.shape[1]


@torch.no_grad()
def inpaint_mse(model: nn.Module, images: torch.Tensor, task: TaskDraw,
                latent_source: Optional[nn.Module] = None, latent_images: Optional[torch.Tensor] = None) -> float:
    """Masked-region MSE of ``model``'s inpainting of ``images`` under ``task``. With ``latent_source`` and
    ``latent_images``, the encoder output is ``latent_source``'s embedding of ``latent_images`` instead."""
    dev = next(model.parameters()).device
    total = count = 0.0
    for lo in range(0, images.shape[0], EVAL_CHUNK):
        rows = torch.arange(lo, min(lo + EVAL_CHUNK, images.shape[0]))
        x = images[rows].to(dev)
        t = task.select(rows).to(dev)
        if latent_source is None:
            recon = model.reconstruct(x, t)
        else:
            latent = latent_source.forward_encoder_task(latent_images[rows].to(dev), t)  # [n, 1+K, D]
            recon = inpaint_from_latent(model, x, latent, t)
        s, c = masked_mse_sum(recon, x, hidden_pixel_mask(model, t))
        total, count = total + s, count + c
    return total / count


def set_metrics(model: nn.Module, original: nn.Module, images: torch.Tensor, task: TaskDraw,
                noise: torch.Tensor) -> dict:
    """{"inpaint_mse", "noise_ceiling_mse"} for one held-out set; ``original`` is the model before unlearning."""
    was_training = model.training
    model.eval()
    try:
        return {"inpaint_mse": inpaint_mse(model, images, task),
                "noise_ceiling_mse": inpaint_mse(original, images, task, latent_source=original,
                                                 latent_images=noise)}
    finally:
        model.train(was_training)


__all__ = ["fixed_mask_draw", "eval_noise_images", "hidden_pixel_mask", "inpaint_from_latent", "inpaint_mse",
           "set_metrics", "masked_mse_sum"]
