"""Red-team findings on the public ops, each pinned by a test that failed before its fix.

- A NaN/inf in a row's *unused* guide (the guide of a forget row, the noise guide of a retain row) never reached
  the losses on the fused path, but made both NaN on the twin path that fp64 input or a guide requiring grad
  takes: one public function, two answers. Every path now reads only the row's own target.
- The reference twins broadcast a guide of a wrong shape (``[1, ...]`` for ``[N, ...]``) silently, or failed deep
  inside torch on maps of different N; they now raise one ValueError.
- ``batch_mean_std`` of an integer tensor answered on the CPU but raised a kernel-level error under Triton; it is
  refused on every backend. (A one-element batch's normal noise stays NaN, as torch's unbiased std makes it:
  tests/kernels/test_philox_four_per_draw.py pins that choice.)

Tolerances: fp32 losses and gradients to 1e-5 relative against an fp64 restatement, fp64 to 1e-12.
"""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.ops import (batch_mean_std, multi_map_retain_forget_l2_loss_reference, retain_forget_l2_loss,
                              retain_forget_l2_loss_reference)

IS_FORGET = torch.tensor([True, False, True, False, False])  # N = 5: 2 forget, 3 retain


def _own_class_losses(latent, guide, noise_guide, is_forget):
    """(2/N)·Σ_retain mean((x−g)²), (2/N)·Σ_forget mean((x−n)²) in fp64 over each row's own target only."""
    n = latent.shape[0]
    x, g, z = latent.double(), guide.double(), noise_guide.double()
    m = (x[~is_forget] - g[~is_forget]).pow(2).reshape(int((~is_forget).sum()), -1).mean(1)
    f = (x[is_forget] - z[is_forget]).pow(2).reshape(int(is_forget.sum()), -1).mean(1)
    return 2.0 / n * m.sum(), 2.0 / n * f.sum()


def _poisoned_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x, guide, noise = (torch.randn(5, 4, 6, generator=g).to(dtype) for _ in range(3))
    guide[0, 1, 2] = float("nan")  # row 0 is a forget row: its guide is never used
    guide[2, 0, 0] = float("inf")  # row 2 likewise
    noise[1, 3, 5] = float("nan")  # row 1 is a retain row: its noise guide is never used
    return x, guide, noise


def _check_unused_rows_ignored(dtype, guide_requires_grad):
    x, guide, noise = _poisoned_inputs(dtype)
    x.requires_grad_(True)
    guide.requires_grad_(guide_requires_grad)
    r, f = retain_forget_l2_loss(x, guide, noise, IS_FORGET)
    want_r, want_f = _own_class_losses(x.detach(), guide.detach(), noise, IS_FORGET)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(r.double(), want_r, rtol=rtol, atol=0)
    torch.testing.assert_close(f.double(), want_f, rtol=rtol, atol=0)
    (r + 2 * f).backward()
    assert torch.isfinite(x.grad).all()
    x64 = x.detach().double().requires_grad_(True)
    wr, wf = _own_class_losses(x64, guide.detach(), noise, IS_FORGET)
    (wr + 2 * wf).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=1e-12)
    if guide_requires_grad:  # the twin path: retain rows get (x − g)·(−2·2/(N·T·D)), forget rows 0
        want = torch.zeros_like(x64)
        want[~IS_FORGET] = -x64.grad[~IS_FORGET]
        torch.testing.assert_close(guide.grad.double(), want, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("dtype, guide_requires_grad", [(torch.float32, False), (torch.float64, False),
                                                        (torch.float32, True)], ids=["fused", "fp64", "guide-grad"])
def test_nan_in_unused_guide_rows_is_ignored_on_every_path(op_backend, dtype, guide_requires_grad):
    # before: fp32 gave finite losses, fp64 or a guide requiring grad gave (nan, nan) for the same values
    _check_unused_rows_ignored(dtype, guide_requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "fp64"])
def test_nan_in_unused_guide_rows_is_ignored_on_triton(triton_backend, dtype):
    _check_unused_rows_ignored(dtype, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "fp64"])
def test_nan_in_a_used_row_reaches_only_its_own_class(op_backend, dtype):
    x, guide, noise = _poisoned_inputs(dtype)
    guide[1, 0, 0] = float("nan")  # row 1 is retain: its guide is used
    r, f = retain_forget_l2_loss(x, guide, noise, IS_FORGET)
    assert torch.isnan(r) and torch.isfinite(f)
    x, guide, noise = _poisoned_inputs(dtype)
    x[2, 1, 1] = float("inf")  # row 2 is forget
    r, f = retain_forget_l2_loss(x, guide, noise, IS_FORGET)
    assert torch.isfinite(r) and torch.isinf(f)


def test_reference_twin_refuses_a_broadcastable_guide():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="one shape"):  # before: broadcast [1, 3] against [5, 3] silently
        retain_forget_l2_loss_reference(x, x[:1], x, IS_FORGET)
    with pytest.raises(ValueError, match="one shape"):
        retain_forget_l2_loss_reference(x, x, None, IS_FORGET)


def test_multi_map_reference_names_maps_of_different_n():
    s = [torch.randn(5, 3), torch.randn(4, 3)]
    with pytest.raises(ValueError, match="map 1 has N = 4"):  # before: a RuntimeError from torch's broadcasting
        multi_map_retain_forget_l2_loss_reference(s, [t.clone() for t in s], IS_FORGET)


def test_batch_mean_std_refuses_integer_images(op_backend):
    with pytest.raises(TypeError, match="floating point"):  # before: an answer on the CPU, a kernel error on Triton
        batch_mean_std(torch.arange(10))
    mean, std = batch_mean_std(torch.arange(10, dtype=torch.float32))
    torch.testing.assert_close(mean, torch.tensor(4.5))
    torch.testing.assert_close(std, torch.tensor(3.0276503540974917))
