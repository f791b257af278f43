"""unlearn_fast/kernels/retain_forget_l2.py against a float64 restatement of its math.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one.

Tolerances (kernel output vs the fp64 restatement on the *same* input values):
- row_sq: fp32 accumulation whatever the input dtype -> rtol 2e-5 (1e-4 with the fused LayerNorm, whose fp32
  mean/rstd add a few ulps per element), atol 1e-6.
- grad: fp32 math, one rounding into the latent's dtype -> fp32 rtol 1e-5 (1e-4 with the norm); fp16
  rtol 1e-3 (2^-11 rounding); bf16 rtol 8e-3, one bf16 ulp (2^-7): compiled kernels round to nearest, but
  triton 3.8's interpreter truncates fp32 -> bf16; atol 1e-5 everywhere.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_report, forget_pattern

pytest.importorskip("triton")
from unlearn_fast.kernels import retain_forget_l2_forward  # noqa: E402
from unlearn_fast.kernels.retain_forget_l2 import MAX_NORM_D  # noqa: E402

ROW_SQ_RTOL = {False: 2e-5, True: 1e-4}  # keyed by "norm fused"
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_RTOL_NORM = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ATOL_ROW_SQ, ATOL_GRAD = 1e-6, 1e-5
GRAD_SCALE = 0.37
EPS = 1e-6


def reference_row_sq_and_grad(latent, retain_table, forget_table, row_is_forget, row_index, weight=None,
                              bias=None, eps=EPS, grad_scale=GRAD_SCALE):
    """The kernel's contract, row by row, in float64."""
    n, t, d = latent.shape
    x = latent.double()
    row_sq = torch.empty(n, dtype=torch.float64)
    grad = torch.empty(n, t, d, dtype=torch.float64)
    for i in range(n):
        table = forget_table if bool(row_is_forget[i]) else retain_table
        if table is None or table.shape[0] == 0:
            y = torch.zeros(t, d, dtype=torch.float64)
        else:
            y = table[int(row_index[i])].double()
        if weight is not None:
            mu = y.mean(dim=-1, keepdim=True)
            var = (y - mu).pow(2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
            y = (y - mu) / torch.sqrt(var + eps) * weight.double() + bias.double()
        diff = x[i].cpu() - y.cpu()
        row_sq[i] = diff.pow(2).sum()
        grad[i] = grad_scale * diff
    return row_sq, grad


def _make_case(n, t, d, which, layout, latent_dtype, table_dtype, norm, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, t, d, generator=g).to(latent_dtype)
    full_retain = (torch.randn(n, t, d, generator=g) * 1.5 + 0.25).to(table_dtype)
    full_forget = (torch.randn(n, t, d, generator=g) * 0.5 - 0.5).to(table_dtype)
    is_forget = forget_pattern(n, which)
    if layout == "full":
        retain, forget, idx = full_retain, full_forget, torch.arange(n)
    else:  # compact: only the rows of each class, in batch order; index = rank within the class
        retain, forget = full_retain[~is_forget], full_forget[is_forget]
        f = is_forget.long()
        idx = torch.where(is_forget, f.cumsum(0) - 1, (1 - f).cumsum(0) - 1)
        retain = None if retain.shape[0] == 0 else retain
        forget = None if forget.shape[0] == 0 else forget
    w = b = None
    if norm:
        w = torch.randn(d, generator=g) * 0.2 + 1.0
        b = torch.randn(d, generator=g) * 0.1
    to = lambda v: None if v is None else v.to(device)  # noqa: E731
    return to(latent), to(retain), to(forget), to(is_forget), to(idx), to(w), to(b)


def _check(latent, retain, forget, is_forget, idx, w, b, row_sq, grad):
    norm = w is not None
    ref_sq, ref_grad = reference_row_sq_and_grad(latent.cpu(), None if retain is None else retain.cpu(),
                                                 None if forget is None else forget.cpu(), is_forget.cpu(),
                                                 idx.cpu(), None if w is None else w.cpu(),
                                                 None if b is None else b.cpu())
    assert row_sq.dtype == torch.float32 and row_sq.shape == (latent.shape[0],)
    assert grad.dtype == latent.dtype and grad.shape == latent.shape
    assert_close_report(row_sq, ref_sq, rtol=ROW_SQ_RTOL[norm], atol=ATOL_ROW_SQ, name="row_sq")
    rtol = (GRAD_RTOL_NORM if norm else GRAD_RTOL)[latent.dtype]
    assert_close_report(grad, ref_grad, rtol=rtol, atol=ATOL_GRAD, name="grad")


SHAPES = [(1, 1, 5), (1, 5, 37), (4, 3, 129), (6, 7, 37), (5, 1, 64)]


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("layout", ["full", "compact"])
@pytest.mark.parametrize("which", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_restatement_fp32(device, shape, which, layout, norm):
    case = _make_case(*shape, which, layout, torch.float32, torch.float32, norm, device)
    row_sq, grad = retain_forget_l2_forward(*case[:5], norm_weight=case[5], norm_bias=case[6], eps=EPS,
                                            grad_scale=GRAD_SCALE)
    _check(*case, row_sq, grad)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("latent_dtype,table_dtype", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                                      (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.float32, torch.bfloat16)],
                         ids=["f16-f16", "f16-f32", "f32-f16", "bf16-bf16", "bf16-f32", "f32-bf16"])
def test_matches_fp64_restatement_low_precision(device, latent_dtype, table_dtype, norm):
    # bf16 runs under triton 3.8's interpreter (its fp32 -> bf16 store truncates: covered by the bf16 rtol)
    case = _make_case(5, 3, 37, "mixed", "compact", latent_dtype, table_dtype, norm, device, seed=1)
    row_sq, grad = retain_forget_l2_forward(*case[:5], norm_weight=case[5], norm_bias=case[6], eps=EPS,
                                            grad_scale=GRAD_SCALE)
    _check(*case, row_sq, grad)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_large_d_and_multi_chunk_rows(device, norm):
    # plain: a 2*2500-element row spans two 4096-element programs; norm: D=1500 pads to BLOCK_D=2048 (one token
    # per program, T=3 programs per row)
    t, d = (2, 2500) if not norm else (3, 1500)
    case = _make_case(3, t, d, "mixed", "full", torch.float32, torch.float32, norm, device, seed=2)
    row_sq, grad = retain_forget_l2_forward(*case[:5], norm_weight=case[5], norm_bias=case[6], eps=EPS,
                                            grad_scale=GRAD_SCALE)
    _check(*case, row_sq, grad)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_every_output_element_is_written(device, norm, monkeypatch):
    """Every buffer the launcher allocates (grad and the per-program partials) starts as NaN."""
    case = _make_case(4, 5, 37, "mixed", "full", torch.float16, torch.float32, norm, device, seed=3)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    row_sq, grad = retain_forget_l2_forward(*case[:5], norm_weight=case[5], norm_bias=case[6], eps=EPS,
                                            grad_scale=GRAD_SCALE)
    monkeypatch.undo()
    assert not torch.isnan(row_sq).any() and not torch.isnan(grad).any()
    _check(*case, row_sq, grad)


def test_compute_grad_false_and_determinism(device):
    case = _make_case(6, 7, 37, "mixed", "compact", torch.float32, torch.float32, True, device, seed=4)
    kw = dict(norm_weight=case[5], norm_bias=case[6], eps=EPS, grad_scale=GRAD_SCALE)
    row_sq, grad = retain_forget_l2_forward(*case[:5], **kw)
    row_sq_again, grad_again = retain_forget_l2_forward(*case[:5], **kw)
    row_sq_only, none = retain_forget_l2_forward(*case[:5], compute_grad=False, **kw)
    assert none is None
    assert torch.equal(row_sq, row_sq_again) and torch.equal(grad, grad_again)  # bitwise, run to run
    assert torch.equal(row_sq, row_sq_only)


def test_grad_scale_zero_gives_zero_grad(device):
    case = _make_case(2, 3, 5, "mixed", "full", torch.float32, torch.float32, False, device)
    _, grad = retain_forget_l2_forward(*case[:5], grad_scale=0.0)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_row_of_an_absent_table_has_target_zero(device, norm):
    """A forget row with no forget table (or an index past the end) never reads out of bounds: as the op's
    PyTorch twin, its target is 0 before the norm (so ``bias`` after it) and indices are clamped."""
    n, t, d = 3, 2, 9
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(n, t, d, generator=g).to(device)
    retain = torch.randn(2, t, d, generator=g).to(device)
    is_forget = torch.tensor([False, True, False], device=device)
    idx = torch.tensor([0, 0, 7], device=device)  # row 2 points past the 2-row table -> clamped to row 1
    w = torch.randn(d, generator=g).to(device) if norm else None
    b = torch.randn(d, generator=g).to(device) if norm else None
    row_sq, grad = retain_forget_l2_forward(latent, retain, None, is_forget, idx, w, b, grad_scale=GRAD_SCALE)
    _check(latent, retain, None, is_forget, torch.tensor([0, 0, 1]), w, b, row_sq, grad)
    empty = retain[:0]
    row_sq_e, _ = retain_forget_l2_forward(latent, retain, empty, is_forget, idx, w, b, grad_scale=GRAD_SCALE)
    assert torch.equal(row_sq_e, row_sq)


def test_accepts_uint8_and_int_flags_and_int32_index(device):
    case = _make_case(5, 3, 37, "mixed", "full", torch.float32, torch.float32, False, device)
    latent, retain, forget, is_forget, idx = case[:5]
    ref_sq, ref_grad = retain_forget_l2_forward(latent, retain, forget, is_forget, idx, grad_scale=GRAD_SCALE)
    for flags in (is_forget.to(torch.uint8), is_forget.to(torch.int64)):
        row_sq, grad = retain_forget_l2_forward(latent, retain, forget, flags, idx.to(torch.int32),
                                                grad_scale=GRAD_SCALE)
        assert torch.equal(row_sq, ref_sq) and torch.equal(grad, ref_grad)


def test_rejects_bad_input(device):
    x = torch.randn(3, 2, 5, device=device)
    tab = torch.randn(3, 2, 5, device=device)
    isf = torch.zeros(3, dtype=torch.bool, device=device)
    idx = torch.arange(3, device=device)
    w = torch.ones(5, device=device)
    cases = [
        (dict(latent=x[0]), "latent must be a tensor \\[N, T, D\\]"),
        (dict(latent=x.transpose(1, 2).contiguous().transpose(1, 2)), "latent must be contiguous"),
        (dict(latent=x.double()), "latent must be fp32, fp16 or bf16"),
        (dict(retain_table=tab[:, :, :4]), "retain_table must have shape"),
        (dict(forget_table=tab.to("meta")), "forget_table is on meta"),
        (dict(forget_table=tab.half()), "must share a dtype"),
        (dict(row_is_forget=isf[:2]), "row_is_forget must be a tensor \\[N\\]"),
        (dict(row_is_forget=isf.float()), "row_is_forget must be a bool or integer tensor"),
        (dict(row_index=idx.float()), "row_index must be an integer tensor"),
        (dict(row_index=isf), "row_index must be an integer tensor, got torch.bool"),
        (dict(norm_weight=w), "norm_weight and norm_bias must be given together"),
        (dict(norm_weight=w[:4], norm_bias=w[:4]), "norm_weight must be a tensor \\[5\\]"),
        (dict(eps=-1.0), "eps must be >= 0"),
    ]
    base = dict(latent=x, retain_table=tab, forget_table=tab, row_is_forget=isf, row_index=idx)
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            retain_forget_l2_forward(**{**base, **override})
    d = MAX_NORM_D + 1
    wide = torch.zeros(1, 1, d, device=device)
    with pytest.raises(ValueError, match=f"D <= {MAX_NORM_D}"):
        retain_forget_l2_forward(wide, wide, None, isf[:1], idx[:1], torch.ones(d, device=device),
                                 torch.zeros(d, device=device))


def test_empty_batch(device):
    x = torch.empty(0, 3, 5, device=device)
    row_sq, grad = retain_forget_l2_forward(x, None, None, torch.zeros(0, dtype=torch.bool, device=device),
                                            torch.zeros(0, dtype=torch.long, device=device))
    assert row_sq.shape == (0,) and grad.shape == (0, 3, 5)
