"""A small plain MAE pretraining loop, and a disk cache of its result keyed by the configuration.

The demo needs a model that reconstructs real images (a model that only predicts the mean image has
nothing to forget), trained once and reused. The loop is MAE's own objective (pixel MSE on the hidden
patches), AdamW(0.9, 0.95) with weight decay on >=2-D weights, linear warmup then a half-cosine, every
random draw (batch order, mask noise) from generators seeded by ``seed``.

    model = create_model("mae_micro")
    losses = pretrain_mae(model, images, steps=8000, batch_size=32, lr=1.5e-3)   # images [N, C, H, W] in [0, 1]
    cfg = PretrainConfig(model="mae_micro", steps=8000)
    model, info = load_or_pretrain_mae(cfg, images, cache_dir="~/.cache/unlearn_fast")  # trained once, then loaded
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..atomic_files import OutputWriteError, atomic_save
from ..models import create_model
from .lr_schedule import lr_at, set_lr
from .optimizer import build_adamw
from .progress import progress_bar
from .seeding import derive_seed

_CACHE_FORMAT = 1  # bump when the loop changes what a given config trains


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides the pretrained weights (the cache key hashes all of it plus the data)."""
    model: str = "mae_micro"
    # 8000 steps of batch 32 (~57 passes over 4,500 digits, ~6 min on 2 CPU cores) reach a held-out inpainting
    # error of ~0.025 (the mean image: ~0.05); 4000 steps stop at ~0.033, 1500 at ~0.046
    steps: int = 8000
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_steps: int = 300
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    # half the encoder width, as MAE's decoders are narrower than their encoders: ~35-45 vs ~62-68 ms per step
    # of batch 32 on 2 CPU cores; 8000 steps at width 64 reconstruct as well as 6000 at width 128
    decoder_embed_dim: Optional[int] = 64    # None: the model's default width
    decoder_depth: Optional[int] = None      # None: the model's default depth
    seed: int = 0

    def model_kwargs(self) -> dict:
        kw = dict(mask_ratio=self.mask_ratio)
        if self.decoder_embed_dim is not None:
            kw["decoder_embed_dim"] = self.decoder_embed_dim
        if self.decoder_depth is not None:
            kw["decoder_depth"] = self.decoder_depth
        return kw

    def check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"pretraining steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"pretraining batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("pretraining lr must be > 0 and min_lr, weight_decay, warmup_steps >= 0")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")


