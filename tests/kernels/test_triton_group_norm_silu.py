"""unlearn_fast/kernels/group_norm_silu.py and group_norm_silu_nhwc.py: fused GroupNorm (+ SiLU) against a float64
restatement, NCHW and channels_last (3-D and flat tiles).

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one. Shapes are
tiny; ``block=`` and ``split=`` force the loop over blocks and the two-launch split path on them, and
``groups_per_program=`` the channels_last kernels' groups per program (masked when it does not divide G).

Tolerances (|out - ref| <= atol + rtol * |ref|, ref in float64 from the same rounded inputs):
- fp32 out: rtol 1e-5, atol 2e-6 (fp32 statistics and arithmetic; atol for values near 0, of the size of the
  affine terms times fp32's epsilon).
- fp16 out: rtol 2^-10, bf16 out: rtol 2^-7 (one ulp: rounding to nearest is half an ulp, and triton 3.8's
  interpreter truncates fp32 -> bf16, under one ulp), atol 1e-5 (subnormals and values near 0).
- large-mean inputs (mean 1e3, std 0.1): as fp32; a one-pass E[x^2] - E[x]^2 in fp32 would be off by ~100%.
- channels_last against NCHW output of the same tensor: twice the above (each is within it of the exact value;
  the two sum their fp32 statistics in different orders, so they need not agree bit for bit).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_report

pytest.importorskip("triton")
from unlearn_fast.kernels import group_norm_silu as kernels  # noqa: E402
from unlearn_fast.kernels import group_norm_silu_nhwc as nhwc_kernels  # noqa: E402
from unlearn_fast.kernels.group_norm_silu import (_block_and_warps, _split_count,  # noqa: E402
                                                  group_norm_silu_forward, reads_channels_last)
from unlearn_fast.kernels.group_norm_silu_nhwc import _nhwc_tile_and_warps  # noqa: E402

EPS = 1e-6
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.float16: dict(rtol=2.0 ** -10, atol=1e-5),
       torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-5)}


def _reference64(x, groups, weight, bias, eps, silu):
    """GroupNorm (biased variance) + SiLU in float64, written out."""
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, -1)  # [N, G, C/G * HW]
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(per_channel)
    if bias is not None:
        y = y + bias.double().view(per_channel)
    return y * torch.sigmoid(y) if silu else y


def _inputs(shape, dtype, device, seed, mean=0.0, std=1.0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    c = shape[1]
    w = (1.0 + 0.5 * torch.randn(c, generator=g)) if affine else None
    b = (0.5 * torch.randn(c, generator=g)) if affine else None
    return [None if t is None else t.to(device) for t in (x, w, b)]


# (N, C, G, spatial, block, split): C/G = 1 and > 1, N = 1, odd spatial sizes, 2-D and 3-D x, groups of several
# blocks (block=64), and the split path (split > 1)
SHAPES = [
    (2, 6, 3, (5, 7), None, None),
    (1, 4, 4, (5, 7), None, None),
    (3, 8, 2, (3, 3), None, None),
    (2, 4, 2, (), None, None),
    (2, 6, 3, (11,), None, None),
    (1, 4, 1, (9, 9), 64, None),  # 324 elements: 6 blocks in one program
    (2, 4, 2, (13, 11), 64, 3),  # 286 elements: 5 blocks in 3 chunks of 2, 2, 1
    # H*W a multiple of the block: one channel per block (scalar weight/bias), looped and split
    (1, 6, 3, (8, 16), 64, None),  # 2 channels of 2 blocks per group
    (2, 8, 2, (8, 8), 64, 3),  # 4 blocks per group in 2 chunks
    (1, 4, 2, (32, 32), None, None),  # default block for a 1024-element channel: 1024, two blocks per group
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("n,c,groups,spatial,block,split", SHAPES)
def test_matches_float64_reference_fp32(device, n, c, groups, spatial, block, split, silu, affine):
    x, w, b = _inputs((n, c) + spatial, torch.float32, device, seed=n * 100 + c, affine=affine)
    out = group_norm_silu_forward(x, groups, w, b, EPS, silu, block=block, split=split)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert_close_report(out, _reference64(x, groups, w, b, EPS, silu), **TOL[torch.float32], name="fp32")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, in_dtype, out_dtype):
    x, w, b = _inputs((2, 6, 5, 7), in_dtype, device, seed=3)
    w = w.to(torch.bfloat16) if in_dtype == torch.float16 else w  # weight dtype independent of x's
    out = group_norm_silu_forward(x, 3, w, b, EPS, True, out_dtype, block=64)
    assert out.dtype == out_dtype
    assert_close_report(out, _reference64(x, 3, w, b, EPS, True), **TOL[out_dtype], name=f"{in_dtype}->{out_dtype}")


def test_default_out_dtype_is_x_dtype(device):
    x, w, b = _inputs((1, 4, 3, 5), torch.bfloat16, device, seed=4)
    out = group_norm_silu_forward(x, 2, w, None, EPS, False)
    assert out.dtype == torch.bfloat16
    assert_close_report(out, _reference64(x, 2, w, None, EPS, False), **TOL[torch.bfloat16])


@pytest.mark.parametrize("block,split", [(None, None), (64, None), (64, 4)])
@pytest.mark.parametrize("mean,std", [(1e3, 1e-1), (-50.0, 10.0), (0.0, 1e-3)])
def test_statistics_without_cancellation(device, mean, std, block, split):
    # mean^2 / var = 1e8 for the first input; std 1e-3 makes var ~ eps
    x, w, b = _inputs((2, 4, 17, 19), torch.float32, device, seed=5, mean=mean, std=std)
    out = group_norm_silu_forward(x, 2, w, b, EPS, False, block=block, split=split)
    assert_close_report(out, _reference64(x, 2, w, b, EPS, False), **TOL[torch.float32], name=f"mean {mean}")


def test_outlier_first_element(device):
    # the group's first element is the shift of the statistics: far from the rest it must not cost accuracy
    x, _, _ = _inputs((1, 2, 15, 15), torch.float32, device, seed=6)
    x[0, 0, 0, 0] = 300.0
    out = group_norm_silu_forward(x, 1, None, None, EPS, False, block=64, split=2)
    assert_close_report(out, _reference64(x, 1, None, None, EPS, False), **TOL[torch.float32])


@pytest.mark.parametrize("silu", [True, False])
def test_constant_groups_give_the_bias(device, silu):
    # var = 0 -> y = 0 * rsqrt(eps) = 0, then the affine: out = bias (silu(bias)); C/G = 1, one element per group
    x = torch.full((3, 4, 1, 1), 7.25, device=device)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)
    b = torch.tensor([0.25, -1.5, 2.0, 0.0], device=device)
    out = group_norm_silu_forward(x, 4, w, b, EPS, silu)
    expected = (b * torch.sigmoid(b) if silu else b).expand(3, 4).reshape(3, 4, 1, 1)
    assert_close_report(out, expected, **TOL[torch.float32])


def test_large_silu_arguments(device):
    # |y| of hundreds: sigmoid must neither overflow nor give NaN (silu(-300) = -0, silu(300) = 300)
    x = torch.tensor([[[-1.0, 1.0]]], device=device).expand(1, 2, 2).contiguous()  # [1, 2, 2]
    w = torch.tensor([300.0, -300.0], device=device)
    out = group_norm_silu_forward(x, 2, w, None, EPS, True)
    assert torch.isfinite(out).all()
    assert_close_report(out, _reference64(x, 2, w, None, EPS, True), **TOL[torch.float32])


def test_deterministic_and_empty_batch(device):
    x, w, b = _inputs((2, 4, 13, 11), torch.float16, device, seed=7)
    first = group_norm_silu_forward(x, 2, w, b, EPS, True, block=64, split=3)
    assert torch.equal(first, group_norm_silu_forward(x, 2, w, b, EPS, True, block=64, split=3))
    empty = group_norm_silu_forward(x[:0], 2, w, b, EPS, True, torch.float32)
    assert empty.shape == (0, 4, 13, 11) and empty.dtype == torch.float32


def test_launcher_rejects_bad_input(device):
    x, w, _ = _inputs((2, 4, 3, 5), torch.float32, device, seed=8)
    with pytest.raises(ValueError, match="contiguous"):
        group_norm_silu_forward(x.transpose(2, 3), 2, w, None, EPS, True)
    with pytest.raises(ValueError, match="divisible"):
        group_norm_silu_forward(x, 3, w, None, EPS, True)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        group_norm_silu_forward(x.double(), 2, None, None, EPS, True)
    with pytest.raises(ValueError, match="weight"):
        group_norm_silu_forward(x, 2, w[:3], None, EPS, True)
    with pytest.raises(ValueError, match="power of two"):
        group_norm_silu_forward(x, 2, w, None, EPS, True, block=48)


def test_split_count_never_leaves_an_empty_chunk():
    cpu = torch.device("cpu")
    assert _split_count(cpu, 4, 64, None) == 1  # no split heuristic off the GPU
    for n_blocks in range(1, 41):
        for split in range(1, 50):
            chunks = _split_count(cpu, 1, n_blocks, split)
            per_chunk = -(-n_blocks // chunks)
            assert 1 <= chunks <= min(split, n_blocks)
            assert (chunks - 1) * per_chunk < n_blocks <= chunks * per_chunk


def test_block_heuristic():
    assert _block_and_warps(1, 1, None) == (64, 2)  # at least _MIN_BLOCK
    assert _block_and_warps(35 * 2, 35, None) == (128, 2)  # next power of two of a small group
    assert _block_and_warps(4 * 65536, 65536, None) == (4096, 8)  # VQGAN 256x256: capped, 16 blocks a channel
    assert _block_and_warps(8 * 1024, 1024, None) == (1024, 4)  # 32x32 channels: one channel per block
    assert _block_and_warps(16 * 256, 256, None) == (4096, 8)  # 16x16: per-element channels


# ---- channels_last (NHWC) input, read in place ----

def _channels_last(x):
    out = x.to(memory_format=torch.channels_last)
    assert not out.is_contiguous()  # the NHWC kernels, not the NCHW ones
    return out


# (N, C, G, H, W, block, split, groups_per_program): Cg = 1, 2, 3, 4, 5 (non-powers of two masked in BLOCK_C),
# N = 1 and 3, odd H/W, pixel tiles looped (block=64/32), the split path, and programs whose last groups are
# masked (GPP not dividing G)
NHWC_SHAPES = [
    (1, 6, 3, 5, 7, None, None, None),  # Cg 2, default GPP 4 > G: one program, one masked group
    (3, 4, 4, 5, 7, None, None, 1),  # Cg 1, one group per program
    (3, 4, 4, 5, 7, None, None, None),  # Cg 1, all four groups in one program
    (2, 9, 3, 5, 7, None, None, None),  # Cg 3
    (1, 9, 3, 9, 9, 64, None, 2),  # Cg 3, 8-pixel tiles: 11 tiles; second program has one masked group
    (2, 10, 2, 13, 11, 64, 3, None),  # Cg 5 (BLOCK_C 8), 4-pixel tiles, 36 tiles in 3 chunks
    (2, 12, 4, 7, 5, 32, 4, 1),  # Cg 3, 8-pixel tiles: 5 tiles in 3 chunks of 2, 2, 1
    (1, 4, 1, 3, 3, None, None, None),  # one group of all channels
    (1, 6, 3, 1, 5, None, 2, 2),  # H = 1, split with masked group
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("n,c,groups,h,w,block,split,gpp", NHWC_SHAPES)
def test_channels_last_matches_float64_reference_fp32(device, n, c, groups, h, w, block, split, gpp, silu,
                                                      affine):
    x, wt, b = _inputs((n, c, h, w), torch.float32, device, seed=n * 100 + c + h, affine=affine)
    x = _channels_last(x)
    out = group_norm_silu_forward(x, groups, wt, b, EPS, silu, block=block, split=split, groups_per_program=gpp)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_close_report(out, _reference64(x, groups, wt, b, EPS, silu), **TOL[torch.float32], name="nhwc fp32")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_channels_last_dtypes(device, in_dtype, out_dtype):
    x, w, b = _inputs((2, 9, 5, 7), in_dtype, device, seed=13)
    x = _channels_last(x)
    w = w.to(torch.bfloat16) if in_dtype == torch.float16 else w
    out = group_norm_silu_forward(x, 3, w, b, EPS, True, out_dtype, block=32)
    assert out.dtype == out_dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_report(out, _reference64(x, 3, w, b, EPS, True), **TOL[out_dtype],
                        name=f"nhwc {in_dtype}->{out_dtype}")


@pytest.mark.parametrize("dtype,split", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, 2)])
def test_channels_last_agrees_with_nchw_of_the_same_tensor(device, dtype, split):
    x, w, b = _inputs((3, 12, 6, 5), dtype, device, seed=14)
    x_cl = _channels_last(x)
    out_cl = group_norm_silu_forward(x_cl, 4, w, b, EPS, True, block=64, split=split)
    out_nchw = group_norm_silu_forward(x_cl.contiguous(), 4, w, b, EPS, True, block=64, split=split)
    assert out_nchw.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    double = {k: 2 * v for k, v in TOL[dtype].items()}
    assert_close_report(out_cl, out_nchw, **double, name=f"nhwc vs nchw {dtype}")


@pytest.mark.parametrize("block,split", [(None, None), (64, 3)])
@pytest.mark.parametrize("mean,std", [(1e3, 1e-1), (0.0, 1e-3)])
def test_channels_last_statistics_without_cancellation(device, mean, std, block, split):
    x, w, b = _inputs((2, 8, 17, 19), torch.float32, device, seed=15, mean=mean, std=std)
    x = _channels_last(x)
    out = group_norm_silu_forward(x, 2, w, b, EPS, False, block=block, split=split)
    assert_close_report(out, _reference64(x, 2, w, b, EPS, False), **TOL[torch.float32], name=f"nhwc mean {mean}")


@pytest.mark.parametrize("split", [None, 2])
def test_channels_last_outlier_first_element(device, split):
    # the shift is 300 while the rest is N(0, 1): each x - k_ref and mean - k_ref is rounded at ulp(300) / 2 =
    # 2^-16, i.e. 2^-16 / std (std ~14 here) ~ 1.1e-6 in y; a few such roundings -> atol 5e-6 (both layouts)
    x, _, _ = _inputs((1, 2, 15, 15), torch.float32, device, seed=6)
    x = _channels_last(x)
    x[0, 0, 0, 0] = 300.0
    out = group_norm_silu_forward(x, 1, None, None, EPS, False, block=64, split=split)
    assert_close_report(out, _reference64(x, 1, None, None, EPS, False), rtol=1e-5, atol=5e-6)


class _LaunchSpy:
    """Stands in for a Triton kernel: records the arguments of each launch, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.flat_flags = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(args)
            self.flat_flags.append(kwargs.get("FLAT"))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def spies(monkeypatch):
    found = {}
    for module, name in ((kernels, "_group_norm_moments_kernel"), (kernels, "_group_norm_silu_forward_kernel"),
                         (nhwc_kernels, "_group_norm_nhwc_moments_kernel"),
                         (nhwc_kernels, "_group_norm_silu_nhwc_forward_kernel")):
        found[name] = _LaunchSpy(getattr(module, name))
        monkeypatch.setattr(module, name, found[name])
    return found


