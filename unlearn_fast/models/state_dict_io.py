"""Reading checkpoint files and strict state-dict loading with one readable error, for every family."""
from __future__ import annotations

import argparse
import math
import os
import re
import warnings
from collections import Counter
from typing import Mapping, Optional

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
    if isinstance(path, os.PathLike):
        path = os.fspath(path)  # messages print the path, not PosixPath('...')
    if path and os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not path or not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is empty (0 bytes: an interrupted save "
                              "or copy?)")
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
        detail = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or ["(no detail)"])[0])
        detail = detail.split(". This is an internal")[0][:300]  # torch's generic advice after a zip error
        if detail.startswith("Weights only load failed"):  # torch's advice to load unsafely does not apply
            detail = "its pickled content is not a checkpoint dictionary of tensors and plain values"
        if "maximum supported version" in str(e):  # a newer torch's zip format
            raise CheckpointError(f"cannot read checkpoint {path!r}: it was written by a newer torch than this "
                                  f"one ({torch.__version__}); upgrade torch or re-save it there with "
                                  f"_use_new_zipfile_serialization=False ({detail})") from None
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated, empty or not a torch file?): "
                              f"{type(e).__name__}: {detail}") from None


# prefixes a wrapper adds to every key when the wrapped model's state_dict() is saved without unwrapping it
_WRAPPER_PREFIXES = {"module.": "DDP", "_orig_mod.": "torch.compile"}


def _wrapper_prefix(keys) -> str:
    """The chain of wrapper prefixes every one of ``keys`` starts with ('module._orig_mod.'), or ''."""
    keys, chain = [str(k) for k in keys], ""
    while keys:
        p = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(chain + p) for k in keys)), None)
        if p is None:
            break
        chain += p
    return chain


def _blocks_per_list(keys) -> dict:
    """{'blocks': 12, 'decoder_blocks': 8, ...}: entries of each numbered module list (up to its first index)."""
    found: dict = {}
    for k in keys:
        m = re.match(r"^(.*?)\.(\d+)\.", str(k))
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {name: len(idx) for name, idx in found.items()}


def _grid(n: int) -> str:
    """'1+16x16' for a table of 257 positions (cls + a square grid), '8x8' for 64, else ''."""
    for extra in (1, 0):
        g = math.isqrt(max(n - extra, 0))
        if g > 1 and g * g == n - extra:
            return f"{extra}+{g}x{g}" if extra else f"{g}x{g}"
    return ""


def _size_hints(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], mismatched: list) -> list:
    """Name the size a file was saved for: its depth and width, or its token grid (another image size)."""
    hints, pos = [], []
    for k in mismatched:  # position tables (and index buffers) whose token count alone differs
        same_rank = own[k].dim() == state[k].dim()
        dims = [d for d in range(own[k].dim()) if same_rank and own[k].shape[d] != state[k].shape[d]]
        if "pos" in k.lower() and len(dims) == 1 and (dims[0] < own[k].dim() - 1 or not own[k].is_floating_point()):
            pos.append((k, dims[0]))
    if pos:
        k, dim = pos[0]
        nf, nm = int(state[k].shape[dim]), int(own[k].shape[dim])
        gf, gm = _grid(nf), _grid(nm)
        if gf and gm:
            hints.append(f"position tables for {nf} = {gf} tokens in the file, {nm} = {gm} in the model "
                         "(another image or patch size)")
    pos = [k for k, _ in pos]
    depth_f, depth_m = _blocks_per_list(state), _blocks_per_list(own)
    sizes = [f"{name}: {depth_f[name]} in the file, {n} in the model" for name, n in depth_m.items()
             if name in depth_f and depth_f[name] != n]
    pairs = Counter((int(a), int(b)) for k in mismatched if k not in pos and state[k].dim() == own[k].dim()
                    for a, b in zip(state[k].shape, own[k].shape) if a != b)
    if pairs:
        (wf, wm), _ = pairs.most_common(1)[0]
        sizes.append(f"width {wf} in the file, {wm} in the model")
    if sizes:
        hints.append(f"the file is from another model size ({'; '.join(sizes)})")
    return hints


