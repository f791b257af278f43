"""unlearn_fast/kernels/add_layer_norm.py: fused residual add + LayerNorm, forward and backward, against float64.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one. The oracle is
float64 LayerNorm (and its autograd) of the kernel's own s, so that s's rounding is checked once, on its own:

- s = x + branch: exact (bit-equal to torch's ``x + branch``) except bf16 s under the interpreter, which
  truncates fp32 -> bf16 instead of rounding (within one bf16 ulp: rtol 2^-7).
- h, grad_x, grad_branch stored in fp32: rtol 1e-5, atol 1e-5 (fp32 statistics and arithmetic; atol for
  values near 0, where the backward's ``dxhat - mean - xhat * c`` cancels).
- stored fp16 / bf16: two ulps relative (fp16 2^-9, bf16 2^-6: rounding is half an ulp, or under one with the
  interpreter's truncation, plus the fp32 error before it), atol 1e-5 for values near 0.
- mean, rstd: rtol 1e-5 (fp32 sums of D values).
- grad_weight, grad_bias (fp32 sums over rows): rtol 1e-5, atol 1e-5; in fp16 / bf16 two ulps as above.
- a large-mean row (mean 1e4, std 1): rstd still to 1e-5 (two-pass variance; E[s^2] - E[s]^2 in fp32 is off by
  far more, checked), the mean to 2 ulps of 1e4, h to ``4 * ulp(1e4) * rstd * max|w|``: the fp32 mean itself
  is only good to half an ulp of 1e4, as in torch's own fp32 LayerNorm.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report

pytest.importorskip("triton")
from unlearn_fast.kernels.add_layer_norm import (MAX_LAYER_NORM_D, _backward_programs,  # noqa: E402
                                                 _tile, add_layer_norm_backward, add_layer_norm_forward)

EPS = 1e-6
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2.0 ** -9, atol=1e-5), BF16: dict(rtol=2.0 ** -6, atol=1e-5)}
STAT_TOL = dict(rtol=1e-5, atol=0.0)

# [..., D]: one element, one row (1-D x), D not a power of two (5, 33, 96, 768), a last tile of fewer rows
SHAPES = [(1, 1, 1), (7,), (3, 5), (2, 7, 33), (4, 3, 96), (2, 5, 768)]
# (x dtype, branch dtype or None, out dtype)
DTYPES = [(F32, F32, F32), (F32, BF16, BF16), (F32, F16, F16), (F32, BF16, F32), (BF16, BF16, BF16),
          (BF16, BF16, F32), (F16, None, F16), (F32, None, BF16), (BF16, F16, BF16)]


def _randn(shape, dtype, gen, mean=0.0, std=1.0, device="cpu"):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype).to(device)


def _inputs(shape, x_dtype, branch_dtype, device, seed, affine=(True, True), param_dtype=F32, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = _randn(shape, x_dtype, g, mean=mean, device=device)
    branch = None if branch_dtype is None else _randn(shape, branch_dtype, g, std=0.5, device=device)
    w = _randn(d, param_dtype, g, mean=1.0, std=0.5, device=device) if affine[0] else None
    b = _randn(d, param_dtype, g, std=0.5, device=device) if affine[1] else None
    return x, branch, w, b


def _norm64(s, w, b):
    """(h, mean, rstd) in float64 of the given (already rounded) s."""
    s64 = s.double()
    mean = s64.mean(dim=-1, keepdim=True)
    var = ((s64 - mean) ** 2).mean(dim=-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(var + EPS)
    h = (s64 - mean) * rstd
    h = h * w.double() if w is not None else h
    h = h + b.double() if b is not None else h
    return h, mean.reshape(-1), rstd.reshape(-1)


def _grads64(s, w, b, grad_h, grad_s):
    """(d/ds total, d/dw, d/db) in float64 of ``sum(h * grad_h) + sum(s * grad_s)``, h = LayerNorm(s)."""
    s64 = s.detach().double().requires_grad_(True)
    w64 = None if w is None else w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    h = F.layer_norm(s64, (s.shape[-1],), w64, b64, EPS)
    leaves = [t for t in (s64, w64, b64) if t is not None]
    grads = dict(zip([id(t) for t in leaves], torch.autograd.grad((h * grad_h.double()).sum(), leaves)))
    g_s = grads[id(s64)] + (0.0 if grad_s is None else grad_s.double())
    return g_s, None if w64 is None else grads[id(w64)], None if b64 is None else grads[id(b64)]


def _check_s(s, x, branch, device):
    expected = x + branch  # torch's promotion and rounding
    assert s.dtype == expected.dtype and s.shape == x.shape
    if s.dtype == BF16 and device == "cpu":  # the interpreter truncates fp32 -> bf16
        assert_close_report(s, expected, rtol=2.0 ** -7, atol=0.0, name="s (bf16, interpreter)")
    else:
        assert torch.equal(s, expected)


@pytest.mark.parametrize("x_dtype,branch_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64(device, shape, x_dtype, branch_dtype, out_dtype):
    x, branch, w, b = _inputs(shape, x_dtype, branch_dtype, device, seed=sum(shape))
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, out_dtype)
    if branch is None:
        assert s is x  # no copy
    else:
        _check_s(s, x, branch, device)
    h64, mean64, rstd64 = _norm64(s, w, b)
    assert h.dtype == out_dtype and mean.dtype == rstd.dtype == F32 and mean.shape == (x.numel() // shape[-1],)
    assert_close_report(h, h64, **TOL[out_dtype], name="h")
    assert_close_report(mean, mean64, rtol=1e-5, atol=1e-6, name="mean")
    assert_close_report(rstd, rstd64, **STAT_TOL, name="rstd")

    g = torch.Generator().manual_seed(1)
    grad_h = _randn(shape, out_dtype, g, device=device)
    grad_s = None if branch is None else _randn(shape, s.dtype, g, device=device)
    grad_x, grad_branch, grad_w, grad_b, grad_bb = add_layer_norm_backward(
        grad_h, grad_s, s, w, mean, rstd, x_dtype, branch_dtype, True, True, b.dtype, programs=2)
    assert grad_bb is None  # not asked
    g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, grad_s)
    assert grad_x.dtype == x_dtype and grad_w.dtype == w.dtype and grad_b.dtype == b.dtype
    assert_close_report(grad_x, g_s64, **TOL[x_dtype], name="grad_x")
    if branch is None:
        assert grad_branch is None
    else:
        assert grad_branch.dtype == branch_dtype
        assert_close_report(grad_branch, g_s64, **TOL[branch_dtype], name="grad_branch")
        assert (grad_branch is grad_x) == (branch_dtype == x_dtype)  # one store when the dtypes agree
    assert_close_report(grad_w, g_w64, **TOL[F32], name="grad_weight")
    assert_close_report(grad_b, g_b64, **TOL[F32], name="grad_bias")


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)])
def test_missing_weight_or_bias(device, affine):
    shape = (3, 4, 33)
    x, branch, w, b = _inputs(shape, F32, BF16, device, seed=3, affine=affine)
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, F32)
    assert_close_report(h, _norm64(s, w, b)[0], **TOL[F32], name=f"h {affine}")
    grad_h = _randn(shape, F32, torch.Generator().manual_seed(4), device=device)
    grad_x, grad_branch, grad_w, grad_b, _ = add_layer_norm_backward(
        grad_h, None, s, w, mean, rstd, F32, BF16, w is not None, b is not None, None if b is None else b.dtype)
    g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, None)
    assert_close_report(grad_x, g_s64, **TOL[F32], name="grad_x")
    assert_close_report(grad_branch, g_s64, **TOL[BF16], name="grad_branch")
    assert (grad_w is None) == (w is None) and (grad_b is None) == (b is None)
    if w is not None:
        assert_close_report(grad_w, g_w64, **TOL[F32], name="grad_weight")
    if b is not None:
        assert_close_report(grad_b, g_b64, **TOL[F32], name="grad_bias")


@pytest.mark.parametrize("param_dtype", [BF16, F16])
def test_half_precision_parameters(device, param_dtype):
    # weight / bias of the model's dtype: read as they are, gradients written in it
    shape = (5, 96)
    x, branch, w, b = _inputs(shape, BF16, BF16, device, seed=5, param_dtype=param_dtype)
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, BF16)
    assert_close_report(h, _norm64(s, w, b)[0], **TOL[BF16], name="h")
    grad_h = _randn(shape, BF16, torch.Generator().manual_seed(6), device=device)
    _, _, grad_w, grad_b, _ = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, None, None, True, True,
                                                      b.dtype)
    _, g_w64, g_b64 = _grads64(s, w, b, grad_h, None)
    assert grad_w.dtype == grad_b.dtype == param_dtype
    assert_close_report(grad_w, g_w64, **TOL[param_dtype], name="grad_weight")
    assert_close_report(grad_b, g_b64, **TOL[param_dtype], name="grad_bias")


@pytest.mark.parametrize("wanted", ["x", "branch", "params", "weight", "bias"])
def test_only_the_requested_gradients(device, wanted):
    shape = (6, 33)
    x, branch, w, b = _inputs(shape, F32, BF16, device, seed=7)
    s, _, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, BF16)
    grad_h = _randn(shape, BF16, torch.Generator().manual_seed(8), device=device)
    want_w, want_b = wanted in ("params", "weight"), wanted in ("params", "bias")
    grads = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, F32 if wanted == "x" else None,
                                    BF16 if wanted == "branch" else None, want_w, want_b, b.dtype)
    g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, None)
    expected = dict(x=g_s64, branch=g_s64, weight=g_w64, bias=g_b64)
    assert grads[4] is None  # branch_bias's: not asked
    for name, got in zip(("x", "branch", "weight", "bias"), grads):
        asked = name == wanted or (wanted == "params" and name in ("weight", "bias"))
        assert (got is not None) == asked, name
        if asked:
            assert_close_report(got, expected[name], **TOL[got.dtype], name=name)


@pytest.mark.parametrize("programs", [None, 1, 3, 64])
def test_backward_grid_sizes_agree_and_are_deterministic(device, programs):
    # D 96: 32 rows per tile, so 37 rows are 2 tiles (the second of 5 rows) and 300 rows 10 tiles (3 programs:
    # 4, 4, 2 tiles); D 2048: 2 rows per tile, 65 tiles, and programs=64 gives 33 programs of partials, summed in
    # two steps of 32. programs beyond the tiles is capped
    for shape in ((37, 96), (300, 96), (130, 2048)):
        x, branch, w, b = _inputs(shape, F32, F32, device, seed=9)
        s, _, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, F32)
        g = torch.Generator().manual_seed(10)
        grad_h, grad_s = _randn(shape, F32, g, device=device), _randn(shape, F32, g, device=device)
        first, again = (add_layer_norm_backward(grad_h, grad_s, s, w, mean, rstd, F32, F32, True, True, F32,
                                                branch_bias_dtype=F32, programs=programs) for _ in range(2))
        assert all(torch.equal(a, b_) for a, b_ in zip(first, again))  # fixed order, no atomics
        g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, grad_s)
        assert_close_report(first[0], g_s64, **TOL[F32], name=f"grad_x {shape} programs={programs}")
        assert_close_report(first[2], g_w64, **TOL[F32], name=f"grad_weight {shape} programs={programs}")
        assert_close_report(first[3], g_b64, **TOL[F32], name=f"grad_bias {shape} programs={programs}")
        assert_close_report(first[4], g_s64.sum(0), rtol=1e-5, atol=1e-5 * shape[0],
                            name=f"grad_branch_bias {shape} programs={programs}")


@pytest.mark.parametrize("d", [96, 768])
def test_large_mean_rows_keep_their_variance(device, d):
    shape = (3, d)
    x, branch, w, b = _inputs(shape, F32, None, device, seed=11, mean=1e4)
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, F32)
    h64, mean64, rstd64 = _norm64(s, w, b)
    ulp = 2.0 ** -10  # of values in [8192, 16384)
    assert_close_report(rstd, rstd64, **STAT_TOL, name="rstd at mean 1e4")
    assert_close_report(mean, mean64, rtol=0.0, atol=2 * ulp, name="mean at mean 1e4")
    atol = 4 * ulp * rstd64.max().item() * w.abs().max().item()
    assert_close_report(h, h64, rtol=1e-5, atol=atol, name="h at mean 1e4")
    # the test can tell: a one-pass fp32 variance E[s^2] - E[s]^2 is off by far more than STAT_TOL
    one_pass = (s.float() ** 2).mean(-1) - s.float().mean(-1) ** 2
    var64 = 1.0 / rstd64.cpu() ** 2 - EPS
    assert ((one_pass.cpu().double() - var64).abs() / var64).max() > 1e-2
    grad_h = _randn(shape, F32, torch.Generator().manual_seed(12), device=device)
    grad_x, _, grad_w, grad_b, _ = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, F32, None, True, True,
                                                           F32)
    g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, None)
    # xhat = (s - mean) * rstd carries the fp32 mean's rounding: an absolute error of 2 ulp(1e4) * rstd
    xhat_err = 2 * ulp * rstd64.max().item()
    assert_close_report(grad_x, g_s64, rtol=1e-5, atol=4 * xhat_err * (grad_h.abs().max() * w.abs().max()).item(),
                        name="grad_x at mean 1e4")
    assert_close_report(grad_w, g_w64, rtol=1e-5, atol=shape[0] * xhat_err * grad_h.abs().max().item(),
                        name="grad_weight at mean 1e4")
    assert_close_report(grad_b, g_b64, **TOL[F32], name="grad_bias at mean 1e4")


def test_constant_rows_give_the_bias_and_no_nan(device):
    # var = 0: rstd = 1/sqrt(eps), xhat = 0, so h = bias and grad_x = g_s + rstd * (dxhat - mean(dxhat))
    x = torch.full((3, 7), 2.5, device=device)
    w = torch.linspace(0.5, 2.0, 7, device=device)
    b = torch.linspace(-1.0, 1.0, 7, device=device)
    s, h, mean, rstd = add_layer_norm_forward(x, None, w, b, EPS, F32)
    assert_close_report(h, b.expand(3, 7), **TOL[F32])
    assert_close_report(rstd, torch.full((3,), EPS ** -0.5), rtol=1e-6, atol=0.0)
    grad_h = torch.ones(3, 7, device=device)
    grad_x, _, grad_w, grad_b, _ = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, F32, None, True, True,
                                                           F32)
    g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, None)
    assert torch.isfinite(grad_x).all()
    assert_close_report(grad_x, g_s64, rtol=1e-5, atol=1e-5 * EPS ** -0.5)
    assert_close_report(grad_w, g_w64, **TOL[F32])
    assert_close_report(grad_b, torch.full((7,), 3.0), **TOL[F32])


def test_empty_input(device):
    x = torch.zeros(0, 5, 16, device=device)
    w = torch.ones(16, device=device)
    s, h, mean, rstd = add_layer_norm_forward(x, x.clone(), w, None, EPS, BF16)
    assert s.shape == h.shape == (0, 5, 16) and h.dtype == BF16 and mean.shape == rstd.shape == (0,)
    grad_x, grad_branch, grad_w, grad_b, _ = add_layer_norm_backward(h, None, s, w, mean, rstd, F32, F32, True,
                                                                     True)
    assert grad_x.shape == (0, 5, 16) and grad_branch is grad_x
    assert torch.equal(grad_w, torch.zeros(16, device=device)) and torch.equal(grad_b, torch.zeros(16, device=device))


def test_tile_and_grid_heuristics():
    assert _tile(1024, 3200) == (4, 1024, 8)  # MAE-L: 4 rows of 1024 per program
    assert _tile(768, 3200) == (4, 1024, 8)
    assert _tile(8192, 10) == (1, 8192, 8)
    assert _tile(5, 3) == (4, 8, 2)  # no more rows than exist (rounded up to a power of two)
    assert _tile(1, 1) == (1, 1, 2)
    cpu = torch.device("cpu")
    for tiles in range(1, 30):
        for asked in range(1, 12):
            programs = _backward_programs(cpu, tiles, 64, asked)
            per_program = -(-tiles // programs)
            assert 1 <= programs <= min(asked, tiles)
            assert (programs - 1) * per_program < tiles <= programs * per_program  # no empty program
    assert _backward_programs(cpu, 1000, 64, None) == 4  # the interpreter's default grid
    assert 3 * _backward_programs(cpu, 10 ** 6, 8192, 10 ** 6) * 8192 <= 2 ** 31  # int32 offsets into partials


def test_launchers_reject_bad_input(device):
    x, branch, w, b = _inputs((2, 3, 8), F32, F32, device, seed=13)
    with pytest.raises(ValueError, match="contiguous"):
        add_layer_norm_forward(x.transpose(0, 1), None, None, None, EPS, F32)
    with pytest.raises(ValueError, match="branch must have shape"):
        add_layer_norm_forward(x, branch[:1], w, b, EPS, F32)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        add_layer_norm_forward(x.double(), None, w, b, EPS, F32)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        add_layer_norm_forward(x, branch, w[:7], b, EPS, F32)
    with pytest.raises(ValueError, match="out_dtype"):
        add_layer_norm_forward(x, branch, w, b, EPS, torch.float64)
    with pytest.raises(ValueError, match=f"limit of {MAX_LAYER_NORM_D}"):
        add_layer_norm_forward(torch.zeros(1, MAX_LAYER_NORM_D + 1, device=device), None, None, None, EPS, F32)
    with pytest.raises(ValueError, match="D >= 1"):
        add_layer_norm_forward(torch.zeros(3, 0, device=device), None, None, None, EPS, F32)
    with pytest.raises(TypeError, match="x must be a tensor"):
        add_layer_norm_forward([1.0], None, None, None, EPS, F32)
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, F32)
    with pytest.raises(ValueError, match="mean must be fp32"):
        add_layer_norm_backward(h, None, s, w, mean.double(), rstd, F32, None, False, False)
    with pytest.raises(ValueError, match=r"rstd must have shape \(6,\)"):
        add_layer_norm_backward(h, None, s, w, mean, rstd[:5], F32, None, False, False)
    with pytest.raises(ValueError, match="grad_h must have shape"):
        add_layer_norm_backward(h[:1], None, s, w, mean, rstd, F32, None, False, False)
    with pytest.raises(ValueError, match="weight_grad needs the weight"):
        add_layer_norm_backward(h, None, s, None, mean, rstd, F32, None, True, False)
    with pytest.raises(ValueError, match="programs must be an int >= 1"):
        add_layer_norm_backward(h, None, s, w, mean, rstd, F32, None, False, False, programs=0)


# (x, branch, branch_bias dtypes): the residual stream's fp32 + a half-precision GEMM output + its fp32 bias (the
# ViT block), all half precision, and a half bias on an fp32 stream; s's dtype is torch's promotion of the three
BRANCH_BIAS_DTYPES = [(F32, BF16, F32), (F32, F16, F32), (BF16, BF16, BF16), (F32, F32, BF16), (BF16, BF16, F32)]


@pytest.mark.parametrize("x_dtype,branch_dtype,bb_dtype", BRANCH_BIAS_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 33), (4, 3, 96)])
def test_branch_bias_forward_and_gradients(device, shape, x_dtype, branch_dtype, bb_dtype):
    """s = (x + branch) + branch_bias summed in fp32 and rounded once to s's dtype; branch_bias's gradient is the rows' sum of
    s's whole gradient (through the norm and grad_s), in its own dtype; the other gradients are unchanged."""
    x, branch, w, b = _inputs(shape, x_dtype, branch_dtype, device, seed=21 + sum(shape))
    g = torch.Generator().manual_seed(22)
    bb = _randn(shape[-1], bb_dtype, g, std=0.5, device=device)
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, BF16, branch_bias=bb)
    s_dtype = torch.promote_types(torch.promote_types(x_dtype, branch_dtype), bb_dtype)
    expected = ((x.float() + branch.float()) + bb.float()).to(s_dtype)
    assert s.dtype == s_dtype
    if s_dtype == BF16 and device == "cpu":  # the interpreter truncates fp32 -> bf16
        assert_close_report(s, expected, rtol=2.0 ** -7, atol=0.0, name="s (bf16, interpreter)")
    else:
        assert torch.equal(s, expected)
    h64, _, _ = _norm64(s, w, b)
    assert_close_report(h, h64, **TOL[BF16], name="h")
    grad_h = _randn(shape, BF16, g, device=device)
    grad_s = _randn(shape, s_dtype, g, device=device)
    grad_x, grad_branch, grad_w, grad_b, grad_bb = add_layer_norm_backward(
        grad_h, grad_s, s, w, mean, rstd, x_dtype, branch_dtype, True, True, b.dtype, branch_bias_dtype=bb_dtype,
        programs=2)
    g_s64, g_w64, g_b64 = _grads64(s, w, b, grad_h, grad_s)
    g_bb64 = g_s64.reshape(-1, shape[-1]).sum(0)
    assert grad_bb.dtype == bb_dtype and grad_bb.shape == (shape[-1],)
    # fp32 sums of fp32 row terms: the rows' own rtol 1e-5, an atol for sums that cancel near 0
    tol = TOL[bb_dtype] if bb_dtype != F32 else dict(rtol=1e-5, atol=1e-5 * shape[0])
    assert_close_report(grad_bb, g_bb64, **tol, name="grad_branch_bias")
    assert_close_report(grad_x, g_s64, **TOL[x_dtype], name="grad_x")
    assert_close_report(grad_branch, g_s64, **TOL[branch_dtype], name="grad_branch")
    assert_close_report(grad_w, g_w64, **TOL[F32], name="grad_weight")
    assert_close_report(grad_b, g_b64, **TOL[F32], name="grad_bias")


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_branch_bias_gradient_alone_over_grid_sizes(device, programs):
    """Only branch_bias's gradient asked (no grad_x, no grad_branch, no norm parameters): still the rows' sum of
    s's gradient, the same for every grid, deterministic."""
    shape = (130, 96)
    x, branch, w, b = _inputs(shape, F32, BF16, device, seed=23)
    bb = _randn(96, F32, torch.Generator().manual_seed(24), device=device)
    s, _, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, BF16, branch_bias=bb)
    grad_h = _randn(shape, BF16, torch.Generator().manual_seed(25), device=device)
    first = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, None, None, False, False,
                                    branch_bias_dtype=F32, programs=programs)
    again = add_layer_norm_backward(grad_h, None, s, w, mean, rstd, None, None, False, False,
                                    branch_bias_dtype=F32, programs=programs)
    assert first[:4] == (None,) * 4 and torch.equal(first[4], again[4])
    g_s64, _, _ = _grads64(s, w, b, grad_h, None)
    assert_close_report(first[4], g_s64.sum(0), rtol=1e-5, atol=1e-5 * shape[0], name="grad_branch_bias")


