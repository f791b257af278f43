"""The fused residual add + 2x2 average pool on a GPU (skipped without CUDA).

- At the VQGAN encoder's own pooled shapes, NCHW and channels_last, fp32 / fp16 / bf16: the same bits as torch's
  ``F.avg_pool2d(a + b, 2, 2)`` (the kernel rounds the sum to the dtype and adds each window's four values in
  fp32 in torch's order; the division by 4 is exact).
- The full-size VQGAN (random weights) under bf16 autocast, NCHW and channels_last, fused norms on: with the
  fused pools the encoder calls the op once per level change, and gives the code ids of torch's ops exactly
  and the same latent (cuDNN held to one deterministic algorithm per shape for both runs).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast.models.vqgan as vqgan_mod
from unlearn_fast.ops import add_avg_pool2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (N, C, H, W) entering each pool of the VQGAN encoder (batch 4), and two awkward ones
SHAPES = [(4, 128, 256, 256), (4, 128, 128, 128), (4, 256, 64, 64), (4, 256, 32, 32), (3, 130, 18, 202),
          (1, 1, 2, 2)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bits_equal_torch_add_then_pool(shape, dtype, channels_last):
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(2))
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    out = add_avg_pool2d(a, b)
    want = F.avg_pool2d(a + b, 2, 2)
    assert torch.equal(out, want)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and out.stride() == want.stride()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_vqgan_tokens_unchanged_by_the_fused_pools(monkeypatch, channels_last):
    torch.manual_seed(0)
    calls = []
    real = vqgan_mod.add_avg_pool2d
    monkeypatch.setattr(vqgan_mod, "add_avg_pool2d", lambda a, b: calls.append(a.shape) or real(a, b))
    vq = vqgan_mod.VQGAN().cuda().eval().requires_grad_(False)
    images = torch.rand(4, 3, 256, 256, device="cuda")

    def tokenize(fused: bool):
        # one conv algorithm per shape for both runs, so only the pools could make them differ
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True), torch.no_grad(), \
                vqgan_mod.fused_group_norms(), vqgan_mod.fused_residual_pools(fused), \
                vqgan_mod.channels_last_tokenizer(channels_last), torch.autocast("cuda", dtype=torch.bfloat16):
            x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
            z = vq.encoder(x).float()
            return z, vq.quantize.nearest_ids(z)

    z_ref, ids_ref = tokenize(False)
    assert calls == []
    z, ids = tokenize(True)
    assert len(calls) == len(vq.encoder.down) - 1
    assert torch.equal(z, z_ref) and torch.equal(ids, ids_ref)
