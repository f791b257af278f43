"""The four baselines (REFERENCE.md §2, §11) against plain restatements of engine_baseline's formulas.

Tolerance: fp32, 1e-5 relative (reduction order only).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_report
from unlearn_fast.objective import (LOSS_TYPES, TRAINS_ENCODER_ONLY, WEIGHTINGS, check_loss_type, check_weighting,
                                    max_loss, noisy_label_loss, random_encoder_loss, random_encoder_target,
                                    retain_label_loss, split_token_loss, tile_retain_rows)

TOL = dict(rtol=1e-5, atol=1e-7)


def _per_sample_mse(a, b):
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)


# ---- MAX LOSS / NOISY LABEL: token losses, whole-batch masked-count denominators --------------------------

def test_split_token_loss_hand_computed():
    loss_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # 4 masked tokens in the whole batch
    r, f = split_token_loss(loss_tok, weight, torch.tensor([False, True]))
    assert r.item() == pytest.approx((1 + 3) / 4)   # not / 2 (the retain row's own count)
    assert f.item() == pytest.approx((5 + 6) / 4)


def _restated_split(loss_tok, weight, is_forget):
    keep_r = (~is_forget).float().view(-1, 1)
    keep_f = is_forget.float().view(-1, 1)
    return (loss_tok * weight * keep_r).sum() / weight.sum(), (loss_tok * weight * keep_f).sum() / weight.sum()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_max_loss_is_retain_minus_alpha_forget(alpha, gen):
    loss_tok = torch.rand(5, 13, generator=gen).requires_grad_(True)
    weight = (torch.rand(5, 13, generator=gen) < 0.7).float()
    is_forget = torch.tensor([True, False, True, False, False])
    out = max_loss(loss_tok, weight, is_forget, alpha)
    r, f = _restated_split(loss_tok.detach(), weight, is_forget)
    assert_close_report(out.retain, r, **TOL)
    assert_close_report(out.forget, f, **TOL)
    assert_close_report(out.loss, r - alpha * f, **TOL)
    out.loss.backward()
    # gradient ascent on forget tokens: d loss / d loss_tok = -alpha * w / W there, +w / W on retain rows
    expected = weight / weight.sum() * torch.where(is_forget, -alpha, 1.0).view(-1, 1)
    assert_close_report(loss_tok.grad, expected, **TOL)


def test_noisy_label_uses_clean_retain_and_noisy_forget(gen):
    clean = torch.rand(4, 6, generator=gen)
    noisy = torch.rand(4, 6, generator=gen) + 1
    weight = (torch.rand(4, 6, generator=gen) < 0.5).float()
    weight[0, 0] = 1.0
    is_forget = torch.tensor([False, True, True, False])
    out = noisy_label_loss(clean, noisy, weight, is_forget, 0.4)
    r, _ = _restated_split(clean, weight, is_forget)
    _, f = _restated_split(noisy, weight, is_forget)
    assert_close_report(out.loss, r + 0.4 * f, **TOL)
    # the clean loss of forget rows and the noisy loss of retain rows do not enter
    clean2, noisy2 = clean.clone(), noisy.clone()
    clean2[is_forget] += 100
    noisy2[~is_forget] += 100
    out2 = noisy_label_loss(clean2, noisy2, weight, is_forget, 0.4)
    assert_close_report(out2.loss, out.loss, **TOL)


# ---- RANDOM ENCODER -----------------------------------------------------------------------------------------

def test_random_encoder_target_formula(gen):
    guide = torch.randn(3, 5, 8, generator=gen) * 2 + 1
    n = random_encoder_target(guide, torch.Generator().manual_seed(4))
    z = torch.randn(guide.shape, generator=torch.Generator().manual_seed(4))
    g = guide.double()
    expected = z.double() * g.std() + g.mean()  # scalar stats over the whole guide, unbiased std
    assert_close_report(n, expected, rtol=1e-5, atol=1e-6)


def _random_encoder_restated(latent, guide, n, is_forget, a_r, a_f, weighting):
    b = latent.shape[0]
    s = torch.where(is_forget, -1.0, 1.0)
    m = _per_sample_mse(latent, guide)
    q = _per_sample_mse(latent, n)
    l_r = ((1 + s) * m).sum() / b
    forget_w = (1 + s) if weighting == "reference" else (1 - s)  # the reference's bug: forget term on retain rows
    l_f = (forget_w * q).sum() / b
    return a_r * l_r + a_f * l_f, l_r, l_f


@pytest.mark.parametrize("weighting", ["reference", "corrected"])
@pytest.mark.parametrize("labels", [[True, False, False, True, True], [True, True], [False, False, False]])
def test_random_encoder_loss(op_backend, weighting, labels, gen):
    is_forget = torch.tensor(labels)
    shape = (is_forget.shape[0], 7, 12)
    latent = torch.randn(shape, generator=gen)
    guide = torch.randn(shape, generator=gen)
    n = random_encoder_target(guide, gen)
    x = latent.clone().requires_grad_(True)
    out = random_encoder_loss(x, guide, n, is_forget, 1.0, 0.7, weighting)
    out.loss.backward()
    x_ref = latent.clone().requires_grad_(True)
    loss_ref, r_ref, f_ref = _random_encoder_restated(x_ref, guide, n, is_forget, 1.0, 0.7, weighting)
    loss_ref.backward()
    assert_close_report(out.retain, r_ref, **TOL, name="retain")
    assert_close_report(out.forget, f_ref, **TOL, name="forget")
    assert_close_report(out.loss, loss_ref, **TOL, name="loss")
    assert_close_report(x.grad, x_ref.grad, **TOL, name="grad")
    if weighting == "reference" and is_forget.any():  # forget rows get no loss at all (§2 bug)
        assert x.grad[is_forget].abs().max().item() == 0.0


# ---- RETAIN LABEL -------------------------------------------------------------------------------------------

def test_tile_retain_rows_tiles_in_batch_order():
    t = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 2, 3)
    is_forget = torch.tensor([True, False, True, False, True])  # retain rows 1, 3
    out = tile_retain_rows(t, is_forget)
    assert out.shape == t.shape
    assert out[:, 0, 0].tolist() == [1.0, 3.0, 1.0, 3.0, 1.0]
    out = tile_retain_rows(t, torch.tensor([True, True, False, True, True]))  # one retain row, 2
    assert out[:, 0, 0].tolist() == [2.0] * 5
    out = tile_retain_rows(t, torch.zeros(5, dtype=torch.bool))  # all retain: identity
    assert torch.equal(out, t)


def test_tile_retain_rows_randn_when_no_retain_row():
    t = torch.ones(3, 4, 6)
    out = tile_retain_rows(t, torch.ones(3, dtype=torch.bool), torch.Generator().manual_seed(2))
    assert torch.equal(out, torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))


def _retain_label_restated(student, teacher, is_forget, a_r, a_f, weighting, updated):
    b = student.shape[0]
    s = torch.where(is_forget, -1.0, 1.0)
    l_r = ((1 + s) * _per_sample_mse(student, teacher)).sum() / b
    w = (1 + s) if weighting == "reference" else (1 - s)
    l_f = (w * _per_sample_mse(student, updated)).sum() / b
    return a_r * l_r + a_f * l_f, l_r, l_f


@pytest.mark.parametrize("weighting", ["reference", "corrected"])
@pytest.mark.parametrize("labels", [[False, True, True, False, True], [True, True, True], [False, False]])
def test_retain_label_loss(op_backend, weighting, labels, gen):
    is_forget = torch.tensor(labels)
    shape = (is_forget.shape[0], 5, 11)
    student = torch.randn(shape, generator=gen)
    teacher = torch.randn(shape, generator=gen)
    # the hand-tiled target: teacher rows of the retain rows, repeated to length B; randn if none
    retain_idx = [i for i, f in enumerate(labels) if not f]
    if retain_idx:
        updated = teacher[[retain_idx[i % len(retain_idx)] for i in range(len(labels))]]
    else:
        updated = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    x = student.clone().requires_grad_(True)
    out = retain_label_loss(x, teacher, is_forget, 1.0, 0.5, weighting, torch.Generator().manual_seed(8))
    out.loss.backward()
    x_ref = student.clone().requires_grad_(True)
    loss_ref, r_ref, f_ref = _retain_label_restated(x_ref, teacher, is_forget, 1.0, 0.5, weighting, updated)
    loss_ref.backward()
    assert_close_report(out.retain, r_ref, **TOL, name="retain")
    assert_close_report(out.forget, f_ref, **TOL, name="forget")
    assert_close_report(x.grad, x_ref.grad, **TOL, name="grad")
    if weighting == "reference" and is_forget.any():
        assert x.grad[is_forget].abs().max().item() == 0.0


# ---- names ---------------------------------------------------------------------------------------------------

def test_loss_type_and_weighting_names():
    assert LOSS_TYPES == ("max_full_model_loss", "full_model_noise", "encoder_noise", "learn_others")
    assert set(WEIGHTINGS) == {"reference", "corrected"}
    assert {k for k, v in TRAINS_ENCODER_ONLY.items() if v} == {"encoder_noise"}
    for t in LOSS_TYPES:
        check_loss_type(t)
    with pytest.raises(ValueError) as info:
        check_loss_type("max_loss")
    assert all(t in str(info.value) for t in LOSS_TYPES)
    with pytest.raises(ValueError, match="corrected"):
        check_weighting("fixed")
    with pytest.raises(ValueError, match="weighting"):
        random_encoder_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.tensor([True]),
                            1.0, 1.0, "fixed")
