"""The frozen teacher with its matrix-product weights already in bf16, for the fast step in bf16 mode.

Under autocast every Linear and conv casts its fp32 weight and bias to bf16 on every call: a frozen teacher's
parameters do not require grad, so autocast never caches those casts (and a CUDA graph replays them anyway).
For MAE-L that is 303 M parameters read and written again every step (about 1.8 GB, some 190 launches). A copy
of the teacher whose Linear and conv weights and biases are bf16 computes the same bits: autocast rounds fp32
to bf16 in the same way and leaves bf16 tensors as they are. Everything else (LayerNorm, GroupNorm,
embeddings, buffers) is the teacher's own tensors, shared, since autocast runs those ops in fp32. The fast and
graphed steps use the copy while the teacher runs under bf16 autocast (``--precision bf16``); the fp32 teacher
stays for the reference step and evaluation. The copy costs half the teacher's matrix weights in memory once.

The copy follows the teacher: :func:`step_teacher` rounds the bf16 weights again, in place, when the
teacher's tensors were written in place (``load_state_dict``), and makes a new copy when ``setup.teacher`` is
another module or its parameters moved to new storage (``.to(device)``); tensors swapped for new objects
(``load_state_dict(assign=True)``) are not followed: set ``setup.half_teacher = None`` after that. The check
reads a version and an address per teacher tensor each step (tens of microseconds). A CUDA graph captured
earlier reads the copy's tensors: it sees an in-place refresh once ``step_teacher`` has run, never a new copy
(as it never sees a replaced fp32 teacher).
"""
from __future__ import annotations

import copy
import weakref
from itertools import chain
from typing import Optional

import torch
from torch import nn

_GEMM_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_GEMM_PARAMS = ("weight", "bias")


def tensor_versions(tensors) -> Optional[tuple]:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors have no version counter: an in-place change cannot be seen
        return None


def tensor_storages(tensors) -> tuple:
    return tuple(t.data_ptr() for t in tensors)


def with_half_gemm_weights(teacher: nn.Module, dtype: torch.dtype = torch.bfloat16,
                           trainable: bool = False) -> nn.Module:
    """A copy of ``teacher`` in eval mode whose Linear / conv weights and biases are new ``dtype`` tensors
    (not requiring grad) and whose other parameters and buffers are the teacher's own (shared, not copied).
    ``trainable=True`` (a student's copy, half_student.py): only the GEMM parameters that require
    grad are copied, as leaves that require grad, and the copy keeps the module's train / eval mode."""
    gemm, shared = {}, {}
    for m in teacher.modules():
        is_gemm = isinstance(m, _GEMM_MODULES)
        for name, t in chain(m._parameters.items(), m._buffers.items()):
            if t is None:
                continue
            if (is_gemm and name in _GEMM_PARAMS and isinstance(t, nn.Parameter) and t.is_floating_point()
                    and (t.requires_grad or not trainable)):
                gemm[id(t)] = t
            else:
                shared[id(t)] = t
    pairs = [(t, nn.Parameter(t.detach().to(dtype, copy=True), requires_grad=trainable))
             for i, t in gemm.items() if i not in shared]  # a weight tied to a non-GEMM module stays shared
    memo = dict(shared)
    memo.update((id(src), dst) for src, dst in pairs)
    for m in teacher.modules():  # hooks registered on the module later run on the copy too, as without it
        memo.update((id(v), v) for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict))
    half = copy.deepcopy(teacher, memo)
    if not trainable:
        half.eval()
    half._half_gemm_pairs = tuple(pairs)  # (teacher's weight, its rounded copy), for the in-place refresh
    return half


@torch.no_grad()
def _refresh(half: nn.Module) -> None:
    for src, dst in half._half_gemm_pairs:
        dst.copy_(src)


def refuse_in_capture(what: str, changed: str = "the teacher") -> None:
    """Inside a CUDA-graph capture the copy's kernels would be recorded, not run: the graph would replay them every
    step and the copy would hold garbage until then. The graphed step makes the copy before it captures.
    ``changed``: what changed since (the teacher; the student copy passes its own)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} during a CUDA-graph capture: {changed} changed after the graphed step was "
                           "built; build the graphed step again")


def step_teacher(setup) -> nn.Module:
    """The teacher the fast step runs: in bf16 mode the bf16-weight copy (made on first use, kept on the setup
    and kept in step with ``setup.teacher``, see the module docstring), else (or with
    ``setup.half_teacher_weights`` off) the teacher itself."""
    if setup.precision != "bf16" or not setup.half_teacher_weights:
        return setup.teacher
    teacher, half = setup.teacher, setup.half_teacher
    source = getattr(half, "_half_source", None)
    if (half is None or source is None or source() is not teacher
            or tensor_storages(half._half_watch) != half._half_storages):
        refuse_in_capture("a new bf16 teacher copy")
        setup.half_teacher = half = None  # the old copy's memory goes before the new one is made
        half = with_half_gemm_weights(teacher)
        # the teacher's tensors as they were copied: a weak reference, so a dropped teacher is not kept alive
        half._half_source = weakref.ref(teacher)
        half._half_watch = tuple(chain(teacher.parameters(), teacher.buffers()))
        half._half_storages, half._half_versions = tensor_storages(half._half_watch), tensor_versions(half._half_watch)
        setup.half_teacher = half
        return half
    versions = tensor_versions(half._half_watch)
    if versions != half._half_versions:  # weights loaded in place: round them again, into the same tensors
        refuse_in_capture("re-rounding the bf16 teacher copy")
        _refresh(half)
        half._half_versions = versions
    return half


__all__ = ["with_half_gemm_weights", "step_teacher", "tensor_versions", "tensor_storages", "refuse_in_capture"]
