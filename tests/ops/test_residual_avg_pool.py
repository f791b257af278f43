"""unlearn_fast/ops/residual_avg_pool.py: validation, dispatch (kernel vs differentiable twin), layouts.

The twin is ``F.avg_pool2d(a + b, 2, 2)`` itself, so where it runs the result is torch's to the bit. The kernel
path runs on CUDA, or on the CPU under Triton's interpreter with UNLEARN_FAST_BACKEND=triton; its results are
within tests/kernels/test_triton_residual_avg_pool.py's tolerances (checked there), here within rtol 1e-6 (fp32).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import triton_kernel_device
from unlearn_fast.ops.residual_avg_pool import add_avg_pool2d, add_avg_pool2d_reference


def _pair(shape=(2, 3, 6, 8), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(2))


@pytest.fixture
def kernel_calls(monkeypatch):
    """(device, calls): a device the Triton kernel runs on with UNLEARN_FAST_BACKEND=triton, and the
    ``channels_last`` argument of each launcher call."""
    pytest.importorskip("triton")
    from unlearn_fast.kernels import residual_avg_pool as module
    device = triton_kernel_device(module._add_avg_pool_nchw_kernel)
    calls, real = [], module.add_avg_pool2d_forward

    def spy(a, b, channels_last):
        calls.append(channels_last)
        return real(a, b, channels_last)
    monkeypatch.setattr(module, "add_avg_pool2d_forward", spy)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    return device, calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_path_equals_torch_ops_and_keeps_the_layout(kernel_calls, layout):
    device, calls = kernel_calls
    a, b = _pair((2, 5, 10, 12), device=device)
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    out = add_avg_pool2d(a, b)
    assert calls == [layout == "channels_last"]
    want = F.avg_pool2d(a + b, 2, 2)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_twin_where_the_kernel_cannot_run_in_place(kernel_calls):
    """Gradients wanted, fp64, odd sizes, mixed dtypes or layouts, other strides: torch's ops, torch's result."""
    device, calls = kernel_calls
    a, b = _pair((2, 3, 6, 8), device=device)
    cases = {
        "odd H and W (floored, as torch)": _pair((1, 2, 7, 9), device=device),
        "fp64": tuple(t.double() for t in (a, b)),
        "mixed dtypes": (a, b.half()),
        "mixed layouts": (a, b.contiguous(memory_format=torch.channels_last)),
        "transposed": (a.transpose(2, 3), b.transpose(2, 3)),
    }
    for name, (x, y) in cases.items():
        assert torch.equal(add_avg_pool2d(x, y), F.avg_pool2d(x + y, 2, 2)), name
    assert calls == []
    a.requires_grad_(True)
    out = add_avg_pool2d(a, b)
    assert calls == [] and out.requires_grad
    (ga,) = torch.autograd.grad(out.square().sum(), a)
    a_ref = a.detach().clone().requires_grad_(True)
    (ga_ref,) = torch.autograd.grad(F.avg_pool2d(a_ref + b, 2, 2).square().sum(), a_ref)
    assert torch.equal(ga, ga_ref)
    with torch.no_grad():  # no graph to build: the kernel again
        add_avg_pool2d(a, b)
    assert calls == [False]


def test_cpu_default_is_torchs_own_result(monkeypatch):
    monkeypatch.delenv("UNLEARN_FAST_BACKEND", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = _pair((1, 4, 8, 8), dtype=dtype)
        assert torch.equal(add_avg_pool2d(a, b), F.avg_pool2d(a + b, 2, 2))
        assert torch.equal(add_avg_pool2d_reference(a, b), F.avg_pool2d(a + b, 2, 2))


@pytest.mark.parametrize("fn", [add_avg_pool2d, add_avg_pool2d_reference])
def test_bad_arguments_are_named(fn):
    a, b = _pair()
    with pytest.raises(TypeError, match="b must be a tensor"):
        fn(a, [1.0])
    with pytest.raises(TypeError, match="floating-point"):
        fn(a.long(), b.long())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fn(a[0], b[0])
    with pytest.raises(ValueError, match="one shape"):
        fn(a, b[:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        fn(a[..., :1], b[..., :1])
    with pytest.raises(ValueError, match="one channel"):
        fn(a[:, :0], b[:, :0])
    assert fn(a[:0], b[:0]).shape == (0, 3, 3, 4)  # an empty batch is torch's empty result
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            fn(a, b.cuda())
