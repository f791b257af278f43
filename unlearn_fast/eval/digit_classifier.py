"""A small CNN that recognises the demo's digits: the feature extractor and judge of the demo's domain metrics.

Inception-v3 and CLIP (the paper's metric networks) know nothing of 32x32 MNIST digits and need weights we
may not download, so the demo measures its generated digits with this classifier instead, trained once on
the bundled 5,000 MNIST digits (:mod:`unlearn_fast.train.digits`) and cached.

Architecture (input [N, C, 32, 32] in [0, 1], C = 1 or 3; channels are averaged to grey first, so colour
casts in a reconstruction do not change the verdict):

    conv5x5(1->8) ReLU maxpool2 -> conv5x5(8->16) ReLU maxpool2 -> flatten [N, 400]   (LeNet-like)
    -> linear(400->128) = features  -> ReLU -> linear(128->10) = logits

``features`` is the pre-activation of the penultimate layer (never all-zero, so its cosine is defined).
Training: the digits minus ``holdout_per_class`` held-out images per digit, chosen exactly as
``split_digits(digits, ..., holdout_per_class, seed)`` chooses them (the choice does not depend on the
forget digits), so a classifier made with the demo's ``--seed``/``--holdout_per_class`` never saw the
demo's held-out images. Adam, random shifts of up to 2 pixels, seeded order/shifts/initialisation.

    clf = load_or_train_digit_classifier()          # trained once (~10 s on 2 CPU cores), then loaded
    clf.probs(x)     # [N, 10]     clf.features(x)  # [N, 128]     clf.embed(x)  # [N, 128], unit rows
    clf.train_info   # {"heldout_accuracy": ..., "train_seconds": ..., "path": ..., "loaded": ...}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_files import OutputWriteError, atomic_save
from ..train.digits import cache_dir as default_cache_dir
from ..train.digits import images_from_pixels, load_digits_5k, split_digits
from ..train.pretrain_mae import check_cached_state, state_checksum
from ..train.seeding import derive_seed

IMAGE_SIDE = 32
NUM_CLASSES = 10
_CACHE_FORMAT = 1  # bump when the architecture or the training loop changes what a config trains
_EVAL_CHUNK = 512  # rows per forward pass in features/probs/embed
_PIXEL_MEAN, _PIXEL_STD = 0.1, 0.3  # about the digits' grey-level mean/std on the 32x32 canvas


@dataclass(frozen=True)
class DigitClassifierConfig:
    """Everything that decides the trained weights (the cache key hashes all of it plus the data)."""
    seed: int = 0
    holdout_per_class: int = 50
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2
    embed_dim: int = 128

    def check(self) -> None:
        for name in ("epochs", "batch_size", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"digit classifier {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_shift, int) or not 0 <= self.max_shift <= 4:
            raise ValueError(f"max_shift must be an integer in [0, 4], got {self.max_shift!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


class DigitClassifier(nn.Module):
    """The CNN above. ``forward`` gives logits with autograd; ``features``/``probs``/``embed`` are no-grad
    evaluation helpers that take any batch size, move it to the model's device and return float32 there."""

    def __init__(self, embed_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc_embed = nn.Linear(16 * 5 * 5, embed_dim)
        self.fc_out = nn.Linear(embed_dim, NUM_CLASSES)
        self.embed_dim = embed_dim
        self.train_info: dict = {}

    @staticmethod
    def check_images(x) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"digit images must be a float tensor [N, C, 32, 32], got {type(x).__name__}"
                            + (f" of {x.dtype}" if torch.is_tensor(x) else ""))
        if x.ndim != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(f"digit images must be [N, 1 or 3, {IMAGE_SIDE}, {IMAGE_SIDE}] in [0, 1], "
                             f"got shape {tuple(x.shape)}")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().mean(dim=1, keepdim=True) - _PIXEL_MEAN) / _PIXEL_STD  # [N, 1, 32, 32]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [N, 8, 14, 14]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [N, 16, 5, 5]
        return self.fc_embed(x.flatten(1))  # [N, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.fc_out(F.relu(self._features(x)))

    @torch.no_grad()
    def _chunked(self, x: torch.Tensor, fn) -> torch.Tensor:
        self.check_images(x)
        if x.shape[0] == 0:
            raise ValueError("no images to classify")
        was_training = self.training
        self.eval()
        try:
            dev = self.fc_out.weight.device
            return torch.cat([fn(x[i:i + _EVAL_CHUNK].to(dev)) for i in range(0, x.shape[0], _EVAL_CHUNK)])
        finally:
            self.train(was_training)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, F] (pre-activation)."""
        return self._chunked(x, self._features)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, 10] (softmax of the logits)."""
        return self._chunked(x, lambda c: torch.softmax(self.forward(c), dim=-1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised features [N, F]."""
        return F.normalize(self.features(x), dim=-1)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image rolled by its own (dy, dx) in [-max_shift, max_shift]; the 2-pixel black border of the
    32x32 canvas plus MNIST's own margin means nothing of the digit wraps around."""
    if max_shift == 0:
        return x
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=generator)  # [B, 2]
    return torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(-2, -1)) for img, (dy, dx) in zip(x, shifts)])


