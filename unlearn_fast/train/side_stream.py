"""Fork work onto a side CUDA stream and join it back where its result is used.

Two users: the frozen teacher's no-grad pass beside the student's forward (:mod:`.teacher_stream`) and the
next batch's host-to-device copy beside the current step (:mod:`.device_prefetch`). ``fork`` starts the work
after everything already queued on the current stream; ``join`` makes the current stream wait for it and keeps
the result's memory (allocated on the side stream) alive until the current stream is done with it. Inside a
CUDA-graph capture the fork and join become parallel branches of the graph. On CPU, or with
``enabled=False``, ``fork`` runs the work in place and ``join`` does nothing.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


class SideStream:
    """``fork(fn)`` starts ``fn()`` on the side stream (or runs it in place); ``join(out)`` makes the current
    stream wait for it before ``out`` is used."""

    def __init__(self, device, enabled: bool = True):
        dev = torch.device(device)
        self.stream: Optional[torch.cuda.Stream] = (torch.cuda.Stream(device=dev)
                                                    if enabled and dev.type == "cuda" else None)

    @property
    def concurrent(self) -> bool:
        return self.stream is not None

    def fork(self, fn: Callable[[], T]) -> T:
        if self.stream is None:
            return fn()
        # after everything queued so far: the work may read it, and its memory is not reused under it
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            return fn()

    def join(self, out: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return out
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        if not torch.cuda.is_current_stream_capturing():
            # allocated on the side stream, read and freed on this one: keep its memory until this stream is done
            out.record_stream(current)
        return out


__all__ = ["SideStream"]
