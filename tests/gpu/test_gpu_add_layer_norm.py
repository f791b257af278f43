"""GPU checks of the fused residual add + LayerNorm (skipped without CUDA): the compiled kernels on ViT shapes
(MAE-L 64x50x1024, a 64x129x768 stream, a D that is no multiple of 16), fp32 / bf16 / fp16, against float64
LayerNorm of the kernel's s and against torch's own autocast path; forward and backward, determinism, CUDA-graph
capture, the op's autograd under autocast, and int64 offsets past 2^31 elements.

Tolerances (|a - b| <= atol + rtol * |b|, b in float64 from the same rounded inputs): s bit-equal to torch's
``x + branch`` (both round to nearest on the GPU); values stored in fp32 rtol 1e-5, atol 1e-5; in fp16 / bf16
two ulps relative (2^-9 / 2^-6), atol 1e-5; rstd rtol 1e-5; grad_weight / grad_bias (fp32 sums over up to 8256
rows) rtol 1e-5, atol 2.5e-7 * rows (a few times the worst-case fp32 summation error of terms of size ~1).
Against torch's autocast path (its own fp32 sums, in another order) the same stored-dtype tolerances.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EPS = 1e-6
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2.0 ** -9, atol=1e-5), BF16: dict(rtol=2.0 ** -6, atol=1e-5)}
SHAPES = [(64, 50, 1024), (64, 129, 768), (3, 197, 1000)]
# (x dtype, branch dtype, out dtype): MAE-L under bf16 autocast (fp32 stream, bf16 branch, bf16 for the Linear),
# an all-bf16 model, fp16 autocast, an fp16 model keeping fp32 norm outputs
DTYPES = [(F32, BF16, BF16), (BF16, BF16, BF16), (F32, F16, F16), (F16, F16, F32)]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")


def _activations(shape, x_dtype, branch_dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    d = shape[-1]
    offset = 2.0 * torch.randn(d, device="cuda", generator=g)  # per-channel offsets and scales, as a residual stream
    scale = 0.5 + 1.5 * torch.rand(d, device="cuda", generator=g)
    x = (torch.randn(shape, device="cuda", generator=g) * scale + offset).to(x_dtype)
    branch = None if branch_dtype is None else (0.5 * torch.randn(shape, device="cuda", generator=g)).to(branch_dtype)
    w = 1.0 + 0.3 * torch.randn(d, device="cuda", generator=g)
    b = 0.3 * torch.randn(d, device="cuda", generator=g)
    return x, branch, w, b


def _norm_and_grads64(s, w, b, grad_h, grad_s):
    """float64 (h, rstd, d/ds total, d/dw, d/db) of LayerNorm(s), for ``sum(h * grad_h) + sum(s * grad_s)``."""
    s64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (s, w, b))
    h = F.layer_norm(s64, (s.shape[-1],), w64, b64, EPS)
    g_s, g_w, g_b = torch.autograd.grad((h * grad_h.double()).sum(), (s64, w64, b64))
    if grad_s is not None:
        g_s = g_s + grad_s.double()
    var = s64.detach().var(dim=-1, unbiased=False).reshape(-1)
    return h.detach(), 1.0 / torch.sqrt(var + EPS), g_s, g_w, g_b


@pytest.mark.parametrize("x_dtype,branch_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_float64_on_vit_shapes(shape, x_dtype, branch_dtype, out_dtype):
    from unlearn_fast.kernels.add_layer_norm import add_layer_norm_backward, add_layer_norm_forward
    x, branch, w, b = _activations(shape, x_dtype, branch_dtype, seed=shape[-1])
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, out_dtype)
    assert torch.equal(s, x + branch)
    g = torch.Generator(device="cuda").manual_seed(1)
    grad_h = torch.randn(shape, device="cuda", generator=g).to(out_dtype)
    grad_s = torch.randn(shape, device="cuda", generator=g).to(s.dtype)
    h64, rstd64, g_s64, g_w64, g_b64 = _norm_and_grads64(s, w, b, grad_h, grad_s)
    assert_close_report(h, h64, **TOL[out_dtype], name="h")
    assert_close_report(rstd, rstd64, rtol=1e-5, atol=0.0, name="rstd")
    grads = add_layer_norm_backward(grad_h, grad_s, s, w, mean, rstd, x_dtype, branch_dtype, True, True, b.dtype)
    grad_x, grad_branch, grad_w, grad_b = grads
    assert grad_x.dtype == x_dtype and grad_branch.dtype == branch_dtype
    assert_close_report(grad_x, g_s64, **TOL[x_dtype], name="grad_x")
    assert_close_report(grad_branch, g_s64, **TOL[branch_dtype], name="grad_branch")
    rows = x.numel() // shape[-1]
    assert_close_report(grad_w, g_w64, rtol=1e-5, atol=2.5e-7 * rows, name="grad_weight")
    assert_close_report(grad_b, g_b64, rtol=1e-5, atol=2.5e-7 * rows, name="grad_bias")
    again = add_layer_norm_backward(grad_h, grad_s, s, w, mean, rstd, x_dtype, branch_dtype, True, True, b.dtype)
    assert all(torch.equal(a, c) for a, c in zip(grads, again))  # fixed reduction order, no atomics


@pytest.mark.parametrize("x_dtype,branch_dtype,out_dtype", DTYPES[:3])
def test_op_matches_torchs_autocast_path_forward_and_backward(x_dtype, branch_dtype, out_dtype):
    # the block's `s = x + branch; h = norm(s)` under autocast, h cast by the next Linear, against the op.
    # grad_x / grad_branch against float64: torch's autograd rounds the norm's part to s's dtype before adding
    # s's own gradient (two roundings in bf16 / fp16), the op sums in fp32 and rounds once
    from unlearn_fast.ops.add_layer_norm import add_layer_norm
    shape = (64, 50, 1024)
    x, branch, w, b = _activations(shape, x_dtype, branch_dtype, seed=2)
    g = torch.Generator(device="cuda").manual_seed(3)
    grad_h = torch.randn(shape, device="cuda", generator=g).to(out_dtype)
    grad_s = torch.randn(shape, device="cuda", generator=g).to(torch.promote_types(x_dtype, branch_dtype))

    def run(fused):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, branch, w, b)]
        with torch.autocast("cuda", dtype=out_dtype):
            if fused:
                s, h = add_layer_norm(*leaves, EPS, out_dtype)
            else:
                s = leaves[0] + leaves[1]
                h = F.layer_norm(s, (shape[-1],), leaves[2], leaves[3], EPS)
                assert h.dtype == F32  # autocast runs layer_norm in fp32
                h = h.to(out_dtype)  # what the next Linear's autocast does
        torch.autograd.backward((s, h), (grad_s, grad_h))
        return s.detach(), h.detach(), [t.grad for t in leaves]

    s, h, grads = run(True)
    s_ref, h_ref, grads_ref = run(False)
    assert torch.equal(s, s_ref) and h.dtype == h_ref.dtype == out_dtype
    assert_close_report(h, h_ref, **TOL[out_dtype], name="h")
    _, _, g_s64, _, _ = _norm_and_grads64(s, w, b, grad_h, grad_s)
    for name, got, ref in zip(("x", "branch", "weight", "bias"), grads, grads_ref):
        assert got.dtype == ref.dtype, name
        if name in ("weight", "bias"):
            assert_close_report(got, ref, rtol=1e-5, atol=2.5e-7 * 3200, name=name)
        else:
            assert_close_report(got, g_s64, **TOL[got.dtype], name=name)


def test_backward_without_grad_s_and_partial_gradients():
    from unlearn_fast.kernels.add_layer_norm import add_layer_norm_backward, add_layer_norm_forward
    shape = (64, 129, 768)
    x, branch, w, b = _activations(shape, F32, BF16, seed=4)
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, BF16)
    grad_h = torch.randn(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)).to(BF16)
    _, _, g_s64, g_w64, _ = _norm_and_grads64(s, w, b, grad_h, None)
    grad_x, grad_branch, grad_w, grad_b = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, None, BF16, True,
                                                                  False)
    assert grad_x is None and grad_b is None
    assert_close_report(grad_branch, g_s64, **TOL[BF16], name="grad_branch")
    assert_close_report(grad_w, g_w64, rtol=1e-5, atol=2.5e-7 * 64 * 129, name="grad_weight")


def test_launchers_capture_in_a_cuda_graph():
    # no host sync: forward and backward replay from a graph with new inputs copied in
    from unlearn_fast.kernels.add_layer_norm import add_layer_norm_backward, add_layer_norm_forward
    shape = (64, 50, 1024)
    x, branch, w, b = _activations(shape, F32, BF16, seed=6)
    grad_h = torch.randn(shape, device="cuda").to(BF16)

    def step():
        s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, BF16)
        return (s, h) + add_layer_norm_backward(grad_h, None, s, w, mean, rstd, F32, BF16, True, True, F32)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new = _activations(shape, F32, BF16, seed=7)
    for static, value in zip((x, branch, w, b), new):
        static.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for got, ref in zip(captured, eager):
        assert torch.equal(got, ref)


def test_more_than_2_31_elements():
    # [2^21 + 64, 1024] bf16 = 2.15e9 elements: row offsets past 2^31 need int64
    from unlearn_fast.kernels.add_layer_norm import add_layer_norm_backward, add_layer_norm_forward
    rows, d = 2 ** 21 + 64, 1024
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.empty((rows, d), device="cuda", dtype=BF16).normal_(generator=g)
    x[-3:].mul_(3.0).add_(5.0)  # the last rows differ, so a wrapped offset would be caught
    w = 1.0 + 0.3 * torch.randn(d, device="cuda", generator=g)
    b = 0.3 * torch.randn(d, device="cuda", generator=g)
    s, h, mean, rstd = add_layer_norm_forward(x, None, w, b, EPS, BF16)
    assert s is x
    grad_x, _, _, _ = add_layer_norm_backward(h, None, s, w, mean, rstd, BF16, None, False, False)
    for i in (0, rows - 2):
        h64, _, g_s64, _, _ = _norm_and_grads64(x[i:i + 2], w, b, h[i:i + 2], None)
        assert_close_report(h[i:i + 2], h64, **TOL[BF16], name=f"h rows {i}")
        assert_close_report(grad_x[i:i + 2], g_s64, **TOL[BF16], name=f"grad_x rows {i}")