def _launched(spies):
    return {name: len(spy.launches) for name, spy in spies.items() if spy.launches}


def test_channels_last_is_read_in_place(device, spies):
    x, w, b = _inputs((2, 8, 5, 7), torch.bfloat16, device, seed=16)
    x = _channels_last(x)
    out = group_norm_silu_forward(x, 4, w, b, EPS, True, block=32, split=2)
    assert _launched(spies) == {"_group_norm_nhwc_moments_kernel": 1, "_group_norm_silu_nhwc_forward_kernel": 1}
    for spy in (spies["_group_norm_nhwc_moments_kernel"], spies["_group_norm_silu_nhwc_forward_kernel"]):
        assert spy.launches[0][0].data_ptr() == x.data_ptr()  # x itself, no NCHW copy
    assert spies["_group_norm_silu_nhwc_forward_kernel"].launches[0][3] is out
    # an NCHW tensor still takes the NCHW kernel
    group_norm_silu_forward(x.contiguous(), 4, w, b, EPS, True)
    assert spies["_group_norm_silu_forward_kernel"].launches and len(spies["_group_norm_silu_nhwc_forward_kernel"]
                                                                    .launches) == 1


@pytest.mark.parametrize("shape,groups", [((2, 1, 5, 7), 1), ((3, 8, 1, 1), 4)])
def test_channels_last_that_is_also_contiguous_takes_the_nchw_kernel(device, spies, shape, groups):
    # C == 1 or H*W == 1: both layouts are the same memory; the output is both too
    x, w, b = _inputs(shape, torch.float32, device, seed=17)
    x = x.to(memory_format=torch.channels_last)
    assert x.is_contiguous() and not reads_channels_last(x, groups)
    out = group_norm_silu_forward(x, groups, w, b, EPS, True)
    assert _launched(spies) == {"_group_norm_silu_forward_kernel": 1}
    assert out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_report(out, _reference64(x, groups, w, b, EPS, True), **TOL[torch.float32])


