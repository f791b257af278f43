"""The fused ops inside a ``torch.compile``d function on a GPU (skipped without CUDA): a user who compiles a training
step that calls them must get the eager results (dynamo may break the graph around the Triton launches; it must
neither fail nor change the numbers). Tolerance: fp32, rtol 1e-6 (the same kernels run either way; only the
ops around them may be fused differently)."""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.ops import retain_forget_l2_loss, sample_batch_noise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _objective(latent, guide, noise_guide, is_forget):
    retain, forget = retain_forget_l2_loss(latent, guide, noise_guide, is_forget)
    return retain + 0.2 * forget


def test_compiled_loss_equals_eager_forward_and_gradient():
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    latent = torch.randn(6, 17, 96, device="cuda", generator=g)
    guide, noise_guide = torch.randn_like(latent), torch.randn_like(latent)
    is_forget = torch.tensor([True, False, False, True, False, True], device="cuda")
    results = []
    for fn in (_objective, torch.compile(_objective)):
        x = latent.clone().requires_grad_(True)
        loss = fn(x, guide, noise_guide, is_forget)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach(), grad))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-9)


def test_compiled_noise_equals_eager():
    torch._dynamo.reset()
    images = torch.rand(4, 3, 32, 32, device="cuda")

    def draw(x):  # the fused counter-based Philox draw of the fast step
        return sample_batch_noise(x, "normal", seed=7, step=3)
    eager = draw(images)
    compiled = torch.compile(draw)(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
