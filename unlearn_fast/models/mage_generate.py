"""Batched MAGE inpainting / outpainting by iterative decoding (REFERENCE.md §5.1, ``testpaint.py``).

    from unlearn_fast.models import create_model
    from unlearn_fast.models.mage_generate import paint_batch, write_paint_outputs
    model = create_model("mage_micro").eval()
    out = paint_batch(model, images, "center", 0.25, seed=0)          # [N, 3, R, R] in [0, 1]
    write_paint_outputs(out, "gen", ["retain"] * N, wnids, names, "center", 0.25)

Per image (the reference does one image at a time; here a batch shares one mode and ratio):
1. pixel mask: ``center`` = a square of side ``int(R * r)`` from ``int(R * 0.5 * (1 - r))``; ``outpaint`` = the
   four borders, each ``int(R * r * 0.5)`` px wide. Masked pixels are set to the ImageNet mean.
2. token mask, the reference's rule (``latent_margin`` 1): a pixel rectangle ``[s, e)`` masks the tokens
   ``[s // p - 1, e // p + 1)`` (p = R / grid) in each direction. That is the touched tokens grown by 1 on the low
   side, but on the high side only when ``e`` is a multiple of p (otherwise the token holding pixel ``e - 1`` is
   the last): 36 tokens for r = 0.25 and 100 for r = 0.5 at 256²; asymmetric for odd k of outpaint r = k/16
   (87 tokens, not 112, at r = 1/16).
3. the masked image is tokenised; masked tokens become [MASK]; MAGE decoding for ``num_iter`` (20)
   steps: step k has ratio (k+1)/num_iter and schedule cos(π/2 · ratio); steps whose schedule value is ≥
   the initial masked fraction are skipped; each step samples the code of every position from
   softmax(logits[:, 1:, :codebook]), scores unknown positions by ``log p + T (1 - ratio) gumbel``
   (T = choice_temperature 6.0; known positions score log(1e20) + noise, as the reference), and re-masks
   the ``clamp(floor(L cos), 1, #unknown - 1)`` lowest. The last step's samples are decoded by the VQGAN.
4. composite: soft mask = the pixel mask grown by 14 px, as 8-bit image blurred by PIL's
   ``GaussianBlur(radius=7)`` and read back as ``uint8 / 255`` (the reference's exact steps; a true Gaussian
   with σ = 7 only if PIL is missing); ``out = clamp(gen · m + masked · (1 - m), 0, 1)`` (the reference clips
   after compositing, not the generation before it).
Pixel sizes (14, 7) scale with R / 256 so the tiny test model behaves alike.

Randomness: the reference resets ``torch.manual_seed(0)`` / ``np.random.seed(0)`` before every image.
Here each image owns a torch generator seeded with its seed (default 0 for all, like the reference), and
its draws do not depend on which other images share the batch. Sampling is Gumbel-max (an exact
categorical draw) from that generator; the random streams differ from the reference's numpy ones.
Re-masking uses ranks, so exactly the scheduled number of tokens is re-masked even with ties.

Files: ``<out>/<retain|forget>/<wnid>/<mode>_<r>_<orig name>``, JPEG quality 95 via PIL (the format follows the
name's extension as with cv2: PNG for ``.png`` names), ``floor(clip(x * 255))``, each written whole or not at all
(under a hidden temporary name, then renamed). ``channel_order="bgr"`` (default) reproduces the reference,
which wrote RGB arrays through cv2 so its files are R/B swapped; ``"rgb"`` writes true colours. The JPEG files are
byte-identical to ``cv2.imwrite``'s (checked with opencv-python 4.10: baseline, quality-95 tables, 4:2:0 chroma).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic_files import save_image_atomic
from .adapter import TaskDraw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
INPAINT_RATIOS = (4 / 16, 8 / 16)
OUTPAINT_RATIOS = tuple(k / 16 for k in range(1, 14))
KNOWN_TOKEN_PROB = 1e20


def paint_settings(task: str) -> List[Tuple[str, float]]:
    """(mode, ratio) pairs of an evaluation task: inpaint -> center x {0.25, 0.5}; outpaint -> k/16, k=1..13."""
    if task == "inpaint":
        return [("center", r) for r in INPAINT_RATIOS]
    if task == "outpaint":
        return [("outpaint", r) for r in OUTPAINT_RATIOS]
    raise ValueError(f"task must be 'inpaint' or 'outpaint', got {task!r}")


def pixel_mask(img_size: int, mode: str, ratio: float) -> torch.Tensor:
    """bool [R, R], True = unknown (to be generated)."""
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise TypeError(f"ratio must be a number in (0, 1), got {ratio!r}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    m = torch.zeros(img_size, img_size, dtype=torch.bool)
    if mode == "center":
        side = int(img_size * ratio)
        lo = int(img_size * 0.5 * (1 - ratio))  # testpaint.py's arithmetic (not (R - side) // 2: r = 0.3 differs)
        m[lo:lo + side, lo:lo + side] = True
    elif mode == "outpaint":
        w = int(img_size * ratio * 0.5)
        m[:] = True
        m[w:img_size - w, w:img_size - w] = False
    else:
        raise ValueError(f"mode must be 'center' or 'outpaint', got {mode!r}")
    return m


def token_mask_from_pixels(pmask: torch.Tensor, grid: int, grow: int = 1) -> torch.Tensor:
    """bool [grid*grid] (row-major): the reference's token mask of a union of pixel rectangles.

    A rectangle ``[s, e)`` (per axis) masks tokens ``[s // p - grow, e // p + grow)``, p = size / grid, as
    testpaint.py. Equivalently: the tokens touching pixels ``[s - grow p, e + (grow - 1) p]``, so the pixel mask
    is dilated by ``grow p`` px towards lower indices and ``(grow - 1) p + 1`` px towards higher ones (both
    dilations distribute over the union of the outpaint borders), then pooled to tokens."""
    size = pmask.shape[-1]
    if pmask.dim() != 2 or pmask.shape[0] != size:
        raise ValueError(f"expected a square pixel mask [R, R], got {tuple(pmask.shape)}")
    if size % grid:
        raise ValueError(f"image size {size} is not a multiple of the token grid {grid}")
    if grow < 1:
        raise ValueError(f"grow must be >= 1 token (the reference's latent_margin is 1), got {grow}")
    p = size // grid
    low, high = grow * p, (grow - 1) * p + 1  # how far a masked pixel reaches to lower / higher indices
    m = F.pad(pmask.float()[None, None], (high, low, high, low))  # out[i] = max(m[i - high .. i + low])
    m = F.max_pool2d(m, (low + high + 1), stride=1)  # [1, 1, R, R]
    return F.max_pool2d(m, p).view(-1) > 0  # [g*g]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W], kernel radius ceil(3σ), replicated edges (σ <= 0: identity)."""
    if sigma <= 0:
        return x
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def soft_composite_mask(pmask: torch.Tensor, grow_px: int, sigma: float) -> torch.Tensor:
    """float [R, R] in [0, 1]: the unknown region dilated by ``grow_px``, then blurred as the reference does it:
    an 8-bit image through PIL's ``GaussianBlur(radius=sigma)`` (three extended box blurs), read back as
    ``uint8 / 255``. Without PIL: a true Gaussian (within 0.017 of PIL's at σ = 7)."""
    m = pmask.double()[None, None]  # float64 so the flat parts come out exactly 0 and 1
    if grow_px > 0:
        m = F.max_pool2d(m, 2 * grow_px + 1, stride=1, padding=grow_px)
    try:
        from PIL import Image, ImageFilter
    except ImportError:  # pragma: no cover - PIL ships with torchvision
        return gaussian_blur(m, sigma)[0, 0].clamp(0, 1).float()
    img = Image.fromarray(np.uint8(m[0, 0].cpu().numpy() * 255.0))  # mode "L"; every RGB band blurs the same
    if sigma > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(255.0))


