"""Places-365 data for Palette unlearning (REFERENCE.md §4.3): class split, file selection, datasets.

    classes = read_class_list("datasets/place365/flist/class.txt")   # 365 lines, "/b/badlands", ...
    items = select_places365_train(data_root, classes, number_img_per_class=5000, seed=0)
    ds = PaletteTrainDataset(items, image_size=(256, 256), seed=0)
    ds.set_epoch(1)
    sample, label = ds[0]   # {'gt_image', 'cond_image', 'mask_image', 'mask', 'path'}, +1.0 retain / -1.0 forget

Layout: ``<data_root>/train_256/<class>/*.jpg`` and ``<data_root>/val_256/<class>/*.jpg``, where ``<class>`` is
the class-list line without its leading ``/`` (``/d/desert/sand`` -> ``train_256/d/desert/sand``).
Split by line number of the class list: retain = lines 0–49, forget = lines 50–99, proxy = lines 100–end.

Deliberate differences from the reference (§11), each for reproducibility:
- per class, the files are sorted and then shuffled with a Random seeded from (seed, class) before the first
  ``number_img_per_class`` are taken; the reference takes the first ones of an unsorted ``glob`` (file-system
  order, so different machines train on different subsets). The test set takes the first ones in sorted order.
- the hybrid mask and the N(0, 1) filling of the hole are drawn from generators seeded by (seed, epoch, index)
  instead of each worker's global state.
- a missing class folder is an error (the reference's glob silently yields nothing).
Files ending in .jpg/.jpeg/.png/.bmp/.webp are taken (the reference globs ``*.jpg`` only).
"""
from __future__ import annotations

import os
import random
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ..models.palette_masks import center_mask, hybrid_mask, inpaint_condition
from .data_split import list_images
from .image_datasets import load_rgb_image
from .seeding import derive_seed

RETAIN_LINES = (0, 50)     # class-list lines [0, 50)
FORGET_LINES = (50, 100)   # [50, 100)
PROXY_FIRST_LINE = 100     # [100, end): 265 classes in the reference list
PALETTE_RETAIN_LABEL, PALETTE_FORGET_LABEL = 1.0, -1.0
# the reference datasets' defaults for number_img_per_class
DEFAULT_IMAGES_PER_CLASS = {"ForgetInpaintDataset": 5000, "OpenForgetInpaintDataset": 200,
                            "TestForgetInpaintDataset": 100}

Item = Tuple[str, float]


class PlacesClassSplit(NamedTuple):
    retain: List[str]
    forget: List[str]
    proxy: List[str]


def read_class_list(path: str) -> List[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped; a trailing index column dropped)."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"class list not found: {path!r} (the reference's datasets/place365/flist/class.txt; "
                         "pass --class_list)")
    names = []
    try:  # -sig: a byte-order mark would glue onto the first class, whose images would then match nothing
        with open(path, encoding="utf-8-sig") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"class list {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class list {path} repeats class names: {', '.join(dup[:5])}")
    return names


def places365_class_split(class_names: Sequence[str]) -> PlacesClassSplit:
    """Retain = lines 0–49, forget = lines 50–99, proxy = lines 100–end (REFERENCE.md §4.3)."""
    names = list(class_names)
    if len(names) < FORGET_LINES[1]:
        raise ValueError(f"the class list has {len(names)} lines; the Places-365 split needs at least "
                         f"{FORGET_LINES[1]} (retain = lines 0-49, forget = lines 50-99)")
    return PlacesClassSplit(names[slice(*RETAIN_LINES)], names[slice(*FORGET_LINES)], names[PROXY_FIRST_LINE:])


def class_folder(root: str, split_dir: str, class_name: str) -> str:
    """``<root>/<split_dir>/<class without the leading '/'>``, as the reference's ``name[1:]``."""
    return os.path.join(root, split_dir, *class_name.lstrip("/").split("/"))


def _check_root(root: str, split_dir: str) -> None:
    if not root or not os.path.isdir(root):
        raise ValueError(f"data_root {root!r} does not exist or is not a folder")
    if not os.path.isdir(os.path.join(root, split_dir)):
        raise ValueError(f"data_root {root!r} has no {split_dir}/ folder "
                         f"(expected <data_root>/{split_dir}/<class>/*.jpg)")


