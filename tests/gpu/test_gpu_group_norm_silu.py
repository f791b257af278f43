"""GPU checks of the fused GroupNorm (+ SiLU) (skipped without CUDA): the op on Triton against a float64
restatement on the VQGAN tokenizer's shapes (GroupNorm(32, eps 1e-6) then swish), in fp32 / fp16 / bf16, both
launch shapes (one program per group, and the split two-launch path), determinism, and int64 offsets on a
tensor of more than 2^31 elements.

Inputs look like activations: per-channel offsets (std 2) and scales (0.5..2), so groups mix channels of
different means. Tolerances (|out - ref| <= atol + rtol * |ref|, ref in float64 from the same rounded inputs):
fp32 out rtol 1e-5, atol 1e-5 (fp32 statistics over up to 262144 elements per group); fp16 out rtol 2^-10,
bf16 out rtol 2^-7 (about one ulp), atol 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_report

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GROUPS, EPS = 32, 1e-6
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2.0 ** -10, atol=1e-5),
       torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-5)}
VQGAN_SHAPES = [(2, 128, 256, 256), (4, 512, 16, 16), (3, 256, 64, 64)]


def _reference64(x, weight, bias, silu, groups=GROUPS, eps=EPS):
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, -1)  # [N, G, C/G * HW]
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    y = y * weight.double().view(1, c, 1, 1) + bias.double().view(1, c, 1, 1)
    return y * torch.sigmoid(y) if silu else y


def _activations(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = shape[1]
    offset = 2.0 * torch.randn(1, c, 1, 1, device="cuda", generator=g)
    scale = 0.5 + 1.5 * torch.rand(1, c, 1, 1, device="cuda", generator=g)
    x = (torch.randn(shape, device="cuda", generator=g) * scale + offset).to(dtype)
    weight = 1.0 + 0.3 * torch.randn(c, device="cuda", generator=g)
    bias = 0.3 * torch.randn(c, device="cuda", generator=g)
    return x, weight, bias


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", VQGAN_SHAPES)
def test_op_matches_float64_on_vqgan_shapes(shape, dtype):
    from unlearn_fast.ops.group_norm_silu import group_norm_silu
    x, w, b = _activations(shape, dtype, seed=shape[1])
    with torch.no_grad():
        out = group_norm_silu(x, GROUPS, w, b, EPS, silu=True)  # the tokenizer's norm -> swish
        plain = group_norm_silu(x, GROUPS, w, b, EPS, silu=False, out_dtype=torch.float32)
    assert out.dtype == dtype and plain.dtype == torch.float32
    assert_close_report(out, _reference64(x, w, b, True), **TOL[dtype], name=f"{shape} {dtype} silu")
    assert_close_report(plain, _reference64(x, w, b, False), **TOL[torch.float32], name=f"{shape} {dtype} plain")


@pytest.mark.parametrize("split", [None, 1, 3])
def test_launch_shapes_agree_and_are_deterministic(split):
    # [2, 128, 256, 256]: 64 groups of 262144 elements; the default splits them (fewer groups than 2 per SM),
    # split=1 is one program per group looping over 64 blocks
    from unlearn_fast.kernels.group_norm_silu import group_norm_silu_forward
    x, w, b = _activations((2, 128, 256, 256), torch.bfloat16, seed=7)
    out = group_norm_silu_forward(x, GROUPS, w, b, EPS, True, split=split)
    again = group_norm_silu_forward(x, GROUPS, w, b, EPS, True, split=split)
    assert torch.equal(out, again)  # fixed reduction order, no atomics
    assert_close_report(out, _reference64(x, w, b, True), **TOL[torch.bfloat16], name=f"split={split}")


def test_more_than_2_31_elements():
    # [264, 128, 256, 256] bf16 = 2.2e9 elements (4.4 GB in, 4.4 GB out): group bases past 2^31 need int64
    from unlearn_fast.kernels.group_norm_silu import group_norm_silu_forward
    shape = (264, 128, 256, 256)
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    x[-1].mul_(3.0).add_(5.0)  # the last sample differs, so a wrapped offset would be caught
    w = 1.0 + 0.3 * torch.randn(shape[1], device="cuda", generator=g)
    b = 0.3 * torch.randn(shape[1], device="cuda", generator=g)
    for split in (None, 2):
        out = group_norm_silu_forward(x, GROUPS, w, b, EPS, True, split=split)
        for i in (0, shape[0] - 1):
            assert_close_report(out[i:i + 1], _reference64(x[i:i + 1], w, b, True), **TOL[torch.bfloat16],
                                name=f"sample {i}, split={split}")
        del out
        torch.cuda.empty_cache()
