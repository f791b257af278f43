"""Reading checkpoint files and strict state-dict loading with one readable error, for every family."""
from __future__ import annotations

import argparse
import os
import re
import warnings
from typing import Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, truncated or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (both a CheckpointError and a FileNotFoundError)."""


def _allowed_globals() -> list:
    """Non-tensor types that checkpoints in the wild pickle and that are safe to rebuild: the reference's
    ``argparse.Namespace`` args, and numpy scalars / arrays / dtypes (older trainers store e.g. ``np.float64``
    values in their args or metrics)."""
    allowed = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of torchvision
        return allowed
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    multiarray = getattr(core, "multiarray", None)
    allowed += [np.ndarray, np.dtype]
    allowed += [f for f in (getattr(multiarray, "scalar", None), getattr(multiarray, "_reconstruct", None)) if f]
    allowed += sorted({type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                   np.float16, np.float32, np.float64)}, key=str)
    return allowed


def _unsafe_globals(path: str) -> list:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in _allowed_globals()}
        return [g for g in finder(path) if g not in allowed]
    except Exception:  # not a zip checkpoint, or unreadable: the caller's message stands
        return []


def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header (``{``) that fits the file
    (torch files start with ``PK`` (zip) or a pickle opcode)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8)


def _read_safetensors(path: str) -> dict:
    # torch.load reads safetensors itself only in newer releases (2.14 here, not 2.11): one reader for all
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"cannot read {path!r}: it is a safetensors file and the safetensors package is not "
                              "installed (pip install safetensors)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        detail = (str(e).strip().splitlines() or ["(no detail)"])[0][:300]
        raise CheckpointError(f"cannot read safetensors file {path!r} (truncated or corrupt?): "
                              f"{type(e).__name__}: {detail}") from None


def read_checkpoint(path: str):
    """``torch.load(weights_only=True)`` on the CPU, allowing the ``argparse.Namespace`` official files pickle
    and numpy values (see ``_allowed_globals``); a safetensors file (the trained parameters a run writes beside
    its checkpoints) is read as its dict of tensors. The one reader of every checkpoint (models, unlearning runs,
    Palette states). CheckpointNotFoundError for a missing file, CheckpointError naming the file otherwise."""
    if path and os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not path or not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path!r}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            # a plain pickle (not a torch file) makes torch warn about its protocol before it fails: the error
            # below says what the file is, a warning with a source line would read like a traceback
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if hasattr(torch.serialization, "safe_globals"):
                with torch.serialization.safe_globals(_allowed_globals()):
                    return torch.load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True)  # torch < 2.5
    except Exception as e:
        # zip checkpoints are scanned for every unsafe global; the legacy (non-zip) format, or a torch without the
        # scanner, names the first one in the error ("... GLOBAL posix.system ...")
        unsafe = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]
        if unsafe:
            raise CheckpointError(f"cannot read checkpoint {path!r}: it pickles objects that are not loaded for "
                                  "safety (only tensors, plain values, argparse.Namespace and numpy values are): "
                                  f"{', '.join(unsafe[:5])}; re-save its 'model' state dict alone") from None
        detail = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or ["(no detail)"])[0])[:300]
        if detail.startswith("Weights only load failed"):  # torch's advice to load unsafely does not apply
            detail = "its pickled content is not a checkpoint dictionary of tensors and plain values"
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated, empty or not a torch file?): "
                              f"{type(e).__name__}: {detail}") from None


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
