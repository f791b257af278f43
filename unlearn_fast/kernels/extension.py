"""Loader for the C++/CUDA extension ``unlearn_fast._C`` (sources in csrc/, built by setup.py).

    from unlearn_fast.kernels.extension import load_extension, extension_has_cuda
    ext = load_extension()          # the module, or None (reason: extension_load_error())
    if ext is not None:
        row_sq, grad = ext.retain_forget_l2_forward(latent, retain, forget, is_forget, row_index,
                                                    None, None, 1e-6, 1.0, True)

Never raises: a missing, stale (built against another torch) or CUDA-built-but-unloadable extension is
recorded and reported once with a RuntimeWarning, and callers use the PyTorch twins. Build it with
``pip install --no-build-isolation -e .`` (add ``UNLEARN_FAST_CUDA=1`` for the CUDA kernels).
``UNLEARN_FAST_DISABLE_EXT=1`` makes :func:`load_extension` return None (to exercise the fallback).
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Optional

__all__ = ["load_extension", "extension_has_cuda", "extension_load_error"]

_MODULE_NAME = "unlearn_fast._C"
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (UNLEARN_FAST_CUDA=1 for the CUDA kernels)"

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_error: Optional[str] = None


def _disabled() -> bool:
    return os.environ.get("UNLEARN_FAST_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes")


def _import() -> Optional[ModuleType]:
    global _error
    if _disabled():
        _error = "disabled by UNLEARN_FAST_DISABLE_EXT=1"
        return None
    try:
        import torch  # noqa: F401  (the extension's shared libraries come from torch: load it first)
        module = importlib.import_module(_MODULE_NAME)
        for name in ("retain_forget_l2_forward", "batch_mean_std", "has_cuda"):
            if not hasattr(module, name):
                raise ImportError(f"{_MODULE_NAME} lacks {name} (a stale build?)")
    except Exception as e:  # ImportError, OSError (undefined symbol after a torch upgrade), ...
        _error = f"{type(e).__name__}: {e}"
        warnings.warn(f"unlearn_fast: extension {_MODULE_NAME} unavailable ({_error}); the ops use their PyTorch "
                      f"twins. To use it, {_BUILD_HINT}.", RuntimeWarning, stacklevel=3)
        return None
    return module


def load_extension() -> Optional[ModuleType]:
    """The extension module ``unlearn_fast._C``, or None if it cannot be imported (cached; warns once)."""
    global _loaded, _module
    if not _loaded:
        with _lock:
            if not _loaded:
                _module = _import()
                _loaded = True
    return _module


def extension_has_cuda() -> bool:
    """True when the extension is loaded and was built with its CUDA kernels."""
    module = load_extension()
    return bool(module is not None and module.has_cuda())


def extension_load_error() -> Optional[str]:
    """Why :func:`load_extension` returned None (None when it loaded, or was not tried yet)."""
    load_extension()
    return _error