def _nested_prefix(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """'vqgan.' when every key of the model is in the file under that prefix (a larger model's checkpoint)."""
    first = next(iter(own), None)
    for key in (str(k) for k in state):
        if first is not None and key.endswith("." + first):
            prefix = key[:-len(first)]
            if all(prefix + k in state for k in own):
                return prefix
    return ""


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list:
    """Readable parts ("3 missing keys (a, b, c)", ...) describing how ``state`` differs from ``own``, with a
    diagnosis where one fits (wrapper prefix, another model or image size, a model nested in the file); []
    if it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]

    def head(xs):
        return ", ".join(xs[:8]) + (f", ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
    parts = [f"{len(xs)} {label} ({head(xs)})" for label, xs in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
    prefix = _wrapper_prefix(unexpected) if missing and unexpected else ""
    if prefix:
        saved_from = " + ".join(_WRAPPER_PREFIXES[p + "."] for p in prefix.rstrip(".").split("."))
        parts.append(f"the file's keys start with {prefix!r} (saved from a {saved_from}-wrapped model): "
                     "strip that prefix")
    elif missing and unexpected and _nested_prefix(own, state):
        parts.append(f"every key of the model is in the file under the prefix {_nested_prefix(own, state)!r} "
                     "(the checkpoint of a larger model that contains this one)")
    elif parts:
        parts += _size_hints(own, state, mismatched)
    return parts


def _describe(value) -> str:
    if isinstance(value, Mapping):
        return f"dict of {len(value)} entries"
    return type(value).__name__


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(ckpt, what: str) -> Mapping[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: the object itself when every value is a tensor, else its
    ``'model'`` (the reference's trainers) or ``'state_dict'`` (Lightning) entry. Anything else is one
    ValueError naming what the file holds (an EMA copy under another key is not taken silently)."""
    if _is_tensor_dict(ckpt):
        return ckpt
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{what}: holds a {type(ckpt).__name__}, expected a state dict")
    for key in ("model", "state_dict"):
        if _is_tensor_dict(ckpt.get(key)):
            return ckpt[key]
    other = [k for k, v in ckpt.items() if not torch.is_tensor(v)]
    held = ", ".join(f"{str(k)!r} ({_describe(ckpt[k])})" for k in other[:8]) + (", ..." if len(other) > 8 else "")
    nested = [str(k) for k, v in ckpt.items() if isinstance(v, Mapping) and v and _is_tensor_dict(v)]
    hint = (f"; its tensors are under {nested[0]!r}, which is not read (only 'model' or 'state_dict' is): "
            f"re-save {{'model': ckpt[{nested[0]!r}]}} if those are the weights to load" if nested else "")
    raise ValueError(f"{what}: not a state dict of tensors, and no 'model' or 'state_dict' entry holds one; "
                     f"it holds {held}{hint}")


def _fresh_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in new contiguous memory of ``dtype``: a tensor the model owns alone (no aliasing of the caller's
    tensors, of another key's storage or of an expanded view)."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    out.copy_(t)
    return out


def unusable_tensors(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why the tensors of ``state`` cannot be weights (meta tensors without data, NaN / inf floating values of a
    diverged run), or None. Read before anything is loaded."""
    empty = [k for k, v in state.items() if v.is_meta]
    if empty:
        return (f"{len(empty)} tensors hold no data (meta tensors: {', '.join(empty[:5])}); a model built on the "
                "meta device has no weights to give")
    damaged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:
        return (f"{len(damaged)} tensors hold NaN or inf values ({', '.join(damaged[:5])}): damaged weights (saved "
                "from a diverged run?)")
    return None


def load_state_dict_strict(module: nn.Module, state, what: str) -> None:
    """``load_state_dict(strict=True)`` with one error listing missing, unexpected and mis-shaped keys.

    ``state`` may be a checkpoint dict holding the state dict under ``'model'`` or ``'state_dict'``. Tensors
    without data (meta) and non-finite floating weights (a diverged run) are refused before anything is
    loaded. A module on the meta device (``with torch.device("meta"): create_model(...)``) is loaded with
    ``assign=True``: it ends up holding copies of the file's tensors, cast to its own dtypes, with its own
    ``requires_grad`` flags; a non-persistent buffer that is still meta (no file holds one) is an error."""
    state = unwrap_state_dict(state, what)
    own = module.state_dict()
    parts = state_dict_mismatch(own, state)
    if parts:
        raise ValueError(f"{what} does not fit {type(module).__name__}: " + "; ".join(parts))
    unusable = unusable_tensors(state)
    if unusable:
        raise ValueError(f"{what}: {unusable}")
    assign = any(t.is_meta for t in own.values())
    if assign:
        left = [n for n, b in module.named_buffers() if b.is_meta and n not in own]
        if left:
            raise ValueError(f"{what}: {type(module).__name__} was built on the meta device and its non-persistent "
                             f"buffers ({', '.join(left[:5])}) are values no checkpoint holds: build it on a "
                             "real device")
        # the model takes the file's tensors (assign) instead of copying into nothing: as new memory of the
        # model's own dtypes (an fp16 file must not give fp16 master weights; a live source must not be shared)
        state = {k: _fresh_copy(v, own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
