"""Device work per call of the fused loss and noise ops on the Triton path: every launch is counted.

Two counters run around one call (forward + backward for the loss):

- aten ops, through a ``TorchDispatchMode`` (it sees every op below autograd, backward included). Not counted,
  because they launch nothing: allocations (``ALLOCATION_OPS``: empty, empty_like, empty_strided, new_empty,
  new_empty_strided) and views/aliases (``OpOverload.is_view``: view, reshape's view, detach, unsqueeze, ...).
  Everything else (where, sum, mul, full, zeros, _to_copy, arange, cumsum, ...) counts as one launch.
- Triton launches: every ``*_kernel`` of unlearn_fast/kernels/retain_forget_l2.py and batch_noise.py is
  wrapped so that ``kernel[grid](...)`` is counted; the dispatch counter is paused inside a launch (Triton's
  interpreter copies arguments with torch ops of its own, which a GPU launch does not).

Runs on the CPU under TRITON_INTERPRET=1 (set by tests/conftest.py) with ``UNLEARN_FAST_BACKEND=triton``, or
compiled on a GPU. The compact/prenorm entry points check table sizes on the host when the labels live on the
CPU (skipped for device labels, where it would sync); that check is switched off here so that the CPU count is
the count of a CUDA call.

Counts reached (aten launches + Triton launches):
- loss, full-size guides, forward + backward: 0 + 3 (forward, finalize, backward); forward alone 0 + 2
- loss, compact / prenorm with the default row index: 0 + 4 (rank, forward, finalize, backward); 0 + 3 with
  an explicit row_index
- noise (normal / constant, batch statistics): 0 + 3 (moments, combine, draws); uniform 0 + 1
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unlearn_fast.ops import (batch_mean_std, retain_forget_l2_loss, retain_forget_l2_loss_compact,
                              retain_forget_l2_loss_prenorm, sample_batch_noise)

ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
LOSS_FWD, LOSS_FINALIZE, LOSS_BWD, RANK = ("_retain_forget_l2_forward_kernel", "_retain_forget_l2_finalize_kernel",
                                           "_retain_forget_l2_backward_kernel", "_rank_within_class_kernel")
PRENORM_FWD = "_retain_forget_l2_prenorm_forward_kernel"
MOMENTS, COMBINE, DRAWS = ("_batch_moments_forward_kernel", "_batch_moments_combine_kernel",
                           "_philox_batch_noise_forward_kernel")


class _AtenOpRecorder(TorchDispatchMode):
    """Records the aten ops that reach the dispatcher, except while ``paused``."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands in for a Triton kernel object: counts ``kernel[grid](...)`` launches, then launches."""

    def __init__(self, kernel, name, launches, recorder_ref):
        self.kernel, self.name, self.launches, self.recorder_ref = kernel, name, launches, recorder_ref

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.name)
            recorder = self.recorder_ref[0]
            if recorder is not None:
                recorder.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                if recorder is not None:
                    recorder.paused = False
        return launch


def _launching(ops):
    return [str(f) for f in ops if not f.is_view and f.overloadpacket.__name__ not in ALLOCATION_OPS]


@pytest.fixture
def device(monkeypatch):
    import unlearn_fast.kernels as kernels
    if not kernels.TRITON_AVAILABLE:
        pytest.skip(f"Triton unavailable: {kernels.TRITON_IMPORT_ERROR}")
    from unlearn_fast.kernels import retain_forget_l2
    from unlearn_fast.kernels.launch_device import interpreted
    if interpreted(retain_forget_l2._retain_forget_l2_forward_kernel):
        dev = "cpu"
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        pytest.skip("Triton kernels are compiled (TRITON_INTERPRET is not 1) and there is no CUDA GPU")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    # the host-side table-size check runs only for CPU labels (see the module docstring)
    monkeypatch.setattr(sys.modules["unlearn_fast.ops.retain_forget_l2_loss"], "_check_table_rows",
                        lambda *args, **kwargs: None)
    return dev


@pytest.fixture
def count(device, monkeypatch):
    """``count(fn) -> (aten launching ops, Triton launches)`` for one call of ``fn``."""
    from unlearn_fast.kernels import batch_noise, retain_forget_l2
    launches, recorder_ref = [], [None]
    for module in (retain_forget_l2, batch_noise):
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(module, name, _CountedKernel(obj, name, launches, recorder_ref))

    def run(fn):
        fn()  # warm-up outside the count (compilation on a GPU)
        launches.clear()
        recorder_ref[0] = recorder = _AtenOpRecorder()
        with recorder:
            fn()
        recorder_ref[0] = None
        return _launching(recorder.ops), list(launches)
    return run


