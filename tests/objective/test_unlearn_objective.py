"""The paper's objective (REFERENCE.md §1.3) against a plain restatement of the reference's compute_loss.

Tolerance: fp32 throughout, 1e-5 relative (reduction order only).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report
from unlearn_fast.objective import UnlearnLoss, combine, unlearn_loss, unlearn_loss_pruned

TOL = dict(rtol=1e-5, atol=1e-7)


def reference_compute_loss(latent, guide, mis_guide, class_label, retain_alpha, forget_alpha):
    """§1.3 as written: s = +1 if label >= 100 else -1; means over tokens and channels; / B (whole batch)."""
    s = torch.where(class_label >= 100, 1.0, -1.0)
    m = ((latent - guide) ** 2).mean(dim=(1, 2))
    f = ((latent - mis_guide) ** 2).mean(dim=(1, 2))
    b = latent.shape[0]
    l_r = ((1 + s) * m).sum() / b
    l_f = ((1 - s) * f).sum() / b
    return retain_alpha * l_r + forget_alpha * l_f, l_r, l_f


@pytest.mark.parametrize("alphas", [(1.0, 0.0), (1.0, 0.2), (0.5, 1.5)])
@pytest.mark.parametrize("labels", [[100.0, -100.0, 100.0, -100.0, -100.0], [100.0], [-100.0, -100.0]])
def test_unlearn_loss_matches_reference_compute_loss(op_backend, alphas, labels, gen):
    class_label = torch.tensor(labels)
    n = class_label.shape[0]
    latent = torch.randn(n, 9, 16, generator=gen)
    guide, mis_guide = torch.randn(n, 9, 16, generator=gen), torch.rand(n, 9, 16, generator=gen)
    x = latent.clone().requires_grad_(True)
    out = unlearn_loss(x, guide, mis_guide, class_label < 100, *alphas)
    assert isinstance(out, UnlearnLoss)
    out.loss.backward()
    x_ref = latent.clone().requires_grad_(True)
    loss_ref, r_ref, f_ref = reference_compute_loss(x_ref, guide, mis_guide, class_label, *alphas)
    loss_ref.backward()
    assert_close_report(out.loss, loss_ref, **TOL, name="loss")
    assert_close_report(out.retain, r_ref, **TOL, name="retain")
    assert_close_report(out.forget, f_ref, **TOL, name="forget")
    assert_close_report(x.grad, x_ref.grad, **TOL, name="grad")


def test_default_alphas_are_the_reference_defaults(gen):
    # retain_alpha 1.0, forget_alpha 0.0 (§1.6): the default loss ignores the forget term
    latent, guide, mis = (torch.randn(4, 3, 8, generator=gen) for _ in range(3))
    out = unlearn_loss(latent, guide, mis, torch.tensor([True, False, True, False]))
    assert out.loss.item() == pytest.approx(out.retain.item(), rel=1e-7)
    assert out.forget.item() > 0


def test_combine():
    r, f = torch.tensor(2.0), torch.tensor(3.0)
    out = combine(r, f, 0.5, 0.25)
    assert out.loss.item() == pytest.approx(0.5 * 2 + 0.25 * 3)
    assert out.retain is r and out.forget is f


@pytest.mark.parametrize("labels", [[100, -100, -100, 100, 100], [-100, -100], [100, 100, 100]])
def test_pruned_loss_with_final_norm_equals_full_loss(op_backend, labels, gen):
    is_forget = torch.tensor(labels) < 100
    n, t, d = is_forget.shape[0], 6, 20
    norm = torch.nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.normal_(0, 0.1, generator=gen)
    latent = torch.randn(n, t, d, generator=gen)
    hidden = torch.randn(n, t, d, generator=gen) * 2 + 0.3
    noise_hidden = torch.randn(n, t, d, generator=gen) * 0.5 - 1
    hid_r = hidden[~is_forget] if (~is_forget).any() else None
    hid_f = noise_hidden[is_forget] if is_forget.any() else None

    x = latent.clone().requires_grad_(True)
    out = unlearn_loss_pruned(x, hid_r, hid_f, is_forget, 1.0, 0.3, final_norm=norm)
    out.loss.backward()
    with torch.no_grad():
        guide, mis = norm(hidden), norm(noise_hidden)
    x_ref = latent.clone().requires_grad_(True)
    loss_ref, r_ref, f_ref = reference_compute_loss(x_ref, guide, mis, torch.tensor(labels, dtype=torch.float32),
                                                    1.0, 0.3)
    loss_ref.backward()
    assert_close_report(out.retain, r_ref, **TOL, name="retain")
    assert_close_report(out.forget, f_ref, **TOL, name="forget")
    assert_close_report(x.grad, x_ref.grad, **TOL, name="grad")
    assert norm.weight.grad is None  # the teacher's norm is not trained through the loss

    # without a norm the rows are the guides themselves
    out2 = unlearn_loss_pruned(latent, hid_r, hid_f, is_forget, 1.0, 0.3)
    loss2, _, _ = reference_compute_loss(latent, hidden, noise_hidden, torch.tensor(labels, dtype=torch.float32),
                                         1.0, 0.3)
    assert_close_report(out2.loss, loss2, **TOL)


def test_pruned_loss_matches_layer_norm_functional(gen):
    # the norm is applied per token over the last dim (LayerNorm semantics), not over the whole row
    d = 8
    w, b = torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen)
    norm = torch.nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    hidden = torch.randn(1, 4, d, generator=gen) * torch.arange(1, 5).view(1, 4, 1)  # per-token scales
    latent = F.layer_norm(hidden, (d,), w, b, 1e-6)
    out = unlearn_loss_pruned(latent, hidden, None, torch.tensor([False]), final_norm=norm)
    assert out.retain.item() < 1e-10
