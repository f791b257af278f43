"""models/vqgan.py under ``fused_residual_pools``: each encoder level but the last ends with one add + pool call
(the last block's residual terms, unsummed), and the encoder computes what it computes without the switch.

On the CPU the op runs its twin (torch's add and pool: the same bits); with UNLEARN_FAST_BACKEND=triton the
interpreted kernel, whose fp32 result is within 1e-6 relative of torch's ops (the latent z compared as a whole
tensor: a pooled value an ulp off moves the later convs' sums by about as much). A level without blocks and the
decoder's levels keep torch's pool / no pool.
"""
from __future__ import annotations

import pytest
import torch

import unlearn_fast.models.vqgan as vqgan_mod
from unlearn_fast.models.vqgan import VQGAN, VQGAN_F16_DDCONFIG, fused_residual_pools

DDCONFIG = dict(VQGAN_F16_DDCONFIG, ch=32, ch_mult=(1, 2, 2), resolution=32, z_channels=16)


def _vqgan_and_images(monkeypatch, calls):
    torch.manual_seed(0)
    real = vqgan_mod.add_avg_pool2d

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)
    monkeypatch.setattr(vqgan_mod, "add_avg_pool2d", spy)
    vq = VQGAN(ddconfig=DDCONFIG, n_embed=64, embed_dim=16).eval().requires_grad_(False)
    return vq, torch.rand(2, 3, 32, 32)


def _encode(vq, images, fused: bool):
    with torch.no_grad(), fused_residual_pools(fused):
        return vq.encoder(images)


def test_one_fused_call_per_level_change_and_the_same_latent(monkeypatch):
    calls = []
    vq, images = _vqgan_and_images(monkeypatch, calls)
    z_ref = _encode(vq, images, False)
    assert calls == []
    z = _encode(vq, images, True)
    # levels 0 and 1 pool (32 -> 16 -> 8); level 1 widens 32 -> 64 channels, so its last block is [2, 64, 16, 16]
    assert calls == [((2, 32, 32, 32),) * 2, ((2, 64, 16, 16),) * 2]
    assert torch.equal(z, z_ref)  # the twin on the CPU: torch's own add and pool


def test_interpreted_kernel_gives_the_latent_of_torchs_ops(monkeypatch):
    pytest.importorskip("triton")
    from unlearn_fast.kernels import residual_avg_pool as kernel_module
    from tests.helpers import triton_kernel_device
    if triton_kernel_device(kernel_module._add_avg_pool_nchw_kernel) != "cpu":
        pytest.skip("the GPU form is tests/gpu/test_gpu_residual_avg_pool.py")
    calls = []
    vq, images = _vqgan_and_images(monkeypatch, calls)
    z_ref = _encode(vq, images, False)
    launches = []
    real = kernel_module.add_avg_pool2d_forward
    monkeypatch.setattr(kernel_module, "add_avg_pool2d_forward",
                        lambda a, b, cl: launches.append(cl) or real(a, b, cl))
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    z = _encode(vq, images, True)
    assert launches == [False, False]
    rel = ((z - z_ref).norm() / z_ref.norm()).item()
    assert rel <= 1e-6, rel


def test_levels_without_blocks_and_the_decoder_are_untouched(monkeypatch):
    calls = []
    vq, images = _vqgan_and_images(monkeypatch, calls)
    level = vq.encoder.down[0]
    x = torch.rand(1, 32, 8, 8)
    with torch.no_grad(), fused_residual_pools():
        empty = vqgan_mod._Level([])
        assert torch.equal(empty.forward_pooled(x), torch.nn.functional.avg_pool2d(x, 2, 2))
        with_upsample = vqgan_mod._Level(list(level.block), torch.nn.Identity())
        assert torch.equal(with_upsample.forward_pooled(x),
                           torch.nn.functional.avg_pool2d(with_upsample(x), 2, 2))
        vq.decode_ids(torch.zeros(1, vq.num_tokens, dtype=torch.long))
    assert calls == []
