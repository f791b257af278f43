"""Run a per-batch function of a model over many images in chunks, in eval mode, on the model's device."""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn


@torch.no_grad()
def apply_in_chunks(model: nn.Module, images: torch.Tensor, task, fn: Callable, chunk: int) -> List[torch.Tensor]:
    """``[fn(model, images[rows], task.select(rows)) for each chunk of rows]``, inputs moved to the model's device,
    the model in eval mode during the calls (its mode is restored after). ``task``: a TaskDraw for the N rows."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for lo in range(0, images.shape[0], chunk):
            rows = torch.arange(lo, min(lo + chunk, images.shape[0]))
            out.append(fn(model, images[rows].to(dev), task.select(rows).to(dev)))
        return out
    finally:
        model.train(was_training)
