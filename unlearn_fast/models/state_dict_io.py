"""Reading checkpoint files and strict state-dict loading with one readable error, for every family."""
from __future__ import annotations

import argparse
import os
from typing import Mapping

import torch
from torch import nn


def read_checkpoint(path: str):
    """torch.load with weights_only=True; ``argparse.Namespace`` (pickled by official MAGE checkpoints)
    is allow-listed. On a torch without allow-lists (< 2.4) the file is loaded with weights_only=False:
    only do that for files you trust (the official releases)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    ser = torch.serialization
    try:
        if hasattr(ser, "safe_globals"):
            with ser.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        if hasattr(ser, "add_safe_globals"):
            ser.add_safe_globals([argparse.Namespace])
            return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=False)  # trusted official file, old torch
    except Exception as e:  # truncated file, not a torch file, a disallowed pickled global, ...
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {msg}") from None


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list:
    """Readable parts ("3 missing keys (a, b, c)", ...) describing how ``state`` differs from ``own``; [] if it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def head(xs):
        return ", ".join(xs[:8]) + (f", ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
    parts = [f"{len(xs)} {label} ({head(xs)})" for label, xs in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
    if missing and unexpected and all(k.startswith("module.") for k in unexpected):
        parts.append("the file's keys start with 'module.' (saved from a DDP-wrapped model): strip that prefix")
    return parts


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with one error listing missing, unexpected and mis-shaped keys.
    A module on the meta device (``with torch.device("meta"): create_model(...)``) is loaded with
    ``assign=True``: it ends up holding the file's tensors (cast to its own dtypes), with its own
    ``requires_grad`` flags."""
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{what}: not a state dict of tensors")
    own = module.state_dict()
    parts = state_dict_mismatch(own, state)
    if parts:
        raise ValueError(f"{what} does not fit {type(module).__name__}: " + "; ".join(parts))
    # a model built on the meta device takes the file's tensors (assign) instead of copying into nothing; they
    # are cast to the model's dtypes first, as a copy into a materialised model would (an fp16 file must not
    # give fp16 master weights)
    assign = any(t.is_meta for t in own.values())
    if assign:
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
