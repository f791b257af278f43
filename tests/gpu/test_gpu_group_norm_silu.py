"""GPU checks of the fused GroupNorm (+ SiLU) (skipped without CUDA): the op on Triton against a float64
restatement on the VQGAN tokenizer's shapes (GroupNorm(32, eps 1e-6) then swish), in fp32 / fp16 / bf16, both
launch shapes (one program per group, and the split two-launch path), determinism, and int64 offsets on a
tensor of more than 2^31 elements; each also for channels_last (NHWC) x, read in place into a channels_last
output (the VQGAN run channels_last, so cuDNN's bf16 convs need no transposes).

Inputs look like activations: per-channel offsets (std 2) and scales (0.5..2), so groups mix channels of
different means. Tolerances (|out - ref| <= atol + rtol * |ref|, ref in float64 from the same rounded inputs):
fp32 out rtol 1e-5, atol 1e-5 (fp32 statistics over up to 262144 elements per group); fp16 out rtol 2^-10,
bf16 out rtol 2^-7 (about one ulp), atol 1e-5. channels_last against the NCHW output of the same tensor: twice
these (each is within them of the exact value; their fp32 statistics are summed in different orders).
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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_more_than_2_31_elements(layout):
    # [264, 128, 256, 256] bf16 = 2.2e9 elements (4.4 GB in, 4.4 GB out): group (NCHW) or sample (NHWC) bases
    # past 2^31 need int64
    from unlearn_fast.kernels.group_norm_silu import group_norm_silu_forward
    shape = (264, 128, 256, 256)
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.empty(shape, device="cuda", dtype=torch.bfloat16, memory_format=layout).normal_(generator=g)
    x[-1].mul_(3.0).add_(5.0)  # the last sample differs, so a wrapped offset would be caught
    w = 1.0 + 0.3 * torch.randn(shape[1], device="cuda", generator=g)
    b = 0.3 * torch.randn(shape[1], device="cuda", generator=g)
    for split in (None, 2):
        out = group_norm_silu_forward(x, GROUPS, w, b, EPS, True, split=split)
        assert out.is_contiguous(memory_format=layout)
        for i in (0, shape[0] - 1):
            assert_close_report(out[i:i + 1], _reference64(x[i:i + 1], w, b, True), **TOL[torch.bfloat16],
                                name=f"sample {i}, split={split}")
        del out
        torch.cuda.empty_cache()


# ---- channels_last (NHWC) ----

def _double(tolerance):
    return {k: 2 * v for k, v in tolerance.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", VQGAN_SHAPES)
def test_channels_last_op_on_vqgan_shapes(monkeypatch, shape, dtype):
    from unlearn_fast.kernels import group_norm_silu as kernels
    from unlearn_fast.ops.group_norm_silu import group_norm_silu
    x, w, b = _activations(shape, dtype, seed=shape[1] + 1)
    x_cl = x.to(memory_format=torch.channels_last)
    launched = []
    real = kernels.group_norm_silu_forward
    monkeypatch.setattr(kernels, "group_norm_silu_forward", lambda *a, **k: launched.append(a[0]) or real(*a, **k))
    with torch.no_grad():
        out = group_norm_silu(x_cl, GROUPS, w, b, EPS, silu=True)
        plain = group_norm_silu(x_cl, GROUPS, w, b, EPS, silu=False, out_dtype=torch.float32)
        nchw = group_norm_silu(x, GROUPS, w, b, EPS, silu=True)
    assert [t.data_ptr() for t in launched[:2]] == [x_cl.data_ptr()] * 2  # read in place, no NCHW copy
    for t in (out, plain):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert out.dtype == dtype and plain.dtype == torch.float32
    assert_close_report(out, _reference64(x, w, b, True), **TOL[dtype], name=f"nhwc {shape} {dtype} silu")
    assert_close_report(plain, _reference64(x, w, b, False), **TOL[torch.float32], name=f"nhwc {shape} {dtype}")
    assert_close_report(out, nchw, **_double(TOL[dtype]), name=f"nhwc vs nchw {shape} {dtype}")


@pytest.mark.parametrize("flat_tiles", [None, False])
@pytest.mark.parametrize("split,groups_per_program", [(None, None), (1, None), (3, None), (None, 1), (None, 8)])
def test_channels_last_launch_shapes_agree_and_are_deterministic(split, groups_per_program, flat_tiles):
    # [2, 128, 256, 256] bf16, Cg 4: by default 4 groups (32 bytes) per program in flat tiles, and split, as there
    # are only 16 programs; split=1 walks 256 tiles of 256 pixels in each program; GPP 1 and 8 for the tuning
    # knob; flat_tiles=False the 3-D tiles
    from unlearn_fast.kernels.group_norm_silu import group_norm_silu_forward
    x, w, b = _activations((2, 128, 256, 256), torch.bfloat16, seed=8)
    x = x.to(memory_format=torch.channels_last)
    kwargs = dict(split=split, groups_per_program=groups_per_program, flat_tiles=flat_tiles)
    out = group_norm_silu_forward(x, GROUPS, w, b, EPS, True, **kwargs)
    assert torch.equal(out, group_norm_silu_forward(x, GROUPS, w, b, EPS, True, **kwargs))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_report(out, _reference64(x, w, b, True), **TOL[torch.bfloat16], name=f"nhwc {kwargs}")
