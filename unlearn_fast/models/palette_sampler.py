"""Palette test-time sampling (REFERENCE.md §5.5): the ancestral sampler and the result files.

``palette_restore`` runs the official ``Network.restoration``: from ``y_t = y_cond`` (as ``run.py -p test``
calls it) it walks t = T−1 .. 0 with the model's own schedule buffers (a loaded checkpoint's schedule
wins over the config's), predicts ε, clamps ŷ0 to [−1, 1], takes the posterior mean plus
``exp(½·log σ²)·z`` (no noise at t = 0) and re-imposes the known region ``y0·(1−mask) + mask·y_t`` after
every step. The whole batch moves together. Randomness comes from ``generator`` only.

``write_restoration_images`` writes ``GT_``, ``Process_``, ``Out_``, ``Mask_`` + name with PIL (format
from the name's extension; JPEG at PIL's default quality 75), values ``round((clamp(x, −1, 1)+1)·127.5)``.
``Process_`` is the reference's grid of the snapshots (torchvision ``make_grid`` layout, padding 2, zeros).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic_files import save_image_atomic
from .palette import Network


def _sampling_steps(num_timesteps: int, sample_num: int, steps: Optional[int]) -> Tuple[int, int]:
    if sample_num < 1 or num_timesteps <= sample_num:
        raise ValueError(f"need 1 <= sample_num < num_timesteps, got sample_num={sample_num}, "
                         f"num_timesteps={num_timesteps}")
    if steps is not None and not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    return num_timesteps // sample_num, num_timesteps if steps is None else steps


@torch.no_grad()
def palette_p_sample(model: Network, y_t: torch.Tensor, y_cond: torch.Tensor, i: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One ancestral step at timestep ``i`` for the whole batch (the official ``p_sample``)."""
    b = y_t.shape[0]
    t = torch.full((b,), i, device=y_t.device, dtype=torch.long)

    def coef(buf):  # [N, 1, 1, 1], the official `extract`
        return buf.to(y_t.device).gather(0, t).view(b, 1, 1, 1)

    noise_level = model.gammas.to(y_t.device).gather(0, t).view(b, 1)
    eps_hat = model.denoise_fn(torch.cat([y_cond, y_t], dim=1), noise_level)
    y0_hat = (coef(model.sqrt_recip_gammas) * y_t - coef(model.sqrt_recipm1_gammas) * eps_hat).clamp_(-1.0, 1.0)
    mean = coef(model.posterior_mean_coef1) * y0_hat + coef(model.posterior_mean_coef2) * y_t
    if i == 0:
        return mean
    dev = generator.device if generator is not None else y_t.device
    z = torch.randn(y_t.shape, generator=generator, device=dev, dtype=y_t.dtype).to(y_t.device)
    return mean + z * (0.5 * coef(model.posterior_log_variance_clipped)).exp()


@torch.no_grad()
def palette_restore(model: Network, y_cond: torch.Tensor, y_0: torch.Tensor, mask: Optional[torch.Tensor],
                    sample_num: int = 8, generator: Optional[torch.Generator] = None, steps: Optional[int] = None,
                    y_t: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(output [N, C, H, W], visuals [(K+1)·N, C, H, W])`` as the official ``restoration``.

    ``y_t`` starts at ``y_cond`` unless given. ``visuals`` = the start, then a snapshot whenever
    ``i % (T // sample_num) == 0`` (K of them), rows of one snapshot together; its last N rows are the
    output. ``steps`` stops after that many steps (timing and smoke tests; the result is then not a
    finished sample). ``mask=None`` re-imposes nothing.
    """
    if y_cond.shape != y_0.shape or (mask is not None and (mask.dim() != 4 or mask.shape[0] != y_0.shape[0])):
        raise ValueError(f"y_cond {tuple(y_cond.shape)} and y_0 {tuple(y_0.shape)} must match, and mask be "
                         f"[N, 1, H, W]; got mask {None if mask is None else tuple(mask.shape)}")
    T = model.num_timesteps
    sample_inter, n_steps = _sampling_steps(T, sample_num, steps)
    y_t = y_cond if y_t is None else y_t
    snapshots = [y_t]
    for i in range(T - 1, T - 1 - n_steps, -1):
        y_t = palette_p_sample(model, y_t, y_cond, i, generator)
        if mask is not None:
            y_t = y_0 * (1.0 - mask) + mask * y_t
        if i % sample_inter == 0:
            snapshots.append(y_t)
    return y_t, torch.cat(snapshots, dim=0)


# ---- result files ------------------------------------------------------------------------------------
def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """``[n, C, H, W] -> [C, H', W']`` laid out as torchvision's ``make_grid`` (nrow images per row)."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    xmaps = min(nrow, n)
    ymaps = int(math.ceil(n / xmaps))
    hp, wp = h + padding, w + padding
    grid = images.new_full((c, hp * ymaps + padding, wp * xmaps + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, xmaps)
        grid[:, y * hp + padding: y * hp + padding + h, x * wp + padding: x * wp + padding + w] = images[k]
    return grid


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` (or ``[n, C, H, W]``, gridded with nrow = ⌊√n⌋) in [−1, 1] -> HWC uint8, the reference's
    ``tensor2img``: clamp, ``round((x+1)·127.5)`` in fp32, squeeze."""
    x = x.detach().float().cpu().clamp(-1.0, 1.0)
    if x.dim() == 4:
        x = image_grid(x, nrow=int(math.sqrt(x.shape[0])))
    if x.dim() != 3:
        raise ValueError(f"expected [C, H, W] or [n, C, H, W], got {tuple(x.shape)}")
    arr = np.transpose(x.numpy(), (1, 2, 0))
    return ((arr + 1) * 127.5).round().astype(np.uint8).squeeze()


def restoration_images(names: Sequence[str], gt: torch.Tensor, visuals: torch.Tensor, mask: torch.Tensor
                       ) -> List[Tuple[str, torch.Tensor]]:
    """The reference's ``save_current_results`` order: per row GT_, Process_, Out_; then every Mask_."""
    b = gt.shape[0]
    if len(names) != b or visuals.shape[0] % b:
        raise ValueError(f"{len(names)} names for a batch of {b}; visuals hold {visuals.shape[0]} rows")
    items = []
    for i, name in enumerate(names):
        items += [(f"GT_{name}", gt[i]), (f"Process_{name}", visuals[i::b]), (f"Out_{name}", visuals[i - b])]
    mask_image = gt * (1.0 - mask) + mask  # the hole shown white
    items += [(f"Mask_{name}", mask_image[i]) for i, name in enumerate(names)]
    return items


def write_restoration_images(result_dir: str, names: Sequence[str], gt: torch.Tensor, visuals: torch.Tensor,
                             mask: torch.Tensor) -> List[str]:
    """Write the four images per row into ``result_dir``; returns the paths. ``names`` carry the extension."""
    from PIL import Image  # only needed when writing

    known = Image.registered_extensions()
    for name in names:
        if os.path.splitext(name)[1].lower() not in known or os.sep in name:
            raise ValueError(f"image name {name!r} needs a file extension PIL knows (e.g. .jpg) and no directory")
    os.makedirs(result_dir, exist_ok=True)
    paths = []
    for fname, tensor in restoration_images(names, gt, visuals, mask):
        path = os.path.join(result_dir, fname)
        # whole or not at all: a stopped test leaves no half image that a later eval would count
        save_image_atomic(Image.fromarray(tensor_to_uint8(tensor)), path, known[os.path.splitext(fname)[1].lower()])
        paths.append(path)
    return paths