def _images_per_class(root: str, split_dir: str, classes: Sequence[str], count: int,
                      seed: Optional[int]) -> List[str]:
    """The first ``count`` files of each class in class order: sorted then seeded-shuffled (seed None: sorted)."""
    if count < 1:
        raise ValueError(f"number_img_per_class must be >= 1, got {count}")
    missing = [c for c in classes if not os.path.isdir(class_folder(root, split_dir, c))]
    if missing:
        raise ValueError(f"{len(missing)} class folder(s) missing under {os.path.join(root, split_dir)}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    out = []
    for c in classes:
        files = list_images(class_folder(root, split_dir, c))
        if seed is not None:
            random.Random(derive_seed(seed, "places365", c)).shuffle(files)
        out += files[:count]
    return out


def select_places365_train(root: str, class_names: Sequence[str], number_img_per_class: int = 5000,
                           seed: int = 0, open_proxy: bool = False) -> List[Item]:
    """Training items ``[(path, ±1.0)]``: retain (+1) then forget (−1).

    ``open_proxy=False`` (``ForgetInpaintDataset``): retain = the 50 retain classes, truncated to |forget|.
    ``open_proxy=True`` (``OpenForgetInpaintDataset``): retain = the proxy classes (lines 100–end), not truncated.
    """
    _check_root(root, "train_256")
    split = places365_class_split(class_names)
    if open_proxy and not split.proxy:
        raise ValueError("the open (proxy) variant needs class-list lines beyond line 100 (the proxy classes)")
    forget = _images_per_class(root, "train_256", split.forget, number_img_per_class, seed)
    retain = _images_per_class(root, "train_256", split.proxy if open_proxy else split.retain,
                               number_img_per_class, seed)
    if not open_proxy:
        retain = retain[:len(forget)]
    if not forget:
        raise ValueError(f"no forget images found under {os.path.join(root, 'train_256')}")
    return [(p, PALETTE_RETAIN_LABEL) for p in retain] + [(p, PALETTE_FORGET_LABEL) for p in forget]


def select_places365_test(root: str, class_names: Sequence[str], number_img_per_class: int = 100) -> List[Item]:
    """Test items: the first ``number_img_per_class`` (sorted) of each class in ``val_256``; forget (−1) first,
    then retain (+1), as ``TestForgetInpaintDataset``."""
    _check_root(root, "val_256")
    split = places365_class_split(class_names)
    forget = _images_per_class(root, "val_256", split.forget, number_img_per_class, None)
    retain = _images_per_class(root, "val_256", split.retain, number_img_per_class, None)
    if not forget and not retain:
        raise ValueError(f"no test images found under {os.path.join(root, 'val_256')}")
    return [(p, PALETTE_FORGET_LABEL) for p in forget] + [(p, PALETTE_RETAIN_LABEL) for p in retain]


def load_palette_image(path: str, image_size: Tuple[int, int]) -> torch.Tensor:
    """Resize((H, W)) -> ToTensor -> Normalize(0.5, 0.5): ``[3, H, W]`` float32 in [−1, 1]."""
    image = TF.resize(load_rgb_image(path), list(image_size))  # bilinear, as transforms.Resize on PIL
    return TF.normalize(TF.to_tensor(image), [0.5] * 3, [0.5] * 3)


class PaletteInpaintDataset(Dataset):
    """``[(path, label)]`` -> (sample dict, label) with the reference's keys. ``mask_mode``: ``hybrid`` (a fresh
    seeded mask per (seed, epoch, index)) or ``center`` (the test hole, side ``int(size·mask_ratio)``)."""

    def __init__(self, items: Sequence[Item], image_size=(256, 256), seed: int = 0, mask_mode: str = "hybrid",
                 mask_ratio: float = 0.5):
        items = [(str(p), float(lab)) for p, lab in items]
        if not items:
            raise ValueError("a Palette dataset needs at least one image")
        if mask_mode not in ("hybrid", "center"):
            raise ValueError(f"mask_mode {mask_mode!r} is not supported; use 'hybrid' (train) or 'center' (test)")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        self.items, self.image_size, self.seed, self.epoch = items, (h, w), int(seed), 0
        self.mask_mode, self.mask_ratio = mask_mode, float(mask_ratio)
        self._center = center_mask((h, w), mask_ratio) if mask_mode == "center" else None  # [1, H, W]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's masks and hole noise (call before creating the epoch's DataLoader iterator)."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> List[float]:
        return [lab for _, lab in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def mask_for(self, index: int) -> torch.Tensor:
        if self._center is not None:
            return self._center.clone()
        return hybrid_mask(np.random.default_rng(derive_seed(self.seed, "palette_mask", self.epoch, index)),
                           self.image_size)

    def __getitem__(self, index: int):
        index = range(len(self.items))[index]
        path, label = self.items[index]
        gt = load_palette_image(path, self.image_size)  # [3, H, W]
        mask = self.mask_for(index)  # [1, H, W], 1 = hole
        g = torch.Generator().manual_seed(derive_seed(self.seed, "palette_cond", self.epoch, index))
        sample = {"gt_image": gt, "cond_image": inpaint_condition(gt, mask, g), "mask_image": gt * (1.0 - mask) + mask,
                  "mask": mask, "path": os.path.basename(path)}
        return sample, label


__all__ = ["read_class_list", "places365_class_split", "PlacesClassSplit", "class_folder",
           "select_places365_train", "select_places365_test", "load_palette_image", "PaletteInpaintDataset",
           "DEFAULT_IMAGES_PER_CLASS", "PALETTE_RETAIN_LABEL", "PALETTE_FORGET_LABEL"]
