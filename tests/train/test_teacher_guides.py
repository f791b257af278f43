"""One teacher pass over the mixed batch (images on retain rows, noise on forget rows) equals the reference's
two full-batch passes row by row; the merged-guide loss equals the loss with full-size guides."""
from __future__ import annotations

import pytest
import torch

import unlearn_fast
from unlearn_fast.objective import unlearn_loss, unlearn_loss_merged_guide
from unlearn_fast.train.teacher_guides import teacher_hidden

pytestmark = pytest.mark.usefixtures("single_thread")

PATTERNS = {"mixed": [True, False, False, True, False], "all_forget": [True] * 3, "all_retain": [False] * 3,
            "one_row": [True]}


def _model(name):
    torch.manual_seed(0)
    return unlearn_fast.create_model(name).eval()


@pytest.mark.parametrize("name", ["mae_micro", "mage_micro"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("share", [False, True])
def test_one_pass_equals_two_full_passes(name, pattern, share):
    teacher = _model(name)
    is_forget = torch.tensor(PATTERNS[pattern])
    n = len(is_forget)
    g = torch.Generator().manual_seed(1)
    images, noise = torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, 3, 32, 32, generator=g)
    task = teacher.sample_task(images, torch.Generator().manual_seed(2))
    forget_rows = torch.nonzero(is_forget).flatten()
    with torch.no_grad():
        student_inputs = teacher.prepare_inputs(images)  # same precision here: sharing is exact
        got = teacher_hidden(teacher, images, noise, student_inputs, task, is_forget, forget_rows, share)
        on_images = teacher.forward_encoder_task(teacher.prepare_inputs(images), task, prenorm=True)
        on_noise = teacher.forward_encoder_task(teacher.prepare_inputs(noise), task, prenorm=True)
    expected = torch.where(is_forget.view(-1, 1, 1), on_noise, on_images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32, batch-size-dependent GEMM order only


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_merged_guide_loss_equals_full_guides(with_norm, pattern):
    is_forget = torch.tensor(PATTERNS[pattern])
    n, t, d = len(is_forget), 5, 12
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(n, t, d, generator=g, requires_grad=True)
    hidden = torch.randn(n, t, d, generator=g)
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    target = norm(hidden).detach() if with_norm else hidden
    ref = unlearn_loss(latent, target, target, is_forget, 1.0, 0.3)  # both guides full size, reference op
    (ref_grad,) = torch.autograd.grad(ref.loss, latent)
    got = unlearn_loss_merged_guide(latent, hidden, is_forget, 1.0, 0.3, final_norm=norm if with_norm else None)
    (got_grad,) = torch.autograd.grad(got.loss, latent)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-8)
