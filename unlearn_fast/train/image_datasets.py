"""Image dataset and transforms of the reference trainer, with per-item seeded randomness (REFERENCE.md §4.1).

The reference draws its crops and flips from the global RNG of each DataLoader worker, which is
time-seeded after step 0 (§1.4), so no run can be repeated. Here every item's transform draws from a
torch.Generator seeded by (seed, epoch, index): the same item in the same epoch is transformed the same
way whatever the number of workers, the rank or whether the run was resumed.

    ds = UnlearnImageDataset(items, reference_train_transform(256), seed=0)
    ds.set_epoch(epoch)   # before creating the epoch's DataLoader iterator (not with persistent_workers)
    image, label = ds[0]  # [3, 256, 256] float32 in [0, 1], -100.0 (forget) or 100.0 (retain)
"""
from __future__ import annotations

import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .seeding import derive_seed


class BadImageError(ValueError):
    """An image file that is missing, unreadable or corrupt; the message names the file."""


_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


def load_rgb_image(path: str) -> Image.Image:
    """Open and fully decode `path` as RGB (decoding here, so a truncated file fails now, by name).

    As the reference's `Image.open(path).convert('RGB')` (no EXIF rotation, alpha dropped; palette images
    with per-entry transparency go through RGBA, the same pixels without PIL's warning), except for
    16-bit grey PNGs: PIL's convert clips their 0-65535 values at 255 (an all-white image), so they are
    reduced to 8 bits first, as PIL already does for 16-bit RGB and grey+alpha PNGs."""
    try:
        with Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT_GREY or (image.mode == "I" and image.format == "PNG"):
                return _grey16_to_rgb(image)
            if image.mode == "P" and isinstance(image.info.get("transparency"), bytes):
                # the same RGB values, without PIL's UserWarning (once per DataLoader worker) that such
                # palette images "should be converted to RGBA"
                return image.convert("RGBA").convert("RGB")
            return image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise BadImageError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _grey16_to_rgb(image: Image.Image) -> Image.Image:
    """0-65535 grey -> 8-bit RGB by the high byte, as PIL reduces 16-bit RGB PNGs; older PIL opens such
    grey PNGs as mode "I"."""
    grey = np.asarray(image).astype(np.int64)  # [H, W]
    grey8 = (grey.clip(0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(grey8).convert("RGB")


def verify_images(items: Sequence, num_threads: int = 8) -> None:
    """Decode every distinct file of `items` ([(path, label)] or [path]) once; raise BadImageError
    listing the bad ones. Optional up-front check, so a bad file fails before training, not mid-epoch."""
    paths = sorted({item[0] if isinstance(item, (tuple, list)) else item for item in items})
    bad: list[str] = []

    def check(path):
        try:
            load_rgb_image(path)
        except BadImageError as exc:
            bad.append(str(exc))

    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # PIL decodes without the GIL
        list(pool.map(check, paths))
    if bad:
        bad.sort()
        more = f"\n... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise BadImageError(f"{len(bad)} of {len(paths)} images cannot be read:\n" + "\n".join(bad[:10]) + more)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator that drives the transform of item `index` in `epoch`."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, "data_transform", epoch, index))
    return g