def _loss_case(device, n=5, t=3, d=37, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, d, generator=g).to(device, dtype).requires_grad_(True)
    guide = torch.randn(n, t, d, generator=g).to(device)
    noise_guide = torch.randn(n, t, d, generator=g).to(device)
    is_forget = (torch.arange(n) % 2 == 0).to(device)
    upstream = (torch.tensor(0.3, device=device), torch.tensor(0.7, device=device))
    return x, guide, noise_guide, is_forget, upstream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_size_loss_forward_backward_is_three_launches(count, device, dtype):
    x, guide, noise_guide, is_forget, upstream = _loss_case(device, dtype=dtype)

    def call():
        r, f = retain_forget_l2_loss(x, guide, noise_guide, is_forget)
        torch.autograd.grad((r, f), x, upstream)
    aten, triton_launches = count(call)
    assert aten == [], f"aten ops that launch: {aten}"
    assert triton_launches == [LOSS_FWD, LOSS_FINALIZE, LOSS_BWD]
    assert len(aten) + len(triton_launches) == 3 <= 4


def test_full_size_loss_on_a_4d_latent_and_forward_alone(count, device):
    x, guide, noise_guide, is_forget, _ = _loss_case(device)
    x4, g4, n4 = (v.detach().reshape(5, 3, 37, 1) for v in (x, guide, noise_guide))  # D = 1: a [N, T*37, 1] view
    aten, launches = count(lambda: retain_forget_l2_loss(x4, g4, n4, is_forget))
    assert aten == [] and launches == [LOSS_FWD, LOSS_FINALIZE]


def test_one_used_loss_needs_no_zero_gradient(count, device):
    # the unused loss's gradient stays None (no zeros_like); the backward kernel treats it as 0
    x, guide, noise_guide, is_forget, upstream = _loss_case(device)

    def call():
        r, _ = retain_forget_l2_loss(x, guide, noise_guide, is_forget)
        torch.autograd.grad(r, x, upstream[0])
    aten, launches = count(call)
    assert aten == [], f"aten ops that launch: {aten}"
    assert launches == [LOSS_FWD, LOSS_FINALIZE, LOSS_BWD]


def test_compact_loss_is_four_launches_with_its_row_index(count, device):
    x, guide, noise_guide, is_forget, upstream = _loss_case(device)
    guide_rows, noise_rows = guide[~is_forget].contiguous(), noise_guide[is_forget].contiguous()
    row_index = torch.tensor([0, 0, 1, 1, 2], device=device)  # the rank within the class

    def call(idx):
        r, f = retain_forget_l2_loss_compact(x, guide_rows, noise_rows, is_forget, row_index=idx)
        torch.autograd.grad((r, f), x, upstream)
    aten, launches = count(lambda: call(None))
    assert aten == [], f"aten ops that launch: {aten}"
    assert launches == [RANK, LOSS_FWD, LOSS_FINALIZE, LOSS_BWD]
    for idx in (row_index, row_index.to(torch.int32)):  # any integer dtype is read as is: no conversion
        aten, launches = count(lambda: call(idx))
        assert aten == [] and launches == [LOSS_FWD, LOSS_FINALIZE, LOSS_BWD]


def test_prenorm_loss_is_four_launches(count, device):
    x, guide, noise_guide, is_forget, upstream = _loss_case(device)
    w = torch.linspace(0.5, 1.5, 37, device=device)
    b = torch.linspace(-0.1, 0.1, 37, device=device)
    guide_rows, noise_rows = guide[~is_forget].contiguous(), noise_guide[is_forget].contiguous()

    def call():
        r, f = retain_forget_l2_loss_prenorm(x, guide_rows, noise_rows, is_forget, w, b, 1e-6)
        torch.autograd.grad((r, f), x, upstream)
    aten, launches = count(call)
    assert aten == [], f"aten ops that launch: {aten}"
    assert launches == [RANK, PRENORM_FWD, LOSS_FINALIZE, LOSS_BWD]


@pytest.mark.parametrize("kind", ["normal", "constant"])
@pytest.mark.parametrize("step_form", ["int", "tensor"])
def test_noise_is_three_launches(count, device, kind, step_form):
    images = torch.rand(2, 3, 17, 19, device=device)
    step = 5 if step_form == "int" else torch.tensor(5, device=device)  # the tensor form of a graphed step
    aten, launches = count(lambda: sample_batch_noise(images, kind, seed=3, step=step))
    assert aten == [], f"aten ops that launch: {aten}"  # no torch.full for seed/step, no torch statistics
    assert launches == [MOMENTS, COMBINE, DRAWS]


def test_uniform_noise_and_batch_statistics(count, device):
    images = torch.rand(2, 3, 17, 19, device=device)
    aten, launches = count(lambda: sample_batch_noise(images, "uniform", seed=2 ** 63 + 7, step=2 ** 32 - 1))
    assert aten == [] and launches == [DRAWS]
    aten, launches = count(lambda: batch_mean_std(images))
    assert aten == [] and launches == [MOMENTS, COMBINE]


def test_the_counter_sees_torch_ops(count, device):
    # the counter is not blind: the plain twin's statistics are several launching aten ops
    images = torch.rand(2, 3, 4, 4, device=device)
    aten, launches = count(lambda: images.double().std())
    assert len(aten) >= 2 and launches == []
    aten, launches = count(lambda: torch.empty(3, device=device).view(1, 3).detach())  # allocation + views only
    assert aten == []
