"""MAE's embedding of the visible patches alone (models/visible_patches.py) against the official conv-then-gather
form: values and gradients, several sizes and mask ratios, fp32 and under bf16 autocast; and that the fast step
uses it while the reference step keeps the conv.

Tolerances: fp32 1e-5 relative to the largest value (a GEMM and a conv sum the same C·p·p products in another
order: ~1e-7 relative per sum, grown by the blocks behind); bf16 autocast 2e-2 relative (inputs and weights
rounded to bf16 identically, fp32 accumulation in another order, then rounded to bf16: a 1-ulp flip, 2^-8,
can pass through the blocks).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast
from unlearn_fast.models.visible_patches import (embed_visible_patches, gather_patches, gemm_matches_conv,
                                                  visible_patch_embed)
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_reference import reference_step
from unlearn_fast.train.unlearn_setup import build_setup

from tests.helpers import tf32_settings

SIZES = [  # (img_size, patch, in_chans, embed_dim, batch, mask_ratio)
    (32, 8, 3, 48, 3, 0.75),
    (40, 8, 1, 40, 1, 0.5),   # one channel, N = 1, a 5x5 grid
    (48, 16, 3, 64, 2, 0.0),  # nothing hidden
    (64, 16, 3, 96, 5, 0.9),  # one visible patch of 16
]


def _model(img, patch, chans, dim, ratio):
    torch.manual_seed(0)
    return unlearn_fast.create_model("mae_micro", img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim,
                                     depth=2, num_heads=4, mask_ratio=ratio)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("img,patch,chans,dim,n,ratio", SIZES)
def test_gathered_patches_are_the_convs_input_columns(img, patch, chans, dim, n, ratio):
    m = _model(img, patch, chans, dim, ratio)
    x = torch.rand(n, chans, img, img)
    ids_keep = m.mask_from_task(m.sample_task(x))[0]  # [N, K]
    cols = F.unfold(x, patch, stride=patch).transpose(1, 2)  # [N, L, C*p*p], (c, i, j) order as the conv weight
    want = torch.gather(cols, 1, ids_keep.unsqueeze(-1).expand(-1, -1, cols.shape[-1]))
    got = gather_patches(m.patch_embed, x, ids_keep)
    assert got.shape == (n, ids_keep.shape[1], chans, patch, patch)
    assert torch.equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("img,patch,chans,dim,n,ratio", SIZES)
def test_encoder_values_and_gradients_match_the_conv_path(img, patch, chans, dim, n, ratio):
    m = _model(img, patch, chans, dim, ratio)
    m2 = copy.deepcopy(m)
    x = torch.rand(n, chans, img, img)
    task = m.sample_task(x)
    a = m.forward_encoder_task(x, task)
    with visible_patch_embed():
        b = m2.forward_encoder_task(x, task)
    assert a.shape == b.shape and _rel(b, a) <= 1e-5
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "blocks.0.attn.qkv.weight"):
        pa, pb = m.get_parameter(name).grad, m2.get_parameter(name).grad
        assert _rel(pb, pa) <= 1e-5, name


def test_bf16_autocast_matches_the_conv_path():
    m = _model(64, 16, 3, 96, 0.75)
    x = torch.rand(4, 3, 64, 64)
    task = m.sample_task(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = m.forward_encoder_task(x, task)
        with visible_patch_embed():
            b = m.forward_encoder_task(x, task)
    assert a.dtype == b.dtype and _rel(b, a) <= 2e-2


def test_embedding_alone_equals_the_conv_at_kept_rows():
    m = _model(32, 8, 3, 48, 0.75)
    x = torch.rand(3, 3, 32, 32)
    ids_keep = m.mask_from_task(m.sample_task(x))[0]
    full = m.patch_embed(m.normalize(x))  # [N, L, D]
    want = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    got = embed_visible_patches(m.patch_embed, x, ids_keep, m.normalize)
    assert _rel(got, want) <= 1e-6


def test_switch_is_off_by_default_and_checks_the_image_size():
    m = _model(32, 8, 3, 48, 0.75)
    assert not visible_patch_embed.on()
    x = torch.rand(2, 3, 24, 24)
    task = m.sample_task(torch.rand(2, 3, 32, 32))
    with visible_patch_embed(), pytest.raises(ValueError, match="32x32"):
        m.forward_encoder_task(x, task)


def _conv_forbidden(model):
    def fail(*_):
        raise AssertionError("the conv patch embedding ran")
    model.patch_embed.proj.forward = fail


def test_fast_step_embeds_visible_patches_and_reference_step_keeps_the_conv():
    m = _model(32, 8, 3, 48, 0.75)
    images, is_forget = torch.rand(4, 3, 32, 32), torch.tensor([True, False, True, False])
    fast = build_setup(copy.deepcopy(m), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    _conv_forbidden(fast.student)
    _conv_forbidden(fast.teacher)
    fast_step(fast, images, is_forget, 0)  # neither student nor teacher reaches the conv
    off = build_setup(copy.deepcopy(m), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5,
                      visible_patch_embed=False)
    _conv_forbidden(off.student)
    with pytest.raises(AssertionError, match="conv patch embedding ran"):
        fast_step(off, images, is_forget, 0)
    ref = build_setup(copy.deepcopy(m), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    _conv_forbidden(ref.student)
    with pytest.raises(AssertionError, match="conv patch embedding ran"):
        reference_step(ref, images, is_forget, 0)


class _OnGpu:
    is_cuda = True


def test_fp32_on_a_gpu_keeps_the_conv_unless_tf32_settings_agree():
    """The reference's fp32 teacher embeds patches with cuDNN in TF32 (its default) while cuBLAS runs fp32 GEMMs in
    full fp32 (its default): there the GEMM would be more exact than the reference, not equal, so the conv stays."""
    assert gemm_matches_conv(torch.rand(1, 3, 8, 8))  # the CPU
    with tf32_settings(matmul=False, cudnn=True):
        assert not gemm_matches_conv(_OnGpu())
    with tf32_settings(matmul=True, cudnn=True):
        assert gemm_matches_conv(_OnGpu())
