"""``is_forget``: the per-row class of a batch, checked once for every op and loss.

True = forget (the reference's s = −1, dataset label −100). A bool tensor is the fast path (no check that
reads values). Integer tensors are accepted when they hold only 0 and 1; anything else (the reference's ±1
signs or ±100 labels) would silently turn every row into a forget row, so it is refused with the fix.
Floating-point masks are refused for the same reason.
"""
from __future__ import annotations

import torch

_HINT = "from the reference's labels use `labels < 100` (label -100 = forget), from signs s = ±1 use `s < 0`"


def forget_mask(is_forget, n: int, device, name: str = "is_forget") -> torch.Tensor:
    """``is_forget`` as a bool ``[n]`` tensor on ``device``. Integer input costs one host sync on a GPU."""
    if not torch.is_tensor(is_forget) or is_forget.dim() != 1 or is_forget.shape[0] != n:
        got = tuple(is_forget.shape) if torch.is_tensor(is_forget) else type(is_forget).__name__
        raise ValueError(f"{name} must be a tensor [N] with N = {n}, got {got}")
    if is_forget.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it has no values)")
    if is_forget.dtype == torch.bool:
        return is_forget.to(device)
    if is_forget.is_floating_point() or is_forget.is_complex():
        raise TypeError(f"{name} must be bool (True = forget), got {is_forget.dtype}; {_HINT}")
    if n and not bool(((is_forget == 0) | (is_forget == 1)).all()):
        bad = sorted({int(v) for v in is_forget[(is_forget != 0) & (is_forget != 1)].unique()[:4].tolist()})
        raise ValueError(f"{name} as an integer tensor must hold only 0 (retain) and 1 (forget), got {bad}; "
                         f"{_HINT}")
    return is_forget.to(device=device, dtype=torch.bool)


__all__ = ["forget_mask"]
