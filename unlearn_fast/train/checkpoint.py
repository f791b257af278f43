"""Checkpoints in the reference layout (REFERENCE.md §1.7, §11), written atomically.

``checkpoint-{epoch}.pth`` = ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` like the official
trainer, with ``args`` a plain dict so ``torch.load(weights_only=True)`` works, plus ``'unlearn_fast'``
(step position for exact resume). Beside it, the trained parameters alone as safetensors. Official
checkpoints that pickle an ``argparse.Namespace`` still load (allow-listed).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, Optional

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, truncated or does not fit the model."""


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint_file(path: str) -> dict:
    """``torch.load`` with weights_only, allowing the ``argparse.Namespace`` official files pickle."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch < 2.5
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated or not a torch file?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def model_state_from(ckpt: dict, path: str = "") -> dict:
    """The model state dict of a checkpoint: ``ckpt['model']`` or the dict itself."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {path!r} has no model state dict")
    return state


def load_model_state(model: nn.Module, state: dict, path: str = "", strict: bool = True) -> None:
    """Strict load with one readable message listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        def head(xs):
            return ", ".join(xs[:8]) + (f" … (+{len(xs) - 8})" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({head(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({head(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({head(shapes)})")
        raise CheckpointError(f"checkpoint {path!r} does not fit model {type(model).__name__}: " + "; ".join(parts)
                              + ". Is --model the architecture this checkpoint was trained with?")
    model.load_state_dict(state, strict=strict)


def args_as_dict(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v))
            for k, v in dict(args).items()}


def save_unlearn_checkpoint(output_dir: str, epoch: int, model: nn.Module, optimizer, scaler, args,
                            trainable_names, position: Optional[dict] = None, tag: Optional[str] = None) -> str:
    """``checkpoint-{tag or epoch}.pth`` + ``.safetensors`` of the trained parameters. Returns the .pth path."""
    name = f"checkpoint-{tag if tag is not None else epoch}"
    path = os.path.join(output_dir, name + ".pth")
    obj = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(epoch),
           "scaler": scaler.state_dict(), "args": args_as_dict(args),
           "unlearn_fast": dict(position or {})}
    atomic_save(obj, path)
    params = dict(model.named_parameters())
    atomic_save_safetensors({n: params[n] for n in trainable_names if n in params},
                            os.path.join(output_dir, name + ".safetensors"))
    return path