def test_reads_channels_last():
    x = torch.empty(2, 8, 3, 5)
    cl = x.to(memory_format=torch.channels_last)
    assert reads_channels_last(cl, 4) and reads_channels_last(cl[1:], 2)  # a batch slice stays channels_last
    assert not reads_channels_last(x, 4)  # NCHW
    assert not reads_channels_last(cl[:, :, :, ::2], 4)  # strided: copied by the op
    assert not reads_channels_last(cl, 3)  # not divisible
    assert not reads_channels_last(torch.empty(2, 8, 3).transpose(1, 2), 4)  # 3-D
    wide = torch.empty(1, 8192, 2, 1).to(memory_format=torch.channels_last)
    assert reads_channels_last(wide, 2) and not reads_channels_last(wide, 1)  # Cg 4096 ok, 8192 > _MAX_BLOCK


def test_channels_last_launcher_rejects_bad_input(device):
    x, w, _ = _inputs((2, 4, 3, 5), torch.float32, device, seed=18)
    x = _channels_last(x)
    with pytest.raises(ValueError, match="channels_last-contiguous"):
        group_norm_silu_forward(x[:, :, :, ::2], 2, w, None, EPS, True)
    with pytest.raises(ValueError, match="groups_per_program must be a power of two"):
        group_norm_silu_forward(x, 2, w, None, EPS, True, groups_per_program=3)
    with pytest.raises(ValueError, match="divisible"):
        group_norm_silu_forward(x, 3, w, None, EPS, True)


