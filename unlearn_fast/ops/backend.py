"""Which implementation runs an op: Triton (CUDA), the C++/CUDA extension, or the plain PyTorch twin.

Importing never fails for lack of a GPU, Triton or a built extension: the op falls back to its twin and
says so once. ``UNLEARN_FAST_BACKEND=torch|triton|cext`` forces one (``torch`` is always available).
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from functools import lru_cache

import torch

_said = set()


def say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@lru_cache(maxsize=None)
def _triton_kernels():
    try:
        from .. import kernels
    except Exception as e:  # a broken triton install must not break the package
        say_once("triton-import", f"unlearn_fast: Triton kernels unavailable ({e}); using the PyTorch twin")
        return None
    return kernels if getattr(kernels, "TRITON_AVAILABLE", False) else None


@lru_cache(maxsize=None)
def _extension():
    try:
        from ..kernels.extension import load_extension
    except Exception:
        return None
    return load_extension()


def _extension_has_cuda() -> bool:
    try:
        from ..kernels.extension import extension_has_cuda
    except Exception:
        return False
    return bool(extension_has_cuda())


def choose_backend(device: torch.device, op: str) -> str:
    """'triton', 'cext' or 'torch' for ``op`` on ``device``."""
    forced = os.environ.get("UNLEARN_FAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in ("torch", "triton", "cext"):
            raise ValueError(f"UNLEARN_FAST_BACKEND={forced!r}; valid: torch, triton, cext")
        if forced == "triton" and _triton_kernels() is None:
            raise RuntimeError("UNLEARN_FAST_BACKEND=triton but Triton kernels cannot be imported")
        if forced == "cext" and _extension() is None:
            raise RuntimeError("UNLEARN_FAST_BACKEND=cext but the extension unlearn_fast._C is not built "
                               "(pip install --no-build-isolation -e .)")
        return forced
    if device.type == "cuda":
        if _triton_kernels() is not None:
            return "triton"
        if _extension() is not None and _extension_has_cuda():
            return "cext"
        say_once(f"{op}-cuda", f"unlearn_fast: no fused CUDA kernel for {op}; using the PyTorch twin")
        return "torch"
    if _extension() is not None:
        return "cext"
    say_once(f"{op}-cpu", f"unlearn_fast: extension unlearn_fast._C not built; {op} uses the PyTorch twin "
                          "(build it with `pip install --no-build-isolation -e .`)")
    return "torch"


def choose_triton_or_twin(device: torch.device, op: str) -> str:
    """'triton' or 'torch' for an op that has a Triton kernel and no extension kernel: the twin on the CPU (no
    warning: nothing is missing there) unless ``UNLEARN_FAST_BACKEND=triton`` asks for the interpreter; on CUDA
    as :func:`choose_backend`, the twin (said once) where that would pick the extension."""
    forced = os.environ.get("UNLEARN_FAST_BACKEND", "").strip().lower()
    if device.type != "cuda" and forced != "triton":
        return "torch"
    backend = choose_backend(device, op)  # honours UNLEARN_FAST_BACKEND
    if backend == "cext":
        say_once(f"{op}-cext", f"unlearn_fast: the extension has no {op} kernel; using the PyTorch twin")
        return "torch"
    return backend


def eager_under_compile(op):
    """``op`` as dynamo sees it: a graph break, the op run eagerly. Its backend choice, argument checks and
    kernel launches (Triton, the extension) are host code that dynamo would trace or reject; a compiled function
    that calls the op gets the op's own results (the ops around it may still be compiled).

    ``torch.compiler.disable`` imports dynamo (~1 s): it is applied at the first call made once dynamo is loaded
    (nothing can be compiling before that), so ``import unlearn_fast`` does not pay for it."""
    disabled = []  # the disabled op, made once

    @functools.wraps(op)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return op(*args, **kwargs)
        if not disabled:
            disable = getattr(getattr(torch, "compiler", None), "disable", None)
            disabled.append(disable(op) if disable is not None else op)
        return disabled[0](*args, **kwargs)
    return run


def refuse_double_backward(op: str) -> None:
    """Called first in a fused op's backward. Its gradient comes from a stored constant, so a graph built
    through it (``create_graph=True``) would carry no second derivative: say so instead of being wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the fused op has no second derivative (backward with create_graph=True); "
                           f"use {op}_reference, the plain PyTorch twin, for higher-order gradients")


def triton_kernels():
    return _triton_kernels()


def extension():
    return _extension()