def train_digit_classifier(config: DigitClassifierConfig, images: torch.Tensor, digits: torch.Tensor,
                           device="cpu") -> DigitClassifier:
    """Train a fresh classifier on ``images [N, C, 32, 32]`` in [0, 1] with labels ``digits [N]``."""
    config.check()
    DigitClassifier.check_images(images)
    digits = torch.as_tensor(digits, dtype=torch.long)
    if digits.shape != (images.shape[0],):
        raise ValueError(f"digits must be [N] = [{images.shape[0]}], got shape {tuple(digits.shape)}")
    if images.shape[0] < config.batch_size:
        raise ValueError(f"{images.shape[0]} images cannot fill one batch of {config.batch_size}")
    with torch.random.fork_rng(devices=[]):  # initial weights depend on the seed only
        torch.manual_seed(derive_seed(config.seed, "digit_classifier", "init"))
        model = DigitClassifier(config.embed_dim)
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    per_epoch = images.shape[0] // config.batch_size
    total = config.epochs * per_epoch
    shift_gen = torch.Generator().manual_seed(derive_seed(config.seed, "digit_classifier", "shift"))
    step = 0
    for epoch in range(config.epochs):
        g = torch.Generator().manual_seed(derive_seed(config.seed, "digit_classifier", "order", epoch))
        order = torch.randperm(images.shape[0], generator=g)
        for b in range(per_epoch):
            rows = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = _random_shift(images[rows, :1], config.max_shift, shift_gen).to(device)  # [B, 1, 32, 32]
            for group in opt.param_groups:  # cosine decay to 0: a stable end point without tuning epochs
                group["lr"] = 0.5 * config.lr * (1 + np.cos(np.pi * step / total))
            loss = F.cross_entropy(model(x), digits[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


def accuracy(model: DigitClassifier, images: torch.Tensor, digits) -> float:
    """Fraction of ``images`` whose most probable class is the digit."""
    pred = model.probs(images).argmax(dim=-1).cpu()
    return float((pred == torch.as_tensor(digits, dtype=torch.long).cpu()).double().mean())


def _digits_split(config: DigitClassifierConfig, cache_dir=None, use_cache: bool = True):
    """(train images, train digits, held-out images, held-out digits) of the bundled digits (their parsed copy
    cached as the classifier is: under ``cache_dir``, or nowhere without ``use_cache``)."""
    raw, digits = load_digits_5k(cache_dir, use_cache=use_cache)  # uint8 [5000, 28, 28], int64 [5000]
    split = split_digits(digits, [0], config.holdout_per_class, seed=config.seed)  # holdout ignores the forget set
    images = images_from_pixels(raw, IMAGE_SIDE)[:, :1]  # [5000, 1, 32, 32]: grey is all the model reads
    tr, ho = torch.from_numpy(split.train), torch.from_numpy(split.holdout)
    labels = torch.from_numpy(digits)
    fingerprint = hashlib.blake2b(raw.tobytes() + digits.tobytes(), digest_size=10).hexdigest()
    return images[tr], labels[tr], images[ho], labels[ho], fingerprint


def cache_key(config: DigitClassifierConfig, data_fingerprint: str) -> tuple[dict, str]:
    """(the key dict stored next to the weights, its 16-hex-digit hash used in the file name)."""
    key = dict(dataclasses.asdict(config), data=data_fingerprint, format=_CACHE_FORMAT)
    return key, hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()


def _load_cached(path: Path, key: dict, model: DigitClassifier) -> Optional[dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("config") != key:
            return None
        model.load_state_dict(check_cached_state(blob))
        return dict(blob.get("info", {}))
    except Exception as e:  # truncated, corrupt or foreign file: say so and rebuild it
        print(f"unlearn_fast: ignoring unreadable digit-classifier cache {path} ({type(e).__name__}: {e})")
        return None


def load_or_train_digit_classifier(cache_dir=None, seed: int = 0, device="cpu", *, holdout_per_class: int = 50,
                                   use_cache: bool = True, rebuild: bool = False,
                                   config: Optional[DigitClassifierConfig] = None) -> DigitClassifier:
    """The digit classifier for ``seed``/``holdout_per_class``, in eval mode on ``device``.

    Loaded from ``<cache_dir>/digit_classifier_<hash>.pth`` (default dir: ``digits.cache_dir()``) when the
    stored key matches, else trained on the CPU (one thread; ``device`` only says where the returned model
    lives), its held-out accuracy measured, and written atomically. ``use_cache=False`` neither reads nor
    writes; ``rebuild=True`` trains anew and overwrites. ``config`` overrides the training recipe (``seed``
    and ``holdout_per_class`` then come from it). ``model.train_info`` holds heldout_accuracy,
    train_seconds, train_images, heldout_images, path (None if not cached), loaded.
    """
    if config is None:
        config = DigitClassifierConfig(seed=int(seed), holdout_per_class=int(holdout_per_class))
    config.check()
    train_x, train_y, held_x, held_y, fingerprint = _digits_split(config, cache_dir, use_cache)
    key, digest = cache_key(config, fingerprint)
    path = default_cache_dir(cache_dir) / f"digit_classifier_{digest}.pth"
    model = DigitClassifier(config.embed_dim)
    info = _load_cached(path, key, model) if use_cache and not rebuild and path.is_file() else None
    if info is not None:
        model.train_info = dict(info, path=str(path), loaded=True)
        return model.to(device).eval()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # Always on the CPU, so the cached weights do not depend on where they were made; one thread because
    # tiny convolutions gain nothing from more, and on a busy machine OpenMP spin-waiting makes them
    # several times slower (measured: 9 ms vs 31 ms per step on a loaded 2-core box).
    torch.set_num_threads(1)
    try:
        model = train_digit_classifier(config, train_x, train_y, device="cpu")
    finally:
        torch.set_num_threads(threads)
    info = {"train_seconds": time.perf_counter() - t0, "train_images": int(train_x.shape[0]),
            "heldout_images": int(held_x.shape[0]),
            "heldout_accuracy": accuracy(model, held_x, held_y) if held_x.shape[0] else None}
    stored = None
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
            atomic_save({"model": state, "config": key, "info": info, "checksum": state_checksum(state)}, str(path))
            stored = str(path)
        except (OSError, OutputWriteError) as e:  # read-only home: keep going without the cache
            print(f"unlearn_fast: could not write the digit-classifier cache {path} ({e})")
    model.train_info = dict(info, path=stored, loaded=False)
    return model.to(device).eval()


__all__ = ["DigitClassifier", "DigitClassifierConfig", "load_or_train_digit_classifier", "train_digit_classifier",
           "accuracy", "cache_key"]
