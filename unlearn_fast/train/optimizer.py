"""AdamW(0.9, 0.95) with weight decay on every trainable param except 1-D ones and names ending ``.bias``
(timm 0.3.2 ``add_weight_decay``, which the reference calls)."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import nn

BETAS = (0.9, 0.95)


def param_groups_weight_decay(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float):
    """[no-decay group, decay group], as timm 0.3.2: its test is ``len(shape) == 1``, so a 0-d param DOES
    decay (newer timm's ``ndim <= 1`` would not). Frozen params are left out."""
    decay, no_decay = [], []
    for item in named_params:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("param_groups_weight_decay takes (name, parameter) pairs, e.g. model.named_parameters(); "
                            f"got an item of type {type(item).__name__}")
        name, p = item
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_adamw(named_params, lr: float, weight_decay: float, device: torch.device, fast: bool = False,
                capturable: bool = False) -> torch.optim.AdamW:
    """The reference optimizer. ``fast`` uses the fused CUDA kernel (one launch for all params);
    ``capturable`` keeps lr and step on the device so the update can live in a CUDA graph."""
    device = torch.device(device)  # a name such as "cpu" or "cuda:0" too
    groups = param_groups_weight_decay(named_params, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: nothing to unlearn")
    kwargs = {}
    if fast and device.type == "cuda":
        kwargs["fused"] = True
        if capturable:
            kwargs["capturable"] = True
            lr = torch.tensor(lr, dtype=torch.float32, device=device)
    elif device.type == "cuda":
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=1e-8, **kwargs)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s factor for gradients of global L2 norm ``total_norm`` (a device tensor: no sync):
    ``min(max_norm / (total_norm + 1e-6), 1)``. The fast updates that scale the gradients inside another pass use
    it (folded_clip.py, half_student.py)."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
