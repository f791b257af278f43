"""MAGE attention: the official written-out form everywhere but inside ``sdpa_attention()`` on CUDA with
half-precision inputs. CPU: the context changes nothing (bit-identical). GPU (skipped without CUDA; run by
benchmarks/gpu_check.sh): scaled_dot_product_attention agrees with the official form, output and
gradients, relative (whole tensor) 2e-2 bf16 / 3e-3 fp16: both round the probabilities to v's dtype, the
order of the fp32 sums differs."""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.models import mage_attention
from unlearn_fast.models.mage_attention import MageAttention, sdpa_attention


def test_cpu_output_is_bit_identical_inside_the_context(monkeypatch):
    calls = []
    monkeypatch.setattr(mage_attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1))
    torch.manual_seed(0)
    attn = MageAttention(32, 4)
    x = torch.randn(2, 7, 32)
    plain = attn(x)
    with sdpa_attention(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_ctx = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_bf16 = attn(x)
    assert calls == [] and torch.equal(fused_ctx, plain_bf16) and plain.dtype == torch.float32



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_sdpa_matches_the_official_form_on_gpu(dtype, tol):
    torch.manual_seed(0)
    attn = MageAttention(768, 12).cuda()
    x = torch.randn(8, 257, 768, device="cuda")

    def run(fused: bool):
        xi = x.clone().requires_grad_(True)
        with sdpa_attention(fused), torch.autocast("cuda", dtype=dtype):
            out = attn(xi)
        out.float().square().mean().backward()
        grads = [xi.grad] + [p.grad.clone() for p in attn.parameters()]
        attn.zero_grad(set_to_none=True)
        return out.float(), grads

    ref, ref_grads = run(False)
    got, got_grads = run(True)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(got, ref) <= tol
    assert all(rel(g, r) <= 2 * tol for g, r in zip(got_grads, ref_grads))
