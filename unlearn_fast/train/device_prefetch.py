"""Copy the next batch's images to the GPU on a side stream while the current step runs.

The reference trainer copies each batch (``samples.to(device, non_blocking=True)``) on the compute stream, so
the host-to-device transfer (38 MB for 64 images at 224², about 1.5 ms from pinned memory) sits on the
critical path of every step; for a 15 ms bf16 MAE-B step that is a tenth of it. The fast trainer reads one batch
ahead: batch k+1 is copied on a side stream while step k computes, and the compute stream waits for that copy
only when it takes batch k+1. Labels stay on the host (the steps read them there). On a CPU device, or with
``enabled=False``, batches pass through unchanged.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import torch

from .side_stream import SideStream


class DevicePrefetcher:
    """Iterate ``(images, labels)`` with ``images`` already on ``device``, at most ``limit`` batches
    (never reading one past it, so a sampler is not advanced beyond the steps that run)."""

    def __init__(self, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device, limit: Optional[int] = None,
                 enabled: bool = True):
        self.device = torch.device(device)
        self.side = SideStream(self.device, enabled=enabled)
        self.active = self.side.concurrent
        self.it = iter(batches)
        self.left = limit  # batches still allowed to be read from ``batches``
        self.ready = None  # (images on device, labels) of the next batch, its copy forked onto self.side
        if self.active:
            self.ready = self._read_and_copy()

    def _read(self):
        if self.left is not None:
            if self.left <= 0:
                return None
            self.left -= 1
        return next(self.it, None)

    def _read_and_copy(self):
        try:
            batch = self._read()
        except Exception as e:  # a bad batch k+1 is reported when k+1 is taken: step k still runs
            return e
        if batch is None:
            return None
        images, labels = batch
        return self.side.fork(lambda: images.to(self.device, non_blocking=True)), labels

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.active:
            batch = self._read()
            if batch is None:
                raise StopIteration
            return batch
        if self.ready is None:
            raise StopIteration
        if isinstance(self.ready, Exception):
            error, self.ready = self.ready, None
            raise error
        images, labels = self.ready
        images = self.side.join(images)  # the copy of this batch is done before the step reads it
        self.ready = self._read_and_copy()  # the next batch's copy overlaps this step
        return images, labels


__all__ = ["DevicePrefetcher"]
