"""Run the frozen teacher's no-grad work on a side CUDA stream, concurrently with the student's forward.

The teacher's pass (noise draw, front end, encoder) depends only on the batch, never on the student, so on
a GPU it can run while the student's forward runs: kernels of the two fill each other's idle SMs (small
LayerNorm / softmax / elementwise launches, GEMM tails). The loss joins the two streams. The arithmetic is
unchanged: each stream runs the same kernels in the same order as the sequential step, so the results are
identical. Inside a CUDA-graph capture the fork and join become parallel branches of the graph.

On CPU, or with ``enabled=False``, the teacher runs in order on the current stream.
"""
from __future__ import annotations

from typing import Callable

import torch

from .side_stream import SideStream


def teacher_stream_for(setup) -> SideStream:
    """The setup's teacher stream, made on first use (``setup.overlap_teacher`` decides whether it is concurrent)."""
    if setup.teacher_stream is None:
        setup.teacher_stream = SideStream(setup.device, enabled=setup.overlap_teacher)
    return setup.teacher_stream


def student_beside_teacher(stream: SideStream, student_front: Callable[[], object],
                           student_encoder: Callable[[object], torch.Tensor],
                           teacher_pass: Callable[[object], torch.Tensor], share: bool):
    """``(latent, hidden)``: the student's front end and encoder, and ``teacher_pass(front or None)``.

    Concurrent: the teacher starts with the student when it runs its own front end (``share`` False), after
    the student's front end when it reuses it. Sequential (CPU): student first, then teacher, as always.
    """
    pending = stream.fork(lambda: teacher_pass(None)) if stream.concurrent and not share else None
    front = student_front()
    if stream.concurrent and share:
        pending = stream.fork(lambda: teacher_pass(front))
    latent = student_encoder(front)  # [N, L, D]
    hidden = teacher_pass(front) if pending is None else stream.join(pending)
    return latent, hidden


__all__ = ["teacher_stream_for", "student_beside_teacher"]
