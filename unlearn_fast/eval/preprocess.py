"""Reading evaluation images and the exact per-metric preprocessing of the reference.

BGR convention (§5.1, §8): MAGE generation writes an RGB array through ``cv2.imwrite``, so the generated
JPEGs hold R and B swapped. Every reader here takes ``bgr_on_disk``: True for MAGE-generated files,
False for original dataset images and for Palette outputs (saved by PIL).

- FID (clean-fid "clean" mode): uint8 RGB -> per-channel float32 PIL bicubic resize to 299x299 (aspect not
  kept) -> clip [0, 255] -> float tensor [3, 299, 299] in [0, 255]. The channel swap commutes with a
  per-channel resize, so where it happens does not matter.
- IS, MAGE: PIL ``Resize((256, 256))`` -> ``ToTensor`` -> CIFAR ``Normalize`` (applied to the channels as
  they lie on disk, i.e. in BGR order for generated files: a reference quirk kept here) -> channel flip
  -> bilinear upsample to 299 in the batch (:func:`upsample_for_inception`).
- IS, Palette (Places365 ResNet-50): ``Resize((256, 256))`` -> ``CenterCrop(224)`` -> ``ToTensor`` ->
  ImageNet ``Normalize``; no channel flip.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "open_rgb", "read_image_rgb", "clean_resize", "cleanfid_input", "mage_is_input", "places365_is_input",
    "upsample_for_inception", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # what the reference IS uses, with an ImageNet Inception (§8 quirk)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _as_8bit(img: Image.Image, path) -> Image.Image:
    """8-bit grey for a 16-bit greyscale image (``convert("RGB")`` would clip every value above 255: white).

    16-bit grey PNGs open as "I;16" (older Pillow: "I"); v16 -> round(v16 / 257), which maps 257 * v8 back to
    v8. Other 32-bit modes ("I" from TIFF, float "F") have no agreed 8-bit range: an error, not a guess.
    """
    if img.mode in _GREY16_MODES or (img.mode == "I" and img.format == "PNG"):
        grey = np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey)  # mode "L"
    if img.mode in ("I", "F"):
        raise ValueError(f"cannot decode image {path}: a 32-bit {'float' if img.mode == 'F' else 'integer'} "
                         f"image (mode {img.mode}) has no defined 8-bit brightness; save it as an 8-bit image")
    return img


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The fully decoded image as PIL RGB; a missing file: FileNotFoundError, an undecodable one: ValueError.

    8-bit files convert exactly as PIL's ``convert("RGB")`` (what clean-fid and torchvision do); 16-bit
    greyscale is reduced to 8 bits first (see :func:`_as_8bit`).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return _as_8bit(img, path).convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises for bad files
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    except ValueError as e:
        if str(e).startswith("cannot decode image"):
            raise
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def read_image_rgb(path: str | os.PathLike, *, bgr_on_disk: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] in RGB order. ``bgr_on_disk=True`` swaps R and B back (MAGE-generated files)."""
    arr = np.asarray(open_rgb(path))
    return np.ascontiguousarray(arr[..., ::-1]) if bgr_on_disk else arr


def clean_resize(image: np.ndarray, size: tuple[int, int] = (299, 299)) -> np.ndarray:
    """clean-fid "clean" resize: each channel as a float32 PIL image, bicubic to ``size`` = (width, height).

    image: [H, W, C] uint8 or float in [0, 255]. Returns float32 [height, width, C], clipped to [0, 255].
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    width, height = size
    channels = []
    for c in range(image.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))  # mode "F"
        plane = plane.resize((width, height), resample=Image.BICUBIC)
        channels.append(np.asarray(plane).clip(0, 255).reshape(height, width, 1))
    return np.concatenate(channels, axis=2).astype(np.float32)


def cleanfid_input(path: str | os.PathLike, *, bgr_on_disk: bool = False) -> torch.Tensor:
    """[3, 299, 299] float32 in [0, 255]: the input of the clean-fid Inception for one image file."""
    resized = clean_resize(read_image_rgb(path, bgr_on_disk=bgr_on_disk))
    return torch.from_numpy(resized.transpose(2, 0, 1).copy())


def _pil_transform(*, crop: int | None, mean, std) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms

    steps = [transforms.Resize((256, 256))]
    if crop is not None:
        steps.append(transforms.CenterCrop(crop))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def mage_is_input(path: str | os.PathLike, *, bgr_on_disk: bool = True) -> torch.Tensor:
    """[3, 256, 256] float32: the MAGE Inception-Score input (CIFAR-normalised as on disk, then flipped)."""
    x = _pil_transform(crop=None, mean=CIFAR_MEAN, std=CIFAR_STD)(open_rgb(path))
    return x[[2, 1, 0]] if bgr_on_disk else x


def places365_is_input(path: str | os.PathLike) -> torch.Tensor:
    """[3, 224, 224] float32: the Palette Inception-Score input for the Places365 ResNet-50."""
    return _pil_transform(crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)(open_rgb(path))


def upsample_for_inception(x: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of a batch [N, 3, H, W] to [N, 3, 299, 299], as ``nn.Upsample``."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(x.shape)}")
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