def _generators(seeds: Sequence[int], device) -> Tuple[List[torch.Generator], Optional[torch.Tensor]]:
    """One generator per distinct seed and, per row, the index of its generator (None: one seed for all)."""
    uniq = sorted(set(int(s) for s in seeds))
    gens = [torch.Generator(device=device).manual_seed(s) for s in uniq]
    if len(uniq) == 1:
        return gens, None
    return gens, torch.tensor([uniq.index(int(s)) for s in seeds], dtype=torch.long).to(device)


def _gumbel(gens, row_gen, n: int, shape, device) -> torch.Tensor:
    """Standard Gumbel noise [N, *shape]; row i uses the generator of its seed (same seed, same noise)."""
    per_gen = []
    for g in gens:
        u = torch.rand(shape, generator=g, device=device)
        per_gen.append(-torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7))))
    if row_gen is None:
        return per_gen[0].expand(n, *shape)
    return torch.stack(per_gen)[row_gen]


@torch.no_grad()
def mage_decode_tokens(model, ids: torch.Tensor, unknown: torch.Tensor, seeds: Sequence[int],
                       num_iter: int = 20, choice_temperature: float = 6.0) -> torch.Tensor:
    """Iterative decoding. ids [N, L] (codes; values at unknown positions are ignored), unknown bool [L]
    shared by the batch. Returns the final code ids [N, L]."""
    n, seq_len = ids.shape
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1 decoding step, got {num_iter}")
    dev = ids.device
    num_unknown0 = int(unknown.sum())  # the token mask lives on the host: no device sync
    unknown = unknown.to(dev)
    if num_unknown0 == 0:
        return ids.clone()
    codebook, mask_id = model.codebook_size, model.mask_token_label
    gens, row_gen = _generators(seeds, dev)
    cur = torch.where(unknown, torch.full_like(ids, mask_id), ids)  # [N, L]
    no_drop = torch.zeros(n, seq_len, dtype=torch.bool, device=dev)
    sampled = cur
    for step in range(num_iter):
        ratio = (step + 1) / num_iter
        schedule = math.cos(math.pi / 2 * ratio)
        if schedule >= num_unknown0 / seq_len:
            continue  # the reference's skip rule: too early for the masked fraction we start with
        is_unknown = cur == mask_id  # [N, L]
        task = TaskDraw(token_drop_mask=no_drop, token_all_mask=is_unknown, num_dropped=0)
        logits = model.forward_outputs(cur, task)[:, 1:, :codebook].float()  # [N, L, C]
        sampled = (logits + _gumbel(gens, row_gen, n, (seq_len, codebook), dev)).argmax(-1)  # categorical draw
        sampled = torch.where(is_unknown, sampled, cur)
        logp = torch.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)  # [N, L]
        logp = torch.where(is_unknown, logp, torch.full_like(logp, math.log(KNOWN_TOKEN_PROB)))
        conf = logp + choice_temperature * (1.0 - ratio) * _gumbel(gens, row_gen, n, (seq_len,), dev)
        n_unknown = is_unknown.sum(1, keepdim=True)  # [N, 1]
        mask_len = torch.clamp(torch.minimum(n_unknown - 1, torch.full_like(n_unknown, int(seq_len * schedule))),
                               min=1)
        rank = torch.empty_like(sampled).scatter_(1, conf.argsort(1), torch.arange(seq_len, device=dev).expand(n, -1))
        cur = torch.where(rank < mask_len, torch.full_like(sampled, mask_id), sampled)
    return sampled