def test_branch_bias_refused_without_a_branch_or_of_another_width(device):
    x, branch, w, b = _inputs((2, 8), F32, F32, device, seed=26)
    with pytest.raises(ValueError, match="branch_bias needs a branch"):
        add_layer_norm_forward(x, None, w, b, EPS, F32, branch_bias=b)
    with pytest.raises(ValueError, match=r"branch_bias must have shape \(8,\)"):
        add_layer_norm_forward(x, branch, w, b, EPS, F32, branch_bias=b[:7])
    s, h, mean, rstd = add_layer_norm_forward(x, branch, w, b, EPS, F32)
    with pytest.raises(ValueError, match="branch_bias_dtype"):
        add_layer_norm_backward(h, None, s, w, mean, rstd, F32, None, False, False, branch_bias_dtype=torch.int32)


def test_empty_input_branch_bias_gradient_is_zero(device):
    x = torch.zeros(0, 16, device=device)
    bb = torch.ones(16, device=device)
    s, h, mean, rstd = add_layer_norm_forward(x, x.clone(), None, None, EPS, F32, branch_bias=bb)
    grads = add_layer_norm_backward(h, None, s, None, mean, rstd, F32, None, False, False, branch_bias_dtype=BF16)
    assert grads[4].dtype == BF16 and torch.equal(grads[4], torch.zeros(16, dtype=BF16, device=device))
