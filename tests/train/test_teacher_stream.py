"""The teacher-stream scheduling: what runs when, and with which front-end output (CPU-checkable parts).

The concurrent path's numerics are checked on a GPU (tests/gpu/test_gpu_fast_path.py: overlapped and
sequential steps end with identical weights)."""
import torch

from unlearn_fast.train.side_stream import SideStream
from unlearn_fast.train.teacher_stream import student_beside_teacher


class RecordingStream:
    """Stands in for a concurrent SideStream: records fork/join in the call log."""
    concurrent = True

    def __init__(self, log):
        self.log = log

    def fork(self, fn):
        self.log.append("fork")
        return fn()

    def join(self, out):
        self.log.append("join")
        return out


def _parts(log):
    front = lambda: log.append("front") or "FRONT"  # noqa: E731
    encoder = lambda x: log.append(f"encoder({x})") or torch.ones(1)  # noqa: E731
    teacher = lambda x: log.append(f"teacher({x})") or torch.zeros(1)  # noqa: E731
    return front, encoder, teacher


def test_sequential_on_cpu_runs_student_then_teacher_with_the_front_output():
    for share in (True, False):
        log = []
        stream = SideStream("cpu")
        assert not stream.concurrent
        latent, hidden = student_beside_teacher(stream, *_parts(log), share=share)
        assert log == ["front", "encoder(FRONT)", "teacher(FRONT)"]
        assert latent.item() == 1 and hidden.item() == 0


def test_concurrent_teacher_with_its_own_front_end_starts_first_and_gets_no_student_output():
    log = []
    student_beside_teacher(RecordingStream(log), *_parts(log), share=False)
    assert log == ["fork", "teacher(None)", "front", "encoder(FRONT)", "join"]


def test_concurrent_teacher_sharing_the_front_end_starts_after_it():
    log = []
    student_beside_teacher(RecordingStream(log), *_parts(log), share=True)
    assert log == ["front", "fork", "teacher(FRONT)", "encoder(FRONT)", "join"]


def test_disabled_stream_is_sequential_even_where_cuda_would_allow():
    assert not SideStream("cuda", enabled=False).concurrent
