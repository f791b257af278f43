"""add_layer_norm's ``branch_bias`` (the bias of the Linear that made the branch, added in the fused op instead of
in that GEMM): the twin is the blocks' own arithmetic on the fp32 residual stream, the fused op (Triton; the
interpreter on the CPU) matches the twin forward and in every gradient, branch_bias's included, and bad
arguments are refused by name.

Tolerances as tests/ops/test_add_layer_norm.py: values stored in fp32 rtol 1e-5, atol 1e-5 (the order of fp32 sums);
fp16 / bf16 two ulps (2^-9 / 2^-6) relative, atol 1e-5; branch_bias's gradient, an fp32 sum over rows of values
that cancel, atol 1e-5 per row.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report, triton_kernel_device
from unlearn_fast.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference

EPS = 1e-6
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2.0 ** -9, atol=1e-5), BF16: dict(rtol=2.0 ** -6, atol=1e-5)}
NAMES = ("x", "branch", "weight", "bias", "branch_bias")


def _inputs(shape, branch_dtype=BF16, bb_dtype=F32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g)
    branch = (0.5 * torch.randn(shape, generator=g)).to(branch_dtype)
    w, b = 1 + 0.5 * torch.randn(d, generator=g), 0.5 * torch.randn(d, generator=g)
    bb = (0.5 * torch.randn(d, generator=g)).to(bb_dtype)
    return [t.to(device) for t in (x, branch, w, b, bb)]


def _run(fn, tensors, which, grad_h, grad_s, out_dtype):
    leaves = [t.detach().clone().requires_grad_(n in which) for n, t in zip(NAMES, tensors)]
    x, branch, w, b, bb = leaves
    s, h = fn(x, branch, w, b, EPS, out_dtype, branch_bias=bb)
    loss = (h.float() * grad_h.float()).sum() + (s.float() * grad_s.float()).sum()
    wanted = [(n, t) for n, t in zip(NAMES, leaves) if t.requires_grad]
    return s, h, dict(zip([n for n, _ in wanted], torch.autograd.grad(loss, [t for _, t in wanted])))


def test_twin_is_the_blocks_arithmetic_with_the_bias_outside_the_gemm():
    """On the fp32 residual stream: s = x + branch + bias exactly as torch adds them, h its fp32 LayerNorm; the
    gradients are autograd's of that expression (branch_bias's = the rows' sum of s's gradient)."""
    x, branch, w, b, bb = _inputs((2, 5, 24), BF16, F32, seed=1)
    s, h = add_layer_norm_reference(x, branch, w, b, EPS, BF16, branch_bias=bb)
    s_blocks = x + branch + bb
    assert s.dtype == F32 and torch.equal(s, s_blocks)
    assert torch.equal(h, F.layer_norm(s_blocks, (24,), w, b, EPS).to(BF16))
    g = torch.Generator().manual_seed(2)
    grad_h, grad_s = torch.randn(s.shape, generator=g), torch.randn(s.shape, generator=g)
    _, _, grads = _run(add_layer_norm_reference, (x, branch, w, b, bb), NAMES, grad_h, grad_s, F32)
    s64 = x.double() + branch.double() + bb.double()
    s64.requires_grad_(True)
    h64 = F.layer_norm(s64, (24,), w.double(), b.double(), EPS)
    (g_s64,) = torch.autograd.grad((h64 * grad_h.double()).sum() + (s64 * grad_s.double()).sum(), s64)
    assert grads["branch_bias"].dtype == F32 and grads["branch"].dtype == BF16
    assert_close_report(grads["branch_bias"], g_s64.reshape(-1, 24).sum(0), rtol=1e-5, atol=1e-5 * 10,
                        name="branch_bias (twin)")
    assert_close_report(grads["x"], g_s64, **TOL[F32], name="x (twin)")


@pytest.fixture
def kernel_device(monkeypatch):
    pytest.importorskip("triton")
    from unlearn_fast.kernels import add_layer_norm as module
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    return triton_kernel_device(module._add_layer_norm_forward_kernel)


@pytest.mark.parametrize("which", [NAMES, ("branch_bias",), ("x", "branch_bias"), ("weight", "branch_bias"),
                                   ("x", "branch")])
@pytest.mark.parametrize("shape,branch_dtype,bb_dtype,out_dtype", [((3, 7, 40), BF16, F32, BF16),
                                                                    ((1, 1, 5), F16, F32, F16),
                                                                    ((4, 96), F32, F32, F32),
                                                                    ((2, 3, 33), BF16, BF16, BF16)])
def test_fused_matches_the_twin(kernel_device, which, shape, branch_dtype, bb_dtype, out_dtype):
    tensors = _inputs(shape, branch_dtype, bb_dtype, kernel_device, seed=3 + len(which))
    g = torch.Generator().manual_seed(4)
    grad_h = torch.randn(shape, generator=g).to(out_dtype).to(kernel_device)
    grad_s = torch.randn(shape, generator=g).to(kernel_device)  # s is fp32: x is
    s, h, grads = _run(add_layer_norm, tensors, which, grad_h, grad_s, out_dtype)
    s_ref, h_ref, grads_ref = _run(add_layer_norm_reference, tensors, which, grad_h, grad_s, out_dtype)
    assert s.dtype == s_ref.dtype == F32 and torch.equal(s, s_ref)  # fp32 sums in the same order
    assert_close_report(h, h_ref, **TOL[out_dtype], name="h")
    assert set(grads) == set(which)
    rows = s.numel() // shape[-1]
    for name, grad in grads.items():
        ref = grads_ref[name]
        assert grad.dtype == ref.dtype and grad.shape == ref.shape, name
        tol = dict(rtol=1e-5, atol=1e-5 * rows) if name == "branch_bias" and grad.dtype == F32 else TOL[grad.dtype]
        assert_close_report(grad, ref, **tol, name=f"grad {name}")


def test_fused_with_h_unused_passes_s_gradient_to_the_bias(kernel_device):
    x, branch, w, b, bb = _inputs((3, 16), BF16, F32, kernel_device, seed=5)
    bb.requires_grad_(True)
    s, h = add_layer_norm(x, branch, w, b, EPS, BF16, branch_bias=bb)
    (gbb,) = torch.autograd.grad((s * 3.0).sum(), bb)
    assert torch.equal(gbb, torch.full_like(bb, 9.0))  # three rows of 3.0


def test_no_grad_fused_forward_equals_the_twin(kernel_device):
    x, branch, w, b, bb = _inputs((2, 5, 24), BF16, F32, kernel_device, seed=6)
    with torch.no_grad():
        s, h = add_layer_norm(x, branch, w, b, EPS, BF16, branch_bias=bb)
    s_ref, h_ref = add_layer_norm_reference(x, branch, w, b, EPS, BF16, branch_bias=bb)
    assert torch.equal(s, s_ref) and not s.requires_grad
    assert_close_report(h, h_ref, **TOL[BF16], name="h")


@pytest.mark.parametrize("fn", [add_layer_norm, add_layer_norm_reference])
@pytest.mark.parametrize("bb,branch,error,message", [
    (torch.zeros(24), None, ValueError, "branch_bias needs a branch"),
    (torch.zeros(23), "keep", ValueError, r"branch_bias must be \[D\] = \(24,\)"),
    (torch.zeros(1, 24), "keep", ValueError, r"branch_bias must be \[D\]"),
    (torch.zeros(24, dtype=torch.float64), "keep", TypeError, "branch_bias must be fp32, fp16 or bf16"),
    ([0.0] * 24, "keep", TypeError, "branch_bias must be a tensor or None"),
    (torch.zeros(24, device="meta"), "keep", ValueError, "branch_bias is on meta"),
])
def test_bad_branch_bias(fn, bb, branch, error, message):
    x, real_branch, w, b, _ = _inputs((2, 5, 24), F32, F32)
    with pytest.raises(error, match=message):
        fn(x, real_branch if branch == "keep" else branch, w, b, EPS, None, branch_bias=bb)
