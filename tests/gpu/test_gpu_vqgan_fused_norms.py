"""The frozen VQGAN's fused GroupNorm + swish on a GPU (skipped without CUDA): inside ``fused_group_norms`` the
encoder calls the fused op at every norm and its latents and code ids match torch's own ops at the same
precision. Tolerances on the pre-quantisation latent z (relative, whole tensor): fp32 5e-3 (the convs run in
TF32, cuDNN's default and the reference trainer's: a last-bit difference in a norm's output moves each conv's
TF32 rounding, 1.1e-3 measured on an H100 through 25 norms and convs), fp16 1e-2, bf16 3e-2 (one rounding of
each norm's output in the autocast dtype, where torch's path rounds the same value at the next conv's cast);
code ids: at least 95 % (fp32) and 90 % (fp16/bf16) identical, near-ties may flip."""
from __future__ import annotations

import pytest
import torch

import unlearn_fast.models.vqgan as vqgan_mod
from unlearn_fast.models.vqgan import VQGAN, fused_group_norms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {"fp32": (None, 5e-3, 0.95), "fp16": (torch.float16, 1e-2, 0.90), "bf16": (torch.bfloat16, 3e-2, 0.90)}


def _spied_vqgan(monkeypatch, record):
    """(a random full-size frozen VQGAN, 3 images) with ``record(x, kwargs)`` called on every fused-norm call."""
    torch.manual_seed(0)
    real = vqgan_mod.group_norm_silu

    def spy(x, *args, **kwargs):
        record(x, kwargs)
        return real(x, *args, **kwargs)
    monkeypatch.setattr(vqgan_mod, "group_norm_silu", spy)
    return VQGAN().cuda().eval().requires_grad_(False), torch.rand(3, 3, 256, 256, device="cuda")


@pytest.mark.parametrize("precision", list(CASES))
def test_fused_norms_match_torch_ops(monkeypatch, precision):
    dtype, tol, id_share = CASES[precision]
    calls = []
    vq, images = _spied_vqgan(monkeypatch, lambda x, kwargs: calls.append(kwargs.get("out_dtype")))

    def encode(fused: bool):
        with torch.no_grad(), fused_group_norms(fused), \
                torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            z = vq.encoder(images).float()
            return z, vq.quantize.nearest_ids(z)

    z_ref, ids_ref = encode(False)
    assert calls == []
    z, ids = encode(True)
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vq.encoder.modules())
    assert len(calls) == n_norms and set(calls) == {dtype or torch.float32}
    rel = ((z - z_ref).norm() / z_ref.norm()).item()
    assert rel <= tol, rel
    assert (ids == ids_ref).float().mean().item() >= id_share


def test_fused_norms_off_by_default_and_with_autograd():
    vq = VQGAN(ddconfig=dict(vqgan_mod.VQGAN_F16_DDCONFIG, ch=32, ch_mult=(1, 2))).cuda()
    x = torch.rand(2, 3, 32, 32, device="cuda")
    with fused_group_norms():
        a = vq.encoder(x)  # parameters require grad: the differentiable torch path
    b = vq.encoder(x)
    assert torch.equal(a, b) and a.requires_grad


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_channels_last_tokenizer_matches_nchw(monkeypatch, precision):
    """``channels_last_tokenizer`` with the fused norms: every norm reads NHWC in place (no copy to NCHW), and the
    ids match the NCHW run's as often as above (another layout: other conv algorithms)."""
    dtype, _, id_share = CASES[precision]
    layouts = []
    vq, images = _spied_vqgan(monkeypatch, lambda x, kwargs: layouts.append(
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))

    def tokenize(channels_last: bool):
        with torch.no_grad(), fused_group_norms(), vqgan_mod.channels_last_tokenizer(channels_last), \
                torch.autocast("cuda", dtype=dtype):
            return vq.tokenize(images)

    ids_ref = tokenize(False)
    assert layouts and not any(layouts)
    layouts.clear()
    ids = tokenize(True)
    assert layouts and all(layouts)
    assert (ids == ids_ref).float().mean().item() >= id_share


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_aligned_input_conv_keeps_the_ids(precision):
    """The RGB conv over 8 zero-padded channels (aligned_conv.py) under half autocast: the first conv's output
    within one rounding of the autocast dtype of the plain conv's, and the ids as often equal as above."""
    from unlearn_fast.models.aligned_conv import aligned_input_conv
    dtype, _, id_share = CASES[precision]
    torch.manual_seed(0)
    vq = VQGAN().cuda().eval().requires_grad_(False)
    images = torch.rand(3, 3, 256, 256, device="cuda")

    def run(aligned: bool):  # (ids, conv_in's output)
        with torch.no_grad(), aligned_input_conv(aligned), torch.autocast("cuda", dtype=dtype):
            return vq.tokenize(images), vqgan_mod.input_conv(vq.encoder.conv_in, images)

    (ids_ref, h_ref), (ids, h) = run(False), run(True)
    assert h.dtype == h_ref.dtype == dtype
    assert ((h.float() - h_ref.float()).abs().max() / h_ref.float().abs().max()).item() <= 2 * torch.finfo(dtype).eps
    assert (ids == ids_ref).float().mean().item() >= id_share
