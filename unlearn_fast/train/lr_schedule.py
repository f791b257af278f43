"""Per-iteration learning rate: linear warmup, then a half-cosine to min_lr (the reference's lr_sched)."""
from __future__ import annotations

import math


def effective_batch_size(batch_size: int, accum_iter: int, world_size: int) -> int:
    return batch_size * accum_iter * world_size


def base_lr(lr, blr: float, eff_batch: int) -> float:
    """``lr`` if given, else ``blr · eff_batch / 256``."""
    return float(lr) if lr is not None else blr * eff_batch / 256


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """lr at fractional epoch ``epoch`` (= step / steps_per_epoch + epoch index)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def set_lr(optimizer, value: float) -> None:
    """Write ``value`` into every param group (as a tensor in place when the group's lr is a tensor,
    which keeps a captured CUDA graph valid)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if hasattr(lr, "fill_"):
            lr.fill_(value)
        else:
            group["lr"] = value