def random_resized_crop_params(width: int, height: int, scale, ratio, generator: torch.Generator):
    """(top, left, h, w) of a random crop: area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries,
    then a centred crop clamped to `ratio`. torchvision's RandomResizedCrop rule, drawn from `generator`
    in the same order, so with equal seeds it picks the same box."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SeededTrainTransform:
    """RandomResizedCrop(size, scale, bicubic) -> RandomHorizontalFlip(p) -> ToTensor, no normalisation.
    Called as transform(image, generator); returns float32 [3, size, size] in [0, 1]."""

    takes_generator = True

    def __init__(self, input_size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5):
        input_size = _check_size(input_size)
        if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and all(_is_real(x) for x in scale)
                and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
        if not (isinstance(ratio, (tuple, list)) and len(ratio) == 2 and all(_is_real(x) for x in ratio)
                and 0 < ratio[0] <= ratio[1] < math.inf):
            raise ValueError(f"crop aspect ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
        if not (_is_real(flip_p) and 0 <= flip_p <= 1):
            raise ValueError(f"flip probability must be in [0, 1], got {flip_p!r}")
        self.input_size, self.scale, self.ratio, self.flip_p = input_size, tuple(scale), tuple(ratio), flip_p

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_params(image.width, image.height, self.scale, self.ratio,
                                                     generator)
        image = TF.resized_crop(image, top, left, h, w, [self.input_size, self.input_size],
                                interpolation=InterpolationMode.BICUBIC)
        if torch.rand(1, generator=generator).item() < self.flip_p:
            image = TF.hflip(image)
        return TF.to_tensor(image)  # [3, S, S]

    def __repr__(self):
        return (f"SeededTrainTransform(size={self.input_size}, scale={self.scale}, bicubic, "
                f"hflip p={self.flip_p})")


class EvalTransform:
    """Resize(shorter side -> size, bicubic) -> CenterCrop(size) -> ToTensor. Deterministic."""

    takes_generator = True

    def __init__(self, input_size: int):
        self.input_size = _check_size(input_size)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = TF.resize(image, self.input_size, interpolation=InterpolationMode.BICUBIC)
        return TF.to_tensor(TF.center_crop(image, [self.input_size, self.input_size]))  # [3, S, S]


def reference_train_transform(input_size: int, use_coco: bool = False) -> SeededTrainTransform:
    """The reference's training transform; with --use_coco the crop scale is (0.2, 0.5) for all images."""
    return SeededTrainTransform(input_size, scale=(0.2, 0.5) if use_coco else (0.2, 1.0))


def eval_transform(input_size: int) -> EvalTransform:
    return EvalTransform(input_size)


def load_eval_images(paths: Sequence[str], input_size: int) -> torch.Tensor:
    """[N, 3, S, S] float32 in [0, 1]: each file through :class:`EvalTransform` (a bad file: BadImageError
    naming it)."""
    if not paths:
        raise ValueError("no image files to load")
    tf = EvalTransform(input_size)
    return torch.stack([tf(load_rgb_image(p)) for p in paths])


class UnlearnImageDataset(Dataset):
    """[(path, label)] -> (image [3, H, W] float32 in [0, 1], label float). Labels: -100.0 forget,
    +100.0 retain/proxy. A transform with `takes_generator` gets the item's seeded generator; any
    other callable gets the PIL image alone; None means ToTensor only."""

    def __init__(self, items: Sequence, transform=None, seed: int = 0):
        items = [_check_item(k, item) for k, item in enumerate(items)]
        if not items:
            raise ValueError("UnlearnImageDataset needs at least one (path, label) item")
        self.items, self.transform, self.seed, self.epoch = items, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's crops/flips. DataLoader workers copy the dataset when an iterator is created,
        so call this before iterating, and do not use persistent_workers=True."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> list[float]:
        return [label for _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        index = range(len(self.items))[index]  # negative -> positive, so both draw the same crop
        path, label = self.items[index]
        image = load_rgb_image(path)
        if self.transform is None:
            return TF.to_tensor(image), label
        if getattr(self.transform, "takes_generator", False):
            return self.transform(image, item_generator(self.seed, self.epoch, index)), label
        return self.transform(image), label


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_size(input_size) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    return int(input_size)


def _check_item(k: int, item) -> tuple[str, float]:
    """One (path, label) pair; the label must be a finite number (a numeric string is accepted)."""
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        raise ValueError(f"item {k} must be a (path, label) pair, got {item!r}")
    path, label = item
    try:
        value = float(label)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"item {k} ({path}): label {label!r} is not a finite number (-100.0 forget, 100.0 retain)")
    return str(path), value
