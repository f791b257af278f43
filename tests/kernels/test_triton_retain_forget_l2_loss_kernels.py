"""The loss launches of unlearn_fast/kernels/retain_forget_l2.py: finalize (row_sq and the two losses), backward,
rank_within_class, and the op ``retain_forget_l2_loss*`` on the Triton backend against its PyTorch twin.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one.

Tolerances:
- row_sq and the losses vs a float64 restatement: fp32 accumulation -> rtol 2e-5 (1e-4 with the fused
  LayerNorm), atol 1e-6 (as tests/kernels/test_triton_retain_forget_l2.py).
- backward vs ``((grad.float() * g) * loss_scale).to(dtype)`` in torch: the same fp32 operations in the same
  order, so bit for bit in fp32 and fp16 (one round-to-nearest store); bf16 within one bf16 ulp (triton 3.8's
  interpreter truncates fp32 -> bf16, compiled kernels round to nearest).
- rank_within_class: exact (integers).
- the op vs its twin: as tests/ops/test_retain_forget_l2_loss.py (losses rtol 1e-5; gradients fp32 1e-5,
  fp16 2e-3, bf16 1.6e-2 relative: the fused path rounds ``2(x - y)`` to the latent's dtype before scaling).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report, forget_pattern

pytest.importorskip("triton")
from unlearn_fast.kernels import (rank_within_class, retain_forget_l2_backward,  # noqa: E402
                                  retain_forget_l2_forward, retain_forget_l2_loss_forward)
from unlearn_fast.kernels.retain_forget_l2 import _launch_finalize  # noqa: E402

ROW_SQ_RTOL = {False: 2e-5, True: 1e-4}  # keyed by "norm fused"
ATOL = 1e-6
EPS = 1e-6
OP_LOSS_TOL = dict(rtol=1e-5, atol=1e-7)
OP_GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-8), torch.float16: dict(rtol=2e-3, atol=1e-7),
               torch.bfloat16: dict(rtol=1.6e-2, atol=1e-7)}


def _rank(is_forget: torch.Tensor) -> torch.Tensor:
    f = is_forget.long()
    return torch.where(is_forget, f.cumsum(0) - 1, (1 - f).cumsum(0) - 1)


def _case(n, t, d, which, layout, dtype, norm, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, t, d, generator=g).to(dtype)
    full_retain = torch.randn(n, t, d, generator=g) * 1.5 + 0.25
    full_forget = torch.randn(n, t, d, generator=g) * 0.5 - 0.5
    is_forget = forget_pattern(n, which)
    if layout == "full":
        retain, forget, idx = full_retain, full_forget, None
    else:
        retain, forget, idx = full_retain[~is_forget], full_forget[is_forget], _rank(is_forget)
        retain = None if retain.shape[0] == 0 else retain
        forget = None if forget.shape[0] == 0 else forget
    w = (torch.randn(d, generator=g) * 0.2 + 1.0) if norm else None
    b = (torch.randn(d, generator=g) * 0.1) if norm else None
    to = lambda v: None if v is None else v.to(device)  # noqa: E731
    return to(latent), to(retain), to(forget), to(is_forget), to(idx), to(w), to(b)


def _row_sq_fp64(latent, retain, forget, is_forget, idx, w, b):
    n, t, d = latent.shape
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        table = forget if bool(is_forget[i]) else retain
        j = i if idx is None else int(idx[i])
        y = torch.zeros(t, d, dtype=torch.float64) if table is None else table[j].double().cpu()
        if w is not None:
            mu = y.mean(-1, keepdim=True)
            y = (y - mu) / torch.sqrt((y - mu).pow(2).mean(-1, keepdim=True) + EPS)
            y = y * w.double().cpu() + b.double().cpu()
        out[i] = (latent[i].double().cpu() - y).pow(2).sum()
    return out


# ---- forward: main kernel + finalize ----------------------------------------------------------------------

@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("layout", ["full", "compact"])
@pytest.mark.parametrize("which", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("shape", [(1, 1, 5), (1, 5, 37), (4, 3, 129), (7, 3, 37), (3, 2, 2500)],
                         ids=lambda s: "x".join(map(str, s)))
def test_losses_match_fp64_restatement(device, shape, which, layout, norm):
    case = _case(*shape, which, layout, torch.float32, norm, device)
    latent, retain, forget, is_forget, idx, w, b = case
    scale = 2.0 / latent.numel()
    row_sq, r, f, grad = retain_forget_l2_loss_forward(latent, retain, forget, is_forget, idx, w, b, EPS,
                                                       grad_scale=2.0, loss_scale=scale)
    ref = _row_sq_fp64(*case)
    forget_rows = is_forget.cpu()
    assert r.shape == f.shape == () and r.dtype == f.dtype == row_sq.dtype == torch.float32
    assert_close_report(row_sq, ref, rtol=ROW_SQ_RTOL[norm], atol=ATOL, name="row_sq")
    assert_close_report(r, scale * ref[~forget_rows].sum(), rtol=ROW_SQ_RTOL[norm], atol=ATOL, name="retain")
    assert_close_report(f, scale * ref[forget_rows].sum(), rtol=ROW_SQ_RTOL[norm], atol=ATOL, name="forget")
    if which == "all_forget":
        assert r.item() == 0.0
    if which == "all_retain":
        assert f.item() == 0.0
    # the row_sq-only entry point is the same two launches
    row_sq2, grad2 = retain_forget_l2_forward(latent, retain, forget, is_forget, idx, w, b, EPS, grad_scale=2.0)
    assert torch.equal(row_sq, row_sq2) and torch.equal(grad, grad2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_losses_low_precision_latent(device, dtype):
    case = _case(6, 5, 33, "mixed", "compact", dtype, False, device, seed=1)
    latent, retain, forget, is_forget, idx, w, b = case
    _, r, f, _ = retain_forget_l2_loss_forward(latent, retain, forget, is_forget, idx, loss_scale=0.25)
    ref = _row_sq_fp64(*case)
    assert_close_report(r, 0.25 * ref[~is_forget.cpu()].sum(), rtol=2e-5, atol=ATOL, name="retain")
    assert_close_report(f, 0.25 * ref[is_forget.cpu()].sum(), rtol=2e-5, atol=ATOL, name="forget")


def test_identity_rows_equal_an_explicit_arange_and_flag_dtypes(device):
    latent, retain, forget, is_forget, _, _, _ = _case(5, 3, 37, "mixed", "full", torch.float32, False, device)
    ref = retain_forget_l2_loss_forward(latent, retain, forget, is_forget, None, loss_scale=0.5)
    for idx_dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        for flags in (is_forget, is_forget.to(torch.uint8), is_forget.to(torch.int32), is_forget.to(torch.int64)):
            got = retain_forget_l2_loss_forward(latent, retain, forget, flags,
                                                torch.arange(5, device=device, dtype=idx_dtype), loss_scale=0.5)
            for a, e in zip(got, ref):
                assert torch.equal(a, e), (idx_dtype, flags.dtype)


def test_losses_are_deterministic_and_without_grad(device):
    case = _case(7, 3, 37, "mixed", "compact", torch.float32, True, device, seed=2)
    a = retain_forget_l2_loss_forward(*case[:5], case[5], case[6], loss_scale=0.1)
    b = retain_forget_l2_loss_forward(*case[:5], case[5], case[6], loss_scale=0.1)
    c = retain_forget_l2_loss_forward(*case[:5], case[5], case[6], loss_scale=0.1, compute_grad=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # bitwise, run to run
    assert c[3] is None and all(torch.equal(x, y) for x, y in zip(a[:3], c[:3]))


@pytest.mark.parametrize("n,n_chunks,block_n,block_c", [(11, 5, 4, 2), (1, 1, 1, 1), (3, 7, 4, 8), (9, 2, 16, 2)])
def test_finalize_loops_over_rows_and_chunks(device, n, n_chunks, block_n, block_c):
    # small blocks force several row blocks and chunk blocks, with ragged ends
    g = torch.Generator().manual_seed(n)
    partial = torch.rand(n, n_chunks, generator=g).to(device)
    for flags in (torch.rand(n, generator=g) < 0.5, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)):
        flags = flags.to(device)
        row_sq = torch.full((n,), float("nan"), device=device)
        r, f = torch.full((), float("nan"), device=device), torch.full((), float("nan"), device=device)
        _launch_finalize(partial, flags.view(torch.uint8), row_sq, r, f, 0.75, block_n=block_n, block_c=block_c)
        ref = partial.double().sum(1).cpu()
        assert_close_report(row_sq, ref, rtol=1e-6, atol=0.0, name="row_sq")
        assert_close_report(r, 0.75 * ref[~flags.cpu()].sum(), rtol=1e-6, atol=0.0, name="retain")
        assert_close_report(f, 0.75 * ref[flags.cpu()].sum(), rtol=1e-6, atol=0.0, name="forget")


# ---- backward -------------------------------------------------------------------------------------------

def _store_as(v: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """fp32 -> dtype as a kernel store does it (triton 3.8's interpreter truncates to bf16)."""
    if dtype == torch.bfloat16 and device == "cpu":
        return (v.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    return v.to(dtype)


@pytest.mark.parametrize("upstream", ["both", "retain_only", "forget_only", "none"])
@pytest.mark.parametrize("which", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 5), (7, 3, 37), (3, 2, 2500)], ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_torch_formula(device, shape, dtype, which, upstream):
    g = torch.Generator().manual_seed(3)
    stored = (torch.randn(shape, generator=g) * 2).to(device, dtype)  # the forward's 2·(x - y)
    is_forget = forget_pattern(shape[0], which).to(device)
    g_r = torch.tensor(0.3, device=device) if upstream in ("both", "retain_only") else None
    g_f = torch.tensor(-1.7, device=device) if upstream in ("both", "forget_only") else None
    scale = 2.0 / stored.numel()
    out = retain_forget_l2_backward(stored, is_forget, g_r, g_f, scale)
    zero = torch.zeros((), device=device)
    weight = torch.where(is_forget, g_f if g_f is not None else zero, g_r if g_r is not None else zero)  # [N]
    expected = _store_as((stored.float() * weight.view(-1, 1, 1)) * scale, dtype, device)
    assert out.dtype == dtype and out.shape == stored.shape
    if dtype == torch.bfloat16 and device == "cuda":
        assert_close_report(out, expected, rtol=8e-3, atol=0.0, name="grad")  # RN vs torch's RN: at most 1 ulp apart
    else:
        assert torch.equal(out, expected)
    if upstream == "none":
        assert not out.any()


def test_backward_keeps_fp16_subnormal_gradients(device):
    # a tiny loss scale lands the gradient in fp16's subnormal range; computing in fp32 and rounding once keeps it
    stored = torch.tensor([[[0.1, -0.5, 0.75, 1.0, 2.0]]], dtype=torch.float16, device=device)
    g_r = torch.tensor(0.9, device=device)
    out = retain_forget_l2_backward(stored, torch.tensor([False], device=device), g_r, None, 1e-6)
    exact = stored.double().cpu() * 0.9 * 1e-6  # 9e-8 .. 1.8e-6: below fp16's smallest normal (6.1e-5)
    assert (out.double().cpu() - exact).abs().max().item() <= 2.0 ** -25  # half a subnormal ulp
    assert (out != 0).all()


def test_backward_rejects_bad_input(device):
    stored = torch.randn(2, 3, 4, device=device)
    flags = torch.tensor([True, False], device=device)
    with pytest.raises(ValueError, match="grad_retain must be None or a 1-element float tensor"):
        retain_forget_l2_backward(stored, flags, torch.ones(2, device=device), None, 1.0)
    with pytest.raises(ValueError, match="grad_forget is on meta"):
        retain_forget_l2_backward(stored, flags, None, torch.ones((), device="meta"), 1.0)
    with pytest.raises(ValueError, match="row_is_forget must be a tensor \\[N\\]"):
        retain_forget_l2_backward(stored, flags[:1], None, None, 1.0)
    with pytest.raises(ValueError, match="latent must be a tensor \\[N, T, D\\]"):
        retain_forget_l2_backward(stored[0], flags, None, None, 1.0)


# ---- rank_within_class -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,block", [(1, None), (2, None), (37, None), (37, 8), (1500, None), (9, 4)])
def test_rank_within_class_matches_cumsum(device, n, block):
    g = torch.Generator().manual_seed(n)
    for flags in (torch.rand(n, generator=g) < 0.4, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)):
        expected = _rank(flags)
        for as_dtype in (torch.bool, torch.uint8, torch.int64):
            got = rank_within_class(flags.to(device, as_dtype), _block=block)
            assert got.dtype == torch.int32 and torch.equal(got.cpu().long(), expected), (n, block, as_dtype)