def pretrain_mae(model: nn.Module, images: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 1.5e-3,
                 min_lr: float = 1e-5, warmup_steps: int = 300, weight_decay: float = 0.05, seed: int = 0,
                 device="cpu", progress: bool = True, log_every: int = 50) -> List[float]:
    """Train ``model`` in place on ``images [N, C, H, W]`` (in the model's input range) for ``steps``
    AdamW steps of ``batch_size`` rows. Batches walk a fresh seeded permutation per pass over the data.
    Returns the mean training loss of every ``log_every`` steps."""
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor [N, C, H, W]")
    if images.shape[0] < batch_size:
        raise ValueError(f"{images.shape[0]} images cannot fill one batch of {batch_size}")
    device = torch.device(device)
    model.to(device).train()
    data = images.to(device)  # [N, C, H, W]: the whole set lives in memory
    opt = build_adamw([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr, weight_decay, device)
    mask_gen = torch.Generator().manual_seed(derive_seed(seed, "pretrain", "masks"))
    per_pass = data.shape[0] // batch_size
    order = None
    bar = progress_bar(steps, progress, "pretrain MAE")
    history, pending = [], torch.zeros((), device=device)
    for step in range(steps):
        if step % per_pass == 0:  # a new pass: new seeded order (the last partial batch is dropped)
            g = torch.Generator().manual_seed(derive_seed(seed, "pretrain", "order", step // per_pass))
            order = torch.randperm(data.shape[0], generator=g)
        rows = order[(step % per_pass) * batch_size:(step % per_pass + 1) * batch_size].to(device)
        batch = data.index_select(0, rows)  # [B, C, H, W]
        set_lr(opt, lr_at(step, lr, min_lr, warmup_steps, steps))
        task = model.sample_task(batch, mask_gen)
        loss, _, _ = model(batch, task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pending += loss.detach()
        if (step + 1) % log_every == 0 or step == steps - 1:
            n = (step % log_every) + 1
            value = pending.item() / n  # one host sync per log_every steps
            pending.zero_()
            if not value == value or value in (float("inf"), float("-inf")):
                raise FloatingPointError(f"pretraining loss became non-finite near step {step}")
            history.append(value)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return history


def data_fingerprint(images: torch.Tensor) -> str:
    """A short hash of the training images (shape, dtype and bytes), so other data rebuilds the cache."""
    x = images.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=10)
    h.update(repr((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


def cache_key(config: PretrainConfig, images: torch.Tensor) -> Tuple[dict, str]:
    """(the full key dict stored next to the weights, its 16-hex-digit hash used in the file name)."""
    key = dict(dataclasses.asdict(config), data=data_fingerprint(images), format=_CACHE_FORMAT)
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return key, digest


def cache_path(config: PretrainConfig, images: torch.Tensor, cache_dir) -> Path:
    _, digest = cache_key(config, images)
    return Path(os.path.expanduser(str(cache_dir))) / f"pretrain_{config.model}_{digest}.pth"


def state_checksum(state: dict) -> str:
    """A hash of a state dict's names, shapes, dtypes and bytes: torch.load checks no CRC, so flipped bytes in a
    cached file would otherwise load as silently wrong weights."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_cached_state(blob) -> dict:
    """The state dict of a cache blob; ValueError when its checksum (files written before checksums had none)
    does not match or a floating tensor holds NaN/inf."""
    state = blob["model"]
    if "checksum" in blob and blob["checksum"] != state_checksum(state):
        raise ValueError("checksum mismatch (corrupt file)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite values in {bad[:3]}")
    return state


def _load_cached(path: Path, key: dict, model: nn.Module) -> bool:
    """Load ``path`` into ``model`` when its key matches. On False the model may hold some loaded tensors (a
    failed load_state_dict copies what fits): the caller starts from a fresh model."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("config") != key:
            return False
        model.load_state_dict(check_cached_state(blob))
        return True
    except Exception as e:  # a truncated, corrupt or foreign file: say so and rebuild it
        print(f"unlearn_fast: ignoring unreadable pretraining cache {path} ({type(e).__name__}: {e})")
        return False


def _initial_model(config: PretrainConfig) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
        torch.manual_seed(derive_seed(config.seed, "pretrain", "init"))
        return create_model(config.model, **config.model_kwargs())


def load_or_pretrain_mae(config: PretrainConfig, images: torch.Tensor, cache_dir=None, device="cpu",
                         rebuild: bool = False, progress: bool = True) -> Tuple[nn.Module, dict]:
    """The pretrained model for ``config`` on ``images``: loaded from ``cache_dir`` when a file with the same
    key exists (and its checksum, when it has one, matches), else trained and saved there as
    ``{"model": state_dict, "config": key, "steps": n, "checksum": state_checksum(state_dict)}``.
    ``cache_dir=None`` or ``rebuild=True`` trains anew (``rebuild`` still writes the cache).
    Returns (model in eval mode on ``device``, info dict: path, loaded, seconds, final_loss)."""
    config.check()
    key, _ = cache_key(config, images)
    path = cache_path(config, images, cache_dir) if cache_dir is not None else None
    info = {"path": str(path) if path else None, "loaded": False, "seconds": 0.0, "final_loss": None}
    if path is not None and not rebuild and path.is_file():
        model = _initial_model(config)
        if _load_cached(path, key, model):
            info["loaded"] = True
            return model.to(device).eval(), info
    model = _initial_model(config)  # fresh: a failed load may have copied some tensors into the other one
    t0 = time.perf_counter()
    history = pretrain_mae(model, images, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                           min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                           weight_decay=config.weight_decay, seed=config.seed, device=device, progress=progress)
    info.update(seconds=time.perf_counter() - t0, final_loss=history[-1])
    if path is not None:
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"model": state, "config": key, "steps": config.steps, "checksum": state_checksum(state)},
                        str(path))
        except (OSError, OutputWriteError) as e:  # read-only home: keep going without the cache
            print(f"unlearn_fast: could not write the pretraining cache {path} ({e})")
            info["path"] = None
    return model.eval(), info


__all__ = ["PretrainConfig", "pretrain_mae", "load_or_pretrain_mae", "cache_key", "cache_path",
           "data_fingerprint", "state_checksum", "check_cached_state"]
