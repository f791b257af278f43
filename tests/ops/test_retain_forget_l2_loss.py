"""retain_forget_l2_loss (+ compact, prenorm) against hand-computed numbers and the plain-PyTorch twin.

Every test runs twice (fixture ``op_backend``): with UNLEARN_FAST_BACKEND=torch and with the machine's
default backend (the C++ extension on CPU if built, else the twin).

Tolerances: losses are accumulated in fp32 from the same inputs, so they match the twin to 1e-5
relative for every latent dtype. Gradients are stored in the latent's dtype; the fused op rounds
``diff * scale`` to that dtype and then multiplies by the (rounded) upstream weight, the twin rounds
once, so low-precision gradients may differ by ~2 ulp (fp16 2e-3, bf16 1.6e-2 relative).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report
from unlearn_fast.ops import (retain_forget_l2_loss, retain_forget_l2_loss_compact, retain_forget_l2_loss_prenorm,
                              retain_forget_l2_loss_reference)

LOSS_TOL = dict(rtol=1e-5, atol=1e-7)
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-8), torch.float16: dict(rtol=2e-3, atol=1e-7),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-7)}


def _forget_mask(n: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    if pattern == "all_forget":
        return torch.ones(n, dtype=torch.bool)
    if pattern == "all_retain":
        return torch.zeros(n, dtype=torch.bool)
    if pattern == "mixed":
        m = torch.rand(n, generator=gen) < 0.5
        if n >= 2:  # make sure both classes are present
            m[0], m[-1] = True, False
        return m
    raise ValueError(pattern)


def _inputs(shape, dtype, gen):
    latent = torch.randn(shape, generator=gen).to(dtype)
    guide = torch.randn(shape, generator=gen).to(dtype)
    noise_guide = torch.rand(shape, generator=gen).to(dtype)
    return latent, guide, noise_guide


def _loss_and_grad(fn, latent, *args):
    x = latent.detach().clone().requires_grad_(True)
    r, f = fn(x, *args)
    (0.3 * r + 0.7 * f).backward()
    return r.detach(), f.detach(), x.grad


# ---- hand-computed ----------------------------------------------------------------------------------------

def test_hand_computed_two_rows(op_backend):
    # N=2, D=2: row 0 retain, row 1 forget
    latent = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    guide = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    noise_guide = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    r, f = retain_forget_l2_loss(latent, guide, noise_guide, torch.tensor([False, True]))
    # retain = (2/N) * mean((1-0)^2, (2-0)^2) = 1 * 2.5 ; forget = (2/N) * mean(3^2, 4^2) = 12.5
    assert r.item() == pytest.approx(2.5, rel=1e-6)
    assert f.item() == pytest.approx(12.5, rel=1e-6)
    assert r.dtype == f.dtype == torch.float32 and r.dim() == f.dim() == 0
    (0.3 * r + 0.7 * f).backward()
    # d retain / d x_0 = (2/N) * 2 (x_0 - g_0) / D = x_0 - g_0 ; d forget / d x_1 = x_1 - n_1
    expected = torch.tensor([[0.3 * 1.0, 0.3 * 2.0], [0.7 * 3.0, 0.7 * 4.0]])
    assert_close_report(latent.grad, expected, rtol=1e-6, atol=1e-7, name="grad")

    # the other way round: row 0 forget, row 1 retain
    r, f = retain_forget_l2_loss(latent.detach(), guide, noise_guide, torch.tensor([True, False]))
    assert r.item() == pytest.approx((2 ** 2 + 3 ** 2) / 2, rel=1e-6)  # row 1 vs guide
    assert f.item() == pytest.approx((0 ** 2 + 1 ** 2) / 2, rel=1e-6)  # row 0 vs noise guide


def test_hand_computed_whole_batch_denominator(op_backend):
    # N=4, one retain row: the retain mean is divided by N=4 (times 2), not by the subset size 1
    latent = torch.zeros(4, 3)
    guide = torch.full((4, 3), 2.0)
    noise_guide = torch.full((4, 3), 1.0)
    is_forget = torch.tensor([True, False, True, True])
    r, f = retain_forget_l2_loss(latent, guide, noise_guide, is_forget)
    assert r.item() == pytest.approx(2 / 4 * 4.0, rel=1e-6)       # 1 retain row, m = 4
    assert f.item() == pytest.approx(2 / 4 * 3 * 1.0, rel=1e-6)   # 3 forget rows, f = 1 each


def test_hand_computed_all_forget_and_all_retain(op_backend):
    latent = torch.tensor([[1.0, -1.0, 3.0]], requires_grad=True)  # N=1
    guide = torch.zeros(1, 3)
    noise_guide = torch.ones(1, 3)
    r, f = retain_forget_l2_loss(latent, guide, noise_guide, torch.tensor([True]))
    assert r.item() == 0.0
    assert f.item() == pytest.approx(2 * (0 + 4 + 4) / 3, rel=1e-6)
    f.backward()
    assert_close_report(latent.grad, 2 * 2 * torch.tensor([[0.0, -2.0, 2.0]]) / 3, rtol=1e-6, atol=1e-7)

    r, f = retain_forget_l2_loss(latent.detach(), guide, noise_guide, torch.tensor([False]))
    assert f.item() == 0.0
    assert r.item() == pytest.approx(2 * (1 + 1 + 9) / 3, rel=1e-6)


# ---- against the twin -------------------------------------------------------------------------------------

SHAPES = [(2, 7), (5, 33), (3, 5, 9), (1, 13, 17), (6, 4, 5, 3), (4, 3, 7, 5), (9, 129, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_forward_and_grad(op_backend, shape, pattern, dtype, gen):
    latent, guide, noise_guide = _inputs(shape, dtype, gen)
    is_forget = _forget_mask(shape[0], pattern, gen)
    r, f, g = _loss_and_grad(retain_forget_l2_loss, latent, guide, noise_guide, is_forget)
    r_ref, f_ref, g_ref = _loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide, is_forget)
    assert r.dtype == f.dtype == torch.float32 and r.shape == f.shape == ()
    assert g.dtype == dtype and g.shape == latent.shape
    assert_close_report(r, r_ref, **LOSS_TOL, name="retain")
    assert_close_report(f, f_ref, **LOSS_TOL, name="forget")
    assert_close_report(g, g_ref, **GRAD_TOL[dtype], name="grad")
    if pattern == "all_forget":
        assert r.item() == 0.0
    if pattern == "all_retain":
        assert f.item() == 0.0


def test_noncontiguous_latent_and_int_labels(op_backend, gen):
    base = torch.randn(4, 9, 6, generator=gen)
    latent = base.transpose(1, 2)  # [4, 6, 9], not contiguous
    guide, noise_guide = torch.randn(4, 6, 9, generator=gen), torch.randn(4, 6, 9, generator=gen)
    is_forget_int = torch.tensor([1, 0, 0, 1])  # 0/1 labels are accepted as a mask
    r, f, g = _loss_and_grad(retain_forget_l2_loss, latent, guide, noise_guide, is_forget_int)
    r_ref, f_ref, g_ref = _loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide,
                                         is_forget_int.bool())
    assert_close_report(r, r_ref, **LOSS_TOL)
    assert_close_report(f, f_ref, **LOSS_TOL)
    assert_close_report(g, g_ref, **GRAD_TOL[torch.float32])


def test_latent_without_grad(op_backend, gen):
    latent, guide, noise_guide = _inputs((3, 4, 5), torch.float32, gen)
    r, f = retain_forget_l2_loss(latent, guide, noise_guide, torch.tensor([True, False, True]))
    assert not r.requires_grad and not f.requires_grad
    r_ref, f_ref = retain_forget_l2_loss_reference(latent, guide, noise_guide, torch.tensor([True, False, True]))
    assert_close_report(r, r_ref, **LOSS_TOL)
    assert_close_report(f, f_ref, **LOSS_TOL)


# ---- compact / prenorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("shape", [(5, 7, 12), (1, 3, 8), (8, 11)], ids=lambda s: "x".join(map(str, s)))
def test_compact_equals_full_with_gathered_guides(op_backend, shape, pattern, gen):
    latent, guide, noise_guide = _inputs(shape, torch.float32, gen)
    is_forget = _forget_mask(shape[0], pattern, gen)
    guide_rows = guide[~is_forget] if (~is_forget).any() else None
    noise_rows = noise_guide[is_forget] if is_forget.any() else None
    r, f, g = _loss_and_grad(retain_forget_l2_loss_compact, latent, guide_rows, noise_rows, is_forget)
    r_ref, f_ref, g_ref = _loss_and_grad(retain_forget_l2_loss, latent, guide, noise_guide, is_forget)
    assert_close_report(r, r_ref, **LOSS_TOL, name="retain")
    assert_close_report(f, f_ref, **LOSS_TOL, name="forget")
    assert_close_report(g, g_ref, **GRAD_TOL[torch.float32], name="grad")


def test_compact_explicit_row_index(op_backend, gen):
    # row_index maps each row to a table row of its class: here retain rows all read table row 0
    latent, guide, noise_guide = _inputs((4, 3, 5), torch.float32, gen)
    is_forget = torch.tensor([False, True, False, True])
    row_index = torch.tensor([0, 1, 0, 0])
    guide_table = guide[:1]                   # [1, 3, 5]
    noise_table = noise_guide[[3, 1]]         # rows: forget row 3 -> 0, forget row 1 -> 1
    r, f = retain_forget_l2_loss_compact(latent, guide_table, noise_table, is_forget, row_index=row_index)
    full_guide = guide[[0, 0, 0, 0]]
    full_noise = noise_guide[[0, 1, 0, 3]]
    r_ref, f_ref = retain_forget_l2_loss_reference(latent, full_guide, full_noise, is_forget)
    assert_close_report(r, r_ref, **LOSS_TOL)
    assert_close_report(f, f_ref, **LOSS_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("shape", [(5, 7, 12), (1, 3, 8), (6, 10)], ids=lambda s: "x".join(map(str, s)))
def test_prenorm_equals_full_with_normed_guides(op_backend, shape, pattern, dtype, gen):
    d = shape[-1]
    latent, hidden, noise_hidden = _inputs(shape, dtype, gen)
    hidden, noise_hidden = hidden * 3 + 1, noise_hidden * 2 - 0.5  # not already normalised
    weight = (torch.rand(d, generator=gen) + 0.5)
    bias = torch.randn(d, generator=gen) * 0.1
    eps = 1e-6
    is_forget = _forget_mask(shape[0], pattern, gen)
    hidden_rows = hidden[~is_forget] if (~is_forget).any() else None
    noise_rows = noise_hidden[is_forget] if is_forget.any() else None
    r, f, g = _loss_and_grad(retain_forget_l2_loss_prenorm, latent, hidden_rows, noise_rows, is_forget,
                             weight, bias, eps)
    guide = F.layer_norm(hidden.float(), (d,), weight, bias, eps)
    noise_guide = F.layer_norm(noise_hidden.float(), (d,), weight, bias, eps)
    r_ref, f_ref, g_ref = _loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide, is_forget)
    assert_close_report(r, r_ref, **LOSS_TOL, name="retain")
    assert_close_report(f, f_ref, **LOSS_TOL, name="forget")
    assert_close_report(g, g_ref, **GRAD_TOL[dtype], name="grad")


def test_prenorm_with_a_module_norm_does_not_track_its_params(op_backend, gen):
    norm = torch.nn.LayerNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    latent, hidden, noise_hidden = _inputs((3, 2, 6), torch.float32, gen)
    x = latent.clone().requires_grad_(True)
    r, f = retain_forget_l2_loss_prenorm(x, hidden[:2], noise_hidden[2:], torch.tensor([False, False, True]),
                                         norm.weight, norm.bias, norm.eps)
    (r + f).backward()
    assert x.grad is not None and norm.weight.grad is None  # the teacher's norm is a constant


@pytest.mark.parametrize("latent_dtype,guide_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                     (torch.float32, torch.bfloat16)], ids=str)
def test_mixed_latent_and_guide_dtypes(op_backend, latent_dtype, guide_dtype, gen):
    # precision "reference": low-precision student latent, fp32 teacher guides
    latent = torch.randn(5, 6, 10, generator=gen).to(latent_dtype)
    guide = torch.randn(5, 6, 10, generator=gen).to(guide_dtype)
    noise_guide = torch.randn(5, 6, 10, generator=gen).to(guide_dtype)
    is_forget = torch.tensor([True, False, False, True, False])
    r, f, g = _loss_and_grad(retain_forget_l2_loss, latent, guide, noise_guide, is_forget)
    r_ref, f_ref, g_ref = _loss_and_grad(retain_forget_l2_loss_reference, latent, guide, noise_guide, is_forget)
    assert g.dtype == latent_dtype
    assert_close_report(r, r_ref, **LOSS_TOL, name="retain")
    assert_close_report(f, f_ref, **LOSS_TOL, name="forget")
    assert_close_report(g, g_ref, **GRAD_TOL[latent_dtype], name="grad")


def test_compact_table_too_short_is_rejected(op_backend, gen):
    """BUG (reported): the compact/prenorm entry points do not check that a table has a row for every row
    of its class. The C++ extension raises ValueError ("row 1 (retain) has row_index 1, out of range for
    retain_table with 1 rows"); the PyTorch twin silently clamps row_index, so the loss uses another row's
    guide. Both backends must agree, and a wrong answer is worse than an error."""
    latent = torch.randn(4, 3, 5, generator=gen)
    is_forget = torch.tensor([False, False, False, True])  # 3 retain rows, 1 forget row
    with pytest.raises(ValueError, match="rows"):
        retain_forget_l2_loss_compact(latent, torch.randn(1, 3, 5, generator=gen), torch.randn(1, 3, 5), is_forget)


def test_compact_missing_table_for_present_rows_is_rejected(op_backend, gen):
    """BUG (reported): ``guide_rows=None`` (or a 0-row table) is documented as "None if there are none", but
    with retain rows present every backend silently compares them with zeros (the kernels' "absent table ->
    target 0" contract leaks through the op). The op should reject it (cheap where is_forget is on the host)."""
    latent = torch.randn(4, 3, 5, generator=gen)
    is_forget = torch.tensor([False, False, False, True])
    with pytest.raises(ValueError, match="rows"):
        retain_forget_l2_loss_compact(latent, None, torch.randn(1, 3, 5, generator=gen), is_forget)
    with pytest.raises(ValueError, match="rows"):  # an empty table is the same as None
        retain_forget_l2_loss_compact(latent, torch.randn(3, 3, 5, generator=gen), torch.randn(0, 3, 5), is_forget)


# ---- guides that require grad ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["guide", "noise_guide", "both"])
def test_guides_requiring_grad_receive_gradients(op_backend, which, gen):
    latent, guide, noise_guide = _inputs((4, 5, 6), torch.float32, gen)
    is_forget = torch.tensor([True, False, False, True])
    x = latent.clone().requires_grad_(True)
    gd = guide.clone().requires_grad_(which in ("guide", "both"))
    nd = noise_guide.clone().requires_grad_(which in ("noise_guide", "both"))
    r, f = retain_forget_l2_loss(x, gd, nd, is_forget)
    (0.3 * r + 0.7 * f).backward()

    x2 = latent.clone().requires_grad_(True)
    g2, n2 = guide.clone().requires_grad_(True), noise_guide.clone().requires_grad_(True)
    r2, f2 = retain_forget_l2_loss_reference(x2, g2, n2, is_forget)
    (0.3 * r2 + 0.7 * f2).backward()
    assert_close_report(x.grad, x2.grad, **GRAD_TOL[torch.float32], name="latent grad")
    if gd.requires_grad:
        assert_close_report(gd.grad, g2.grad, **GRAD_TOL[torch.float32], name="guide grad")
        assert gd.grad[is_forget].abs().max().item() == 0.0  # forget rows do not use the guide
        assert gd.grad[~is_forget].abs().max().item() > 0.0
    if nd.requires_grad:
        assert_close_report(nd.grad, n2.grad, **GRAD_TOL[torch.float32], name="noise guide grad")
        assert nd.grad[~is_forget].abs().max().item() == 0.0
        assert nd.grad[is_forget].abs().max().item() > 0.0


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_value_error(op_backend):
    x = torch.randn(3, 4)
    g = torch.randn(3, 4)
    m = torch.tensor([True, False, True])
    cases = [
        (lambda: retain_forget_l2_loss(torch.randn(3), torch.randn(3), torch.randn(3), m), "latent"),
        (lambda: retain_forget_l2_loss(x, g, g, torch.tensor([True, False])), "is_forget"),
        (lambda: retain_forget_l2_loss(x, g, g, m.view(3, 1)), "is_forget"),
        (lambda: retain_forget_l2_loss(x, g, g, [True, False, True]), "is_forget"),
        (lambda: retain_forget_l2_loss(x, torch.randn(3, 5), g, m), "guide"),
        (lambda: retain_forget_l2_loss(x, g, torch.randn(2, 4), m), "noise_guide"),
        (lambda: retain_forget_l2_loss(x, g, None, m), "noise_guide"),
        (lambda: retain_forget_l2_loss_compact(x, torch.randn(1, 5), torch.randn(2, 4), m), "guide_rows"),
        (lambda: retain_forget_l2_loss_compact(x, torch.randn(1, 4), torch.randn(2, 3), m), "noise_guide_rows"),
        (lambda: retain_forget_l2_loss_prenorm(x, torch.randn(1, 4), torch.randn(2, 4), m, torch.ones(5),
                                               torch.zeros(4), 1e-6), "norm"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError, match=word):
            fn()


def test_unknown_backend_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cuda_magic")
    with pytest.raises(ValueError, match="UNLEARN_FAST_BACKEND"):
        retain_forget_l2_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.tensor([True, False]))