def test_rank_within_class_rejects_bad_input(device):
    with pytest.raises(ValueError, match="row_is_forget must be a tensor \\[N\\]"):
        rank_within_class(torch.zeros(2, 2, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="bool or integer"):
        rank_within_class(torch.zeros(3, device=device))
    assert rank_within_class(torch.zeros(0, dtype=torch.bool, device=device)).shape == (0,)


# ---- the op on the Triton backend ----------------------------------------------------------------------

def _op_loss_and_grad(fn, latent, *args, use=(0.3, 0.7)):
    x = latent.detach().clone().requires_grad_(True)
    r, f = fn(x, *args)
    total = (use[0] * r if use[0] else 0.0) + (use[1] * f if use[1] else 0.0)
    total.backward()
    return r.detach(), f.detach(), x.grad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (3, 5, 9), (4, 3, 7, 5), (9, 129, 24)],
                         ids=lambda s: "x".join(map(str, s)))
def test_op_on_triton_matches_twin(device, monkeypatch, shape, which, dtype):
    from unlearn_fast.ops import retain_forget_l2_loss, retain_forget_l2_loss_compact, retain_forget_l2_loss_reference
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(shape, generator=g).to(device, dtype)
    guide = torch.randn(shape, generator=g).to(device, dtype)
    noise_guide = torch.rand(shape, generator=g).to(device, dtype)
    is_forget = forget_pattern(shape[0], which).to(device)
    ref = _op_loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide, is_forget)
    got = _op_loss_and_grad(retain_forget_l2_loss, latent, guide, noise_guide, is_forget)
    guide_rows = guide[~is_forget] if (~is_forget).any() else None
    noise_rows = noise_guide[is_forget] if is_forget.any() else None
    compact = _op_loss_and_grad(retain_forget_l2_loss_compact, latent, guide_rows, noise_rows, is_forget)
    for name, (r, f, gx) in (("full", got), ("compact", compact)):
        assert r.dtype == f.dtype == torch.float32 and r.shape == f.shape == () and gx.dtype == dtype
        assert_close_report(r, ref[0], **OP_LOSS_TOL, name=f"{name} retain")
        assert_close_report(f, ref[1], **OP_LOSS_TOL, name=f"{name} forget")
        assert_close_report(gx, ref[2], **OP_GRAD_TOL[dtype], name=f"{name} grad")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("use", [(1.0, 0.0), (0.0, 1.0)], ids=["retain_only", "forget_only"])