def test_nhwc_tile_heuristic():
    # (BLOCK_P, GPP, BLOCK_C, warps) for (Cg, G, HW, bytes per element)
    assert _nhwc_tile_and_warps(4, 32, 65536, 2, None, None) == (32, 32, 4, 8)  # VQGAN 128 ch bf16: the 256 B row
    assert _nhwc_tile_and_warps(4, 32, 65536, 4, None, None) == (512, 2, 4, 8)  # fp32: 512 B rows, 32 B a tile row
    assert _nhwc_tile_and_warps(8, 32, 4096, 2, None, None) == (256, 2, 8, 8)  # 256 ch bf16: 32 B a tile row
    assert _nhwc_tile_and_warps(16, 32, 256, 2, None, None) == (256, 1, 16, 8)  # 512 ch, 16x16
    assert _nhwc_tile_and_warps(3, 3, 35, 4, None, None) == (64, 4, 4, 4)  # Cg 3 -> 4 lanes, GPP capped by G
    assert _nhwc_tile_and_warps(4096, 1, 9, 2, None, None) == (1, 1, 4096, 8)  # one pixel per tile
    assert _nhwc_tile_and_warps(4, 32, 65536, 2, 64, 1) == (16, 1, 4, 2)  # overrides


# (N, C, G, H, W, block, split, groups_per_program) where flat tiles are allowed (Cg a power of two, GPP | G)
FLAT_SHAPES = [
    (2, 16, 4, 5, 7, None, None, None),  # Cg 4, all four groups in one program
    (1, 16, 4, 9, 9, 64, None, 2),  # Cg 4, two programs of two groups, 8-pixel tiles looped
    (2, 16, 8, 13, 11, 64, 3, 4),  # Cg 2, split path (moments kernel flat too)
    (1, 32, 2, 3, 5, None, None, 1),  # Cg 16, one group per program
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,groups,h,w,block,split,gpp", FLAT_SHAPES)
def test_flat_and_3d_tiles_agree_with_the_reference(device, n, c, groups, h, w, block, split, gpp, dtype):
    x, wt, b = _inputs((n, c, h, w), dtype, device, seed=n * 10 + c + h)
    x = _channels_last(x)
    ref = _reference64(x, groups, wt, b, EPS, True)
    outs = [group_norm_silu_forward(x, groups, wt, b, EPS, True, block=block, split=split, groups_per_program=gpp,
                                    flat_tiles=flat) for flat in (True, False)]
    for flat, out in zip((True, False), outs):
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close_report(out, ref, **TOL[dtype], name=f"flat={flat} {dtype}")
    double = {k: 2 * v for k, v in TOL[dtype].items()}
    assert_close_report(outs[0], outs[1], **double, name="flat vs 3-D tiles")


def test_flat_tiles_are_the_default_where_allowed_and_refused_elsewhere(device, spies):
    x, w, b = _inputs((1, 16, 3, 3), torch.float32, device, seed=21)
    x = _channels_last(x)
    group_norm_silu_forward(x, 4, w, b, EPS, True)  # Cg 4, GPP divides G: flat
    group_norm_silu_forward(_channels_last(_inputs((1, 12, 3, 3), torch.float32, device, seed=22)[0]), 4, None,
                            None, EPS, True)  # Cg 3: 3-D tiles
    assert spies["_group_norm_silu_nhwc_forward_kernel"].flat_flags == [True, False]
    with pytest.raises(ValueError, match="flat tiles need"):
        group_norm_silu_forward(x, 4, w, b, EPS, True, groups_per_program=8, flat_tiles=True)  # GPP 8 > G 4