def _scaled(px: float, img_size: int) -> float:
    return px * img_size / 256.0


@torch.no_grad()
def paint_batch(model, images: torch.Tensor, mode: str, ratio: float, seed: Union[int, Sequence[int]] = 0,
                num_iter: int = 20, choice_temperature: float = 6.0, return_parts: bool = False):
    """Inpaint (``mode='center'``) or outpaint (``'outpaint'``) images [N, 3, R, R] in [0, 1]. Put the model
    in eval mode first (the embedding dropout is active in train mode); :func:`run_paint` does.

    Returns the composited images [N, 3, R, R] in [0, 1]; with ``return_parts`` also a dict with the
    masked input, the raw generation, the soft mask [R, R] and the token mask [L]."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of square images [N, 3, R, R], got {tuple(images.shape)}")
    n, _, size, _ = images.shape
    if isinstance(seed, numbers.Integral) or (torch.is_tensor(seed) and seed.dim() == 0):
        seeds = [int(seed)] * n
    else:
        seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    pmask = pixel_mask(size, mode, ratio)
    grid = model.vqgan.grid_size
    tmask = token_mask_from_pixels(pmask, grid, grow=1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    pm = pmask.to(images.device)
    masked = torch.where(pm, mean, images)  # [N, 3, R, R]
    ids = model.prepare_inputs(masked)
    codes = mage_decode_tokens(model, ids, tmask, seeds, num_iter, choice_temperature)
    gen = model.vqgan.decode_ids(codes).float()  # unclamped, as the reference composites it
    soft = soft_composite_mask(pmask, round(_scaled(14, size)), _scaled(7, size)).to(images.device, images.dtype)
    out = (gen.to(images.dtype) * soft + masked * (1 - soft)).clamp(0, 1)  # the reference clips the composite
    if return_parts:
        return out, dict(masked=masked, generated=gen, soft_mask=soft, token_mask=tmask, codes=codes)
    return out


def paint_file_name(mode: str, ratio: float, orig_name: str) -> str:
    """``<mode>_<r>_<orig name>`` (``center_0.25_x.JPEG``); a name without an extension gets ``.JPEG``."""
    base = os.path.basename(orig_name)
    if not os.path.splitext(base)[1]:
        base += ".JPEG"
    return f"{mode}_{ratio}_{base}"


def write_paint_outputs(images: torch.Tensor, out_dir: str, splits: Sequence[str], wnids: Sequence[str],
                        names: Sequence[str], mode: str, ratio: float, channel_order: str = "bgr",
                        quality: int = 95) -> List[str]:
    """Write images [N, 3, R, R] in [0, 1] to ``out_dir/<split>/<wnid>/<mode>_<r>_<name>``, in the format of the
    name's extension (JPEG quality ``quality`` for ImageNet's ``.JPEG``; PNG for ``.png``), as cv2.imwrite."""
    from PIL import Image
    if channel_order not in ("bgr", "rgb"):
        raise ValueError(f"channel_order must be 'bgr' (reference files) or 'rgb', got {channel_order!r}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):  # a diverged checkpoint: NaN would be written as black pixels
        raise ValueError("the generated images hold NaN or inf values (diverged checkpoint?); nothing written")
    if not (len(splits) == len(wnids) == len(names) == images.shape[0]):
        raise ValueError(f"{images.shape[0]} images but {len(splits)} splits, {len(wnids)} wnids, {len(names)} names")
    known = Image.registered_extensions()  # ".png" -> "PNG", ".JPEG" is looked up lower-cased
    targets = []
    for split, wnid, name in zip(splits, wnids, names):  # check every name before writing any file
        if split not in ("retain", "forget"):
            raise ValueError(f"split must be 'retain' or 'forget', got {split!r}")
        fname = paint_file_name(mode, ratio, name)
        fmt = known.get(os.path.splitext(fname)[1].lower())
        if fmt is None:
            raise ValueError(f"cannot write {fname!r}: PIL knows no image format for its extension")
        targets.append((os.path.join(out_dir, split, wnid), fname, fmt))
    arr = np.floor(np.clip(images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255.0, 0, 255)).astype(np.uint8)
    if channel_order == "bgr":
        arr = arr[..., ::-1]
    paths = []
    for a, (folder, fname, fmt) in zip(arr, targets):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, fname)
        # the format follows the extension, as cv2.imwrite does (ImageNet's .JPEG: JPEG quality 95)
        extra = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        save_image_atomic(Image.fromarray(np.ascontiguousarray(a)), path, fmt, **extra)
        paths.append(path)
    return paths


def run_paint(model, batches: Iterable, out_dir: str, task: str, seed: int = 0, num_iter: int = 20,
              choice_temperature: float = 6.0, channel_order: str = "bgr",
              settings: Optional[Sequence[Tuple[str, float]]] = None) -> List[str]:
    """For every batch ``(images [N,3,R,R], splits, wnids, names)`` and every (mode, ratio) of ``task``: paint
    and write. ``batches`` is iterated once (each image is loaded once; a generator is fine); the images do not
    depend on the loop order, since every call reseeds per image. Returns the written paths."""
    settings = list(settings or paint_settings(task))
    was_training = model.training
    model.eval()
    paths: List[str] = []
    try:
        for images, splits, wnids, names in batches:
            for mode, ratio in settings:
                dev = next(model.parameters()).device
                out = paint_batch(model, images.to(dev), mode, ratio, seed, num_iter, choice_temperature)
                paths += write_paint_outputs(out, out_dir, splits, wnids, names, mode, ratio, channel_order)
    finally:
        model.train(was_training)
    return paths


__all__ = ["paint_settings", "pixel_mask", "token_mask_from_pixels", "gaussian_blur", "soft_composite_mask",
           "mage_decode_tokens", "paint_batch", "paint_file_name", "write_paint_outputs",
           "run_paint", "INPAINT_RATIOS", "OUTPAINT_RATIOS", "IMAGENET_MEAN"]
