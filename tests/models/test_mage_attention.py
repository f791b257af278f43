"""MAGE attention: the official written-out form everywhere but inside ``sdpa_attention()`` on CUDA with
half-precision inputs. CPU: the context changes nothing (bit-identical). GPU (skipped without CUDA; run by
benchmarks/gpu_check.sh): scaled_dot_product_attention is no further from the fp32 official form than the
official form at the same half dtype, output and gradients."""
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_is_as_close_to_fp32_as_the_official_form_on_gpu(dtype):
    """Both half-precision forms round (the official one its scores and probabilities, the fused kernel less), so
    they are compared with the fp32 official form: the fused kernel's output and every gradient are no further
    from it than the official form at the same dtype (1.25x, plus 1e-3 relative for gradients that both get
    almost exactly). H100, run 3: a direct bf16-vs-bf16 bound of 4e-2 on the gradients failed."""
    torch.manual_seed(0)
    attn = MageAttention(768, 12).cuda()
    x = torch.randn(8, 257, 768, device="cuda")

    def run(fused: bool, half: bool):
        xi = x.clone().requires_grad_(True)
        with sdpa_attention(fused), torch.autocast("cuda", dtype=dtype, enabled=half):
            out = attn(xi)
        out.float().square().mean().backward()
        grads = [xi.grad] + [p.grad.clone() for p in attn.parameters()]
        attn.zero_grad(set_to_none=True)
        return [out.float()] + grads

    truth, official, fused = run(False, False), run(False, True), run(True, True)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    for i, (f, o, t) in enumerate(zip(fused, official, truth)):
        assert rel(f, t) <= 1.25 * rel(o, t) + 1e-3, (i, rel(f, t), rel(o, t))
