"""unlearn_fast/ops/group_norm_silu.py: validation, dispatch (kernel vs differentiable twin), output dtypes.

Tolerances: the twin against F.group_norm + F.silu in fp32: rtol 1e-5, atol 1e-6 (same fp32 math; the twin's
silu is sigmoid-then-product, an ulp from F.silu); gradients against float64 F.group_norm + silu: rtol 1e-4,
atol 1e-5 (fp32 forward and backward). Stored low-precision outputs: tests/helpers.tol of the out dtype.
The kernel path runs on CUDA, or on the CPU under Triton's interpreter with UNLEARN_FAST_BACKEND=triton.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report, record_launcher_calls, tol, triton_kernel_device
from unlearn_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_reference

EPS = 1e-6


def _inputs(shape=(2, 6, 5, 7), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = 1 + 0.5 * torch.randn(shape[1], generator=g)
    b = 0.5 * torch.randn(shape[1], generator=g)
    return x.to(device), w.to(device), b.to(device)


def _torch_semantics(x, groups, w, b, eps, silu):
    y = F.group_norm(x.float(), groups, None if w is None else w.float(), None if b is None else b.float(), eps)
    return F.silu(y) if silu else y


@pytest.fixture
def kernel_device(monkeypatch):
    """(device, calls): a device the Triton kernel runs on with UNLEARN_FAST_BACKEND=triton, and a list that
    records the x of each launcher call."""
    pytest.importorskip("triton")
    from unlearn_fast.kernels import group_norm_silu as module
    device = triton_kernel_device(module._group_norm_silu_forward_kernel)
    calls = []
    real = module.group_norm_silu_forward

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "group_norm_silu_forward", spy)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    return device, calls


@pytest.fixture
def launcher_calls(monkeypatch):
    """A list that records launcher calls, without forcing a backend."""
    pytest.importorskip("triton")
    from unlearn_fast.kernels import group_norm_silu as module
    return record_launcher_calls(monkeypatch, module, ("group_norm_silu_forward",))


def _bad(**changes):
    x, w, b = _inputs()
    args = dict(x=x, num_groups=3, weight=w, bias=b, eps=EPS, silu=True, out_dtype=None)
    args.update(changes)
    return args


BAD = [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a tensor"),
    (dict(x=torch.randn(6)), ValueError, "at least 2 dims"),
    (dict(x=torch.randn(2, 6, 3).double()), TypeError, "x must be fp32, fp16 or bf16"),
    (dict(x=torch.zeros(2, 6, 3, dtype=torch.int32)), TypeError, "x must be fp32"),
    (dict(x=torch.randn(2, 0, 3), weight=None, bias=None), ValueError, "at least one channel"),
    (dict(x=torch.randn(2, 6, 0, 3)), ValueError, "spatial sizes must be positive"),
    (dict(num_groups=4), ValueError, "not divisible into num_groups=4"),
    (dict(num_groups=0), ValueError, "num_groups=0"),
    (dict(num_groups=3.0), TypeError, "num_groups must be an int"),
    (dict(num_groups=True), TypeError, "num_groups must be an int"),
    (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(6,\)"),
    (dict(bias=torch.zeros(1, 6)), ValueError, r"bias must have shape \(6,\)"),
    (dict(weight=torch.ones(6, dtype=torch.float64)), TypeError, "weight must be fp32"),
    (dict(bias=[0.0] * 6), TypeError, "bias must be a tensor or None"),
    (dict(bias=torch.zeros(6, device="meta")), ValueError, "bias is on meta"),
    (dict(eps=0.0), ValueError, "eps must be finite and positive"),
    (dict(eps=-1e-6), ValueError, "eps must be finite and positive"),
    (dict(eps=math.inf), ValueError, "eps must be finite and positive"),
    (dict(eps=math.nan), ValueError, "eps must be finite and positive"),
    (dict(eps=torch.tensor(1e-6)), TypeError, "eps must be a python number"),
    (dict(silu=1), TypeError, "silu must be a bool"),
    (dict(out_dtype=torch.float64), TypeError, "out_dtype must be"),
    (dict(out_dtype="float16"), TypeError, "out_dtype must be"),
]


@pytest.mark.parametrize("fn", [group_norm_silu, group_norm_silu_reference])
@pytest.mark.parametrize("changes,error,message", BAD)
def test_validation(fn, changes, error, message):
    args = _bad(**changes)
    x = args.pop("x")
    with pytest.raises(error, match=message):
        fn(x, args["num_groups"], args["weight"], args["bias"], args["eps"], silu=args["silu"],
           out_dtype=args["out_dtype"])


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 7), 3), ((1, 4, 9), 4), ((3, 8), 2)])
def test_cpu_default_path_is_the_twin(monkeypatch, launcher_calls, shape, groups, silu):
    monkeypatch.delenv("UNLEARN_FAST_BACKEND", raising=False)
    x, w, b = _inputs(shape)
    out = group_norm_silu(x, groups, w, b, EPS, silu=silu)
    assert not launcher_calls  # no kernel on the CPU unless forced
    assert torch.equal(out, group_norm_silu_reference(x, groups, w, b, EPS, silu=silu))
    assert_close_report(out, _torch_semantics(x, groups, w, b, EPS, silu), rtol=1e-5, atol=1e-6)


def test_twin_with_partial_affine_and_none():
    x, w, b = _inputs()
    for ww, bb in ((w, None), (None, b), (None, None)):
        out = group_norm_silu_reference(x, 3, ww, bb, EPS, silu=True)
        assert_close_report(out, _torch_semantics(x, 3, ww, bb, EPS, True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_on_the_twin(monkeypatch, in_dtype, out_dtype):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    x, w, b = _inputs(dtype=in_dtype)
    out = group_norm_silu(x, 3, w.half(), b, EPS, silu=True, out_dtype=out_dtype)
    expected_dtype = in_dtype if out_dtype is None else out_dtype
    assert out.dtype == expected_dtype and out.shape == x.shape
    assert_close_report(out, _torch_semantics(x, 3, w.half(), b, EPS, True), **tol(expected_dtype))


@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_grad_enabled_inputs_use_the_differentiable_twin(kernel_device, which):
    device, calls = kernel_device  # the kernel would be chosen, were no gradient needed
    x, w, b = _inputs((2, 6, 5, 7), device=device, seed=1)
    leaf = {"x": x, "weight": w, "bias": b}[which].requires_grad_(True)
    out = group_norm_silu(x, 3, w, b, EPS, silu=True)
    assert not calls and out.grad_fn is not None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (grad,) = torch.autograd.grad((out * g).sum(), leaf)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y = F.group_norm(x64, 3, w64, b64, EPS)
    ref = {"x": x64, "weight": w64, "bias": b64}[which]
    (grad_ref,) = torch.autograd.grad((F.silu(y) * g.double()).sum(), ref)
    assert_close_report(grad, grad_ref, rtol=1e-4, atol=1e-5, name=f"d/d{which}")
    assert_close_report(out, F.silu(y), rtol=1e-5, atol=1e-6)


def test_no_grad_and_inference_use_the_kernel(kernel_device):
    device, calls = kernel_device
    x, w, b = _inputs((2, 6, 5, 7), dtype=torch.bfloat16, device=device, seed=3)
    w.requires_grad_(True)  # a frozen module's parameter may still require grad: no_grad decides
    with torch.no_grad():
        out = group_norm_silu(x, 3, w, b, EPS, silu=True, out_dtype=torch.float32)
    with torch.inference_mode():
        out_inf = group_norm_silu(x, 3, w, b, EPS, silu=False, out_dtype=torch.float16)
    out_nograd_needed = group_norm_silu(x, 3, w.detach(), b, EPS, silu=True)  # grad mode on, nothing requires it
    assert len(calls) == 3
    assert out.dtype == torch.float32 and out_inf.dtype == torch.float16 and out_nograd_needed.dtype == torch.bfloat16
    assert_close_report(out, _torch_semantics(x, 3, w.detach(), b, EPS, True), rtol=1e-5, atol=2e-6)
    assert_close_report(out_inf, _torch_semantics(x, 3, w.detach(), b, EPS, False), **tol(torch.float16))
    assert_close_report(out_nograd_needed, _torch_semantics(x, 3, w.detach(), b, EPS, True), **tol(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_input_is_read_in_place(kernel_device, dtype):
    # the launcher gets x itself (no NCHW copy) and the output is channels_last, with NCHW's values (up to the
    # order of the fp32 statistics' sums: twice the stored dtype's tolerance)
    device, calls = kernel_device
    x, w, b = _inputs((3, 9, 5, 7), dtype=dtype, device=device, seed=4)
    x_cl = x.to(memory_format=torch.channels_last)
    out = group_norm_silu(x_cl, 3, w, b, EPS, silu=True)
    expected = group_norm_silu(x, 3, w, b, EPS, silu=True)  # NCHW
    assert len(calls) == 2 and calls[0].data_ptr() == x_cl.data_ptr() and calls[0].stride() == x_cl.stride()
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert expected.is_contiguous() and out.dtype == dtype
    assert_close_report(out, expected, **{k: 2 * v for k, v in tol(dtype).items()}, name=f"{dtype}")
    assert_close_report(out, _torch_semantics(x, 3, w, b, EPS, True), **tol(dtype), name=f"{dtype} vs torch")


def test_other_strided_inputs_are_copied_to_nchw(kernel_device):
    device, calls = kernel_device
    x, w, b = _inputs((2, 6, 5, 7), device=device, seed=5)
    expected = group_norm_silu(x, 3, w, b, EPS, silu=True)
    wide = torch.zeros(2, 6, 5, 14, device=device)
    wide[..., ::2] = x  # a strided view with x's values
    strided = group_norm_silu(wide[..., ::2], 3, w, b, EPS, silu=True)
    assert len(calls) == 2 and calls[1].is_contiguous() and calls[1].data_ptr() != wide.data_ptr()
    assert torch.equal(strided, expected) and strided.is_contiguous()  # the same NCHW kernel on the same values
    # channels_last with more channels per group than the NHWC kernel takes: copied to NCHW too
    x, w, b = _inputs((1, 8192, 2, 1), device=device, seed=6)
    out = group_norm_silu(x.to(memory_format=torch.channels_last), 1, w, b, EPS, silu=False)
    assert len(calls) == 3 and calls[2].is_contiguous() and out.is_contiguous()
    assert_close_report(out, _torch_semantics(x, 1, w, b, EPS, False), rtol=1e-5, atol=2e-6)


def test_empty_batch(kernel_device):
    device, _ = kernel_device
    x, w, b = _inputs((0, 6, 5, 7), device=device)
    out = group_norm_silu(x, 3, w, b, EPS, silu=True, out_dtype=torch.bfloat16)
    assert out.shape == (0, 6, 5, 7) and out.dtype == torch.bfloat16
