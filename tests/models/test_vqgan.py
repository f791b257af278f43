"""VQGAN tokenizer: official key layout, the JAX-port block quirks, quantizer math, checkpoint loading."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.models.vqgan import VQGAN, VQGAN_F16_DDCONFIG, ResnetBlock, load_vqgan_checkpoint

from tests.helpers import read_reference_listing

TINY = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 1, 2),
            num_res_blocks=1, attn_resolutions=(), dropout=0.0)


read_listing = read_reference_listing


def listing_of(module):
    return [(k, tuple(t.shape), str(t.dtype).replace("torch.", "")) for k, t in module.state_dict().items()]


def fake_state(rows):
    """Zeros with the listed shapes/dtypes, stored as stride-0 views so the file stays tiny."""
    return {k: torch.zeros((), dtype=getattr(torch, d)).expand(s) for k, s, d in rows}


def test_official_vqgan_keys_shapes_dtypes_and_order():
    rows = read_listing("vqgan_jax_strongaug.txt")
    with torch.device("meta"):
        vq = VQGAN()
    assert listing_of(vq) == rows  # same keys, shapes, dtypes, in state_dict order
    enc = sum(t.numel() for k, t in vq.state_dict().items() if k.startswith("encoder."))
    assert enc == 23_775_104  # REFERENCE.md §6 / the listing's note


def test_official_geometry_on_meta():
    with torch.device("meta"):
        vq = VQGAN()
        ids = vq.tokenize(torch.empty(2, 3, 256, 256))
        img = vq.decode_ids(torch.zeros(2, 256, dtype=torch.long))
    assert vq.grid_size == 16 and tuple(ids.shape) == (2, 256) and ids.dtype == torch.long
    assert tuple(img.shape) == (2, 3, 256, 256)


def test_resblock_matches_plain_math_with_shortcut_on_h():
    torch.manual_seed(0)
    for cin, cout in ((32, 64), (64, 64)):
        blk = ResnetBlock(cin, cout, groups=32)
        for p in blk.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(2, cin, 5, 7)
        h = F.conv2d(F.silu(F.group_norm(x, 32, blk.norm1.weight, blk.norm1.bias, 1e-6)), blk.conv1.weight, padding=1)
        h = F.conv2d(F.silu(F.group_norm(h, 32, blk.norm2.weight, blk.norm2.bias, 1e-6)), blk.conv2.weight, padding=1)
        want = F.conv2d(h, blk.nin_shortcut.weight) + h if cin != cout else x + h
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)
        assert blk.conv1.bias is None and blk.conv2.bias is None


def test_encoder_downsamples_by_avg_pool():
    torch.manual_seed(0)
    vq = VQGAN(TINY, n_embed=16, embed_dim=32)
    x = torch.rand(3, 3, 32, 32)
    enc = vq.encoder
    h = enc.conv_in(x)
    for i, level in enumerate(enc.down):
        for blk in level.block:
            h = blk(h)
        if i < len(enc.down) - 1:
            h = (h[..., 0::2, 0::2] + h[..., 1::2, 0::2] + h[..., 0::2, 1::2] + h[..., 1::2, 1::2]) / 4
    h = enc.mid.block_2(enc.mid.block_1(h))
    want = enc.conv_out(F.silu(enc.norm_out(h)))
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)
    assert tuple(want.shape) == (3, 32, 8, 8)


def test_quantizer_argmin_matches_brute_force():
    torch.manual_seed(0)
    vq = VQGAN(TINY, n_embed=37, embed_dim=32)
    z = torch.randn(3, 32, 8, 8)
    ids = vq.quantize.nearest_ids(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 32).double()
    want = torch.cdist(zf, vq.quantize.embedding.weight.double()).argmin(1).view(3, 64)
    assert ids.dtype == torch.long and tuple(ids.shape) == (3, 64)
    assert (ids == want).float().mean() > 0.99  # float32 vs float64 may flip exact near-ties only
    # codebook vectors themselves quantise to their own ids (row-major over the grid)
    codes = vq.quantize.codes(want, (8, 8))
    assert torch.equal(vq.quantize.nearest_ids(codes), want)


def test_tokenize_decode_shapes_and_bad_input():
    vq = VQGAN(TINY, n_embed=16, embed_dim=32).eval()
    ids = vq.tokenize(torch.rand(1, 3, 32, 32))
    assert tuple(ids.shape) == (1, 64) and int(ids.max()) < 16
    assert tuple(vq.decode_ids(ids).shape) == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="expected images"):
        vq.tokenize(torch.rand(1, 3, 31, 32))
    with pytest.raises(ValueError, match="z_channels"):
        VQGAN(TINY, n_embed=16, embed_dim=8)
    with pytest.raises(ValueError, match="unknown ddconfig"):
        VQGAN(dict(TINY, attn_type="vanilla"))
    with pytest.raises(ValueError, match="groups"):
        VQGAN(dict(TINY, ch=16), n_embed=16, embed_dim=32)


@pytest.mark.parametrize("lightning", [True, False])
def test_load_both_containers_round_trip(tmp_path, lightning):
    torch.manual_seed(0)
    src = VQGAN(TINY, n_embed=16, embed_dim=32).eval()
    sd = src.state_dict()
    path = str(tmp_path / "vq.ckpt")
    torch.save({"state_dict": sd, "global_step": 3} if lightning else sd, path)
    torch.manual_seed(1)
    dst = VQGAN(TINY, n_embed=16, embed_dim=32).eval()
    load_vqgan_checkpoint(dst, path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(dst.tokenize(x), src.tokenize(x))
    torch.testing.assert_close(dst(x)[0], src(x)[0], rtol=0, atol=0)


def test_fake_official_ckpt_loads_and_bad_files_explain(tmp_path):
    rows = read_listing("vqgan_jax_strongaug.txt")
    path = str(tmp_path / "vqgan_jax_strongaug.ckpt")
    torch.save({"state_dict": fake_state(rows)}, path)
    with torch.device("meta"):
        vq = VQGAN(VQGAN_F16_DDCONFIG)
    load_vqgan_checkpoint(vq, path)
    assert not any(t.is_meta for t in vq.state_dict().values())
    assert listing_of(vq) == rows

    bad = fake_state(rows)
    bad.pop("quantize.embedding.weight")
    bad["loss.discriminator.weight"] = torch.zeros(1)
    bad["decoder.conv_out.bias"] = torch.zeros(4)
    torch.save(bad, path)
    with torch.device("meta"):
        vq = VQGAN()
    with pytest.raises(ValueError) as e:
        load_vqgan_checkpoint(vq, path)
    msg = str(e.value)
    assert "quantize.embedding.weight" in msg and "loss.discriminator.weight" in msg and "decoder.conv_out.bias" in msg
    assert "missing" in msg and "unexpected" in msg and "shape" in msg

    with pytest.raises(FileNotFoundError):
        load_vqgan_checkpoint(vq, str(tmp_path / "nope.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_vqgan_checkpoint(vq, str(tmp_path / "junk.ckpt"))
    with pytest.raises(TypeError):
        load_vqgan_checkpoint(torch.nn.Linear(2, 2), path)


def test_copy_into_real_model_keeps_values(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real (non-meta) model copies, no assign warnings
        torch.manual_seed(0)
        a, b = VQGAN(TINY, n_embed=16, embed_dim=32), VQGAN(TINY, n_embed=16, embed_dim=32)
        path = str(tmp_path / "a.ckpt")
        torch.save(a.state_dict(), path)
        load_vqgan_checkpoint(b, path)
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(ta, tb)


def test_fused_group_norms_leave_cpu_tokenisation_bit_identical(monkeypatch):
    """The fused GroupNorm + swish is a CUDA-only path: on the CPU the context changes nothing (the official
    ``x * sigmoid(x)`` rounding is kept) and the fused op is never called."""
    import unlearn_fast.models.vqgan as vqgan_mod
    calls = []
    monkeypatch.setattr(vqgan_mod, "group_norm_silu", lambda *a, **k: calls.append(1))
    vq = vqgan_mod.VQGAN(ddconfig=dict(vqgan_mod.VQGAN_F16_DDCONFIG, ch=32, ch_mult=(1, 2), resolution=32))
    vq.eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vq.tokenize(x)
        with vqgan_mod.fused_group_norms():
            fused_ctx = vq.tokenize(x)
    assert torch.equal(plain, fused_ctx) and calls == []


def test_channels_last_tokenizer_runs_the_encoder_nhwc_with_the_same_ids():
    """Under ``channels_last_tokenizer`` every conv of the encoder sees NHWC input; the latent equals the NCHW
    one up to fp32 summation order (1e-5 relative) and so do the ids (tiny random VQGAN, fp32 on the CPU)."""
    from unlearn_fast.models.vqgan import VQGAN, VQGAN_F16_DDCONFIG, channels_last_tokenizer
    torch.manual_seed(0)
    vq = VQGAN(ddconfig=dict(VQGAN_F16_DDCONFIG, ch=32, ch_mult=(1, 2, 2), resolution=32), n_embed=64).eval()
    images = torch.rand(2, 3, 32, 32)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
             for m in vq.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        z_ref = vq.encoder(images)
        ids_ref = vq.tokenize(images)
        assert not any(seen[:3])
        seen.clear()
        with channels_last_tokenizer():
            ids = vq.tokenize(images)
            z = vq.encoder(images.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    assert ((z - z_ref).abs().max() / z_ref.abs().max()).item() <= 1e-5
    assert torch.equal(ids, ids_ref)
    assert not channels_last_tokenizer.on()