def test_op_on_triton_with_one_loss_used(device, monkeypatch, use):
    from unlearn_fast.ops import retain_forget_l2_loss, retain_forget_l2_loss_reference
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(5)
    latent, guide, noise_guide = (torch.randn(6, 4, 11, generator=g).to(device) for _ in range(3))
    is_forget = forget_pattern(6, "mixed").to(device)
    r, f, gx = _op_loss_and_grad(retain_forget_l2_loss, latent, guide, noise_guide, is_forget, use=use)
    rr, ff, gr = _op_loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide, is_forget, use=use)
    assert_close_report(gx, gr, **OP_GRAD_TOL[torch.float32], name="grad")
    unused_rows = ~is_forget if use[1] else is_forget
    assert not gx[unused_rows].any()  # rows of the unused loss get exactly zero


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["mixed", "all_forget", "all_retain"])
def test_prenorm_op_on_triton_matches_twin(device, monkeypatch, dtype, which):
    from unlearn_fast.ops import retain_forget_l2_loss_prenorm, retain_forget_l2_loss_reference
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    n, t, d = 5, 7, 12
    g = torch.Generator().manual_seed(6)
    latent = torch.randn(n, t, d, generator=g).to(device, dtype)
    hidden = (torch.randn(n, t, d, generator=g) * 3 + 1).to(device, dtype)
    noise_hidden = torch.rand(n, t, d, generator=g).to(device, dtype)
    w, b = (torch.rand(d, generator=g) + 0.5).to(device), (torch.randn(d, generator=g) * 0.1).to(device)
    is_forget = forget_pattern(n, which).to(device)
    rows = hidden[~is_forget] if (~is_forget).any() else None
    noise_rows = noise_hidden[is_forget] if is_forget.any() else None
    r, f, gx = _op_loss_and_grad(retain_forget_l2_loss_prenorm, latent, rows, noise_rows, is_forget, w, b, EPS)
    guide = F.layer_norm(hidden.float(), (d,), w, b, EPS)
    noise_guide = F.layer_norm(noise_hidden.float(), (d,), w, b, EPS)
    rr, ff, gr = _op_loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide, is_forget)
    assert_close_report(r, rr, rtol=1e-4, atol=1e-7, name="retain")  # the fused norm adds a few ulps
    assert_close_report(f, ff, rtol=1e-4, atol=1e-7, name="forget")
    grad_tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else OP_GRAD_TOL[dtype]
    assert_close_report(gx, gr, **grad_tol, name="grad")
