"""unlearn_fast/kernels/residual_avg_pool.py: residual add + 2x2 average pool against a float64 restatement, NCHW
and channels_last, and against torch's own add + avg_pool2d.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one. Shapes cover
several column and row blocks per plane (out_w > 64), more than one channel block (C > 128, channels_last),
N = 1, C = 1, planes that are not powers of two and the smallest map (2 x 2).

Tolerances, ref = the float64 mean of the window's four sums, each sum rounded to the dtype as torch's add
rounds it: |out - ref| <= atol + rtol * (|ref| + mean |sum|) (the second term: the window's fp32 adds, and in
the interpreter a truncating cast of a sum, are relative to the sums, which may cancel in the mean):
- fp32: rtol 1e-6, atol 1e-7.
- fp16: rtol 2^-10, bf16: rtol 2^-7 (the mean rounded to the dtype: under an ulp; triton 3.8's interpreter
  truncates casts to bf16, under an ulp too), atol 1e-6.
- against torch's add + avg_pool2d on the same device: bit for bit in fp32, fp16 and bf16 on a GPU (the kernel
  rounds as torch's CUDA ops do); on the CPU within the tolerances above (torch's CPU pool may accumulate
  otherwise, and the interpreter's bf16 casts truncate).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from unlearn_fast.kernels.residual_avg_pool import add_avg_pool2d_forward  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float16: dict(rtol=2.0 ** -10, atol=1e-6),
       torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6)}
SHAPES = [(2, 3, 8, 8), (1, 1, 2, 2), (3, 5, 6, 10), (1, 2, 34, 260), (2, 130, 4, 6), (1, 4, 66, 2)]


def _pair(shape, dtype, device, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(2))
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    return a, b


def _windows(a, b):
    """The four sums of each window, rounded to the dtype as torch's add rounds them, in float64: [4, N, C, h, w]."""
    s = (a.double() + b.double()).to(a.dtype).double()  # [N, C, H, W]
    return torch.stack([s[..., 0::2, 0::2], s[..., 0::2, 1::2], s[..., 1::2, 0::2], s[..., 1::2, 1::2]])


def _assert_within(out, a, b, rtol, atol):
    sums = _windows(a, b)
    ref, scale = sums.mean(0), sums.abs().mean(0)
    err = (out.double() - ref).abs()
    bound = atol + rtol * (ref.abs() + scale)
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"{int((err > bound).sum())}/{out.numel()} outside: at flat index "
                                        f"{int(worst)}, out {out.flatten()[worst].item()!r}, "
                                        f"ref {ref.flatten()[worst].item()!r}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_restatement(device, shape, dtype, channels_last):
    a, b = _pair(shape, dtype, device, channels_last)
    out = add_avg_pool2d_forward(a, b, channels_last)
    n, c, h, w = shape
    assert out.shape == (n, c, h // 2, w // 2) and out.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    _assert_within(out.cpu(), a.cpu(), b.cpu(), **TOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_torch_add_then_pool(device, dtype, channels_last):
    a, b = _pair((2, 130, 12, 70), dtype, device, channels_last, seed=3)
    out = add_avg_pool2d_forward(a, b, channels_last)
    want = F.avg_pool2d(a + b, 2, 2)
    if device == "cuda":
        assert torch.equal(out, want)
    else:
        _assert_within(out.cpu(), a.cpu(), b.cpu(), **TOL[dtype])
        _assert_within(want.cpu(), a.cpu(), b.cpu(), **TOL[dtype])  # the oracle holds for torch's ops too


def test_sum_is_rounded_to_the_dtype_before_pooling(device):
    """a + b cancels to a value fp16 cannot hold exactly: the kernel must round the sum as torch's add does
    (1 + 2^-11 rounds to 1 in fp16), not pool the exact fp32 sum."""
    a = torch.full((1, 1, 2, 2), 1.0, dtype=torch.float16, device=device)
    b = torch.full((1, 1, 2, 2), 2.0 ** -11, dtype=torch.float16, device=device)
    b[0, 0, 0, 0] = 2.0 ** -11 + 2.0 ** -21  # the exact fp32 sum of this one would round up, not to 1
    out = add_avg_pool2d_forward(a, b, False)
    sums = (a.float() + b.float()).half().float()
    assert out.item() == sums.mean().half().item() == 1.0


def test_nonfinite_values_propagate(device):
    a, b = _pair((1, 2, 4, 4), torch.float32, device, False)
    a[0, 0, 0, 0] = float("inf")
    a[0, 1, 3, 3] = float("nan")
    out = add_avg_pool2d_forward(a, b, False)
    assert out[0, 0, 0, 0].item() == float("inf") and out[0, 1, 1, 1].isnan()
    assert torch.isfinite(out).sum().item() == out.numel() - 2


def test_refuses_tensors_it_cannot_reach():
    from unlearn_fast.kernels.launch_device import interpreted
    from unlearn_fast.kernels.residual_avg_pool import _add_avg_pool_nchw_kernel
    if interpreted(_add_avg_pool_nchw_kernel):
        pytest.skip("the interpreter runs on any device")
    a = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="CUDA"):
        add_avg_pool2d_forward(a, a, False)
