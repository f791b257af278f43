"""Red-team edges of MAE's visible-patch embedding (models/visible_patches.py): no visible patch at all (mask ratio
near 1), an empty batch, and images with the wrong channel count, against the official conv path."""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.models.mae import MaskedAutoencoderViT
from unlearn_fast.models.visible_patches import visible_patch_embed

pytestmark = pytest.mark.usefixtures("single_thread")


def _mae(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
               decoder_num_heads=2)
    cfg.update(kw)
    return MaskedAutoencoderViT(**cfg)


def _encode(model, images, task, gemm):
    model.zero_grad()
    with visible_patch_embed(gemm):
        out = model.forward_encoder_task(images, task)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), model.patch_embed.proj.weight.grad.clone(), model.cls_token.grad.clone()


@pytest.mark.parametrize("mask_ratio,n", [(0.99, 2), (0.999, 1), (0.75, 0)])
def test_no_visible_patch_or_empty_batch_matches_the_conv(mask_ratio, n):
    model = _mae(mask_ratio=mask_ratio)
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    task = model.sample_task(images, torch.Generator().manual_seed(2))
    conv = _encode(model, images, task, False)
    gemm = _encode(model, images, task, True)
    assert gemm[0].shape == conv[0].shape == (n, 1 + model.num_visible(), 32)
    for a, b in zip(gemm, conv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_wrong_channel_count_is_one_clear_error():
    model = _mae(in_chans=3)
    images = torch.rand(2, 4, 32, 32)
    with visible_patch_embed(), pytest.raises(ValueError, match="3 channels"):
        model.forward_encoder_task(images, model.sample_task(images))
