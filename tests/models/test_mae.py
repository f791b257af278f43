"""MAE family (models/mae.py, models/vit_blocks.py): official key layout, masking, encoder/decoder
semantics, patchify, reconstruction, checkpoint round trip.

Tolerances: fp32 1e-5 relative / 1e-6 absolute where only the computation order differs (row subsets,
SDPA vs explicit softmax); visible patches of a reconstruction are compared bitwise.
"""
from __future__ import annotations

import ast
import math
import os

import numpy as np
import pytest
import torch

from tests.helpers import assert_close_report, tol
from unlearn_fast.models import TaskDraw, create_model
from unlearn_fast.models.mae import IMAGENET_MEAN, IMAGENET_STD, MaskedAutoencoderViT
from unlearn_fast.models.vit_blocks import Attention, PatchEmbed, sincos_pos_embed_2d
from unlearn_fast.train.checkpoint import CheckpointError, load_checkpoint_file, load_model_state

FP32 = tol(torch.float32)

pytestmark = pytest.mark.usefixtures("single_thread")


def _read_listing(path):
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            name, shape, dtype = line.split("\t")
            rows.append((name, tuple(ast.literal_eval(shape)), dtype))
    return rows


def test_mae_vit_large_state_dict_equals_official_listing(reference_keys_dir):
    path = os.path.join(reference_keys_dir, "mae_vit_large_patch16.txt")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    official = _read_listing(path)
    with torch.device("meta"):  # no memory, no init: only names, shapes and dtypes
        model = create_model("mae_vit_large_patch16")
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    missing = sorted({r[0] for r in official} - {r[0] for r in ours})
    extra = sorted({r[0] for r in ours} - {r[0] for r in official})
    assert not missing and not extra, f"missing {missing[:10]}, unexpected {extra[:10]}"
    assert ours == official  # same shapes, dtypes and state_dict order
    # the frozen sin-cos embeddings are parameters without grad, as upstream
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}


# ---- masking --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_ratio", [0.75, 0.6, 0.0, 0.9])
def test_masking_keeps_int_L_times_one_minus_ratio(make_mae_micro, mask_ratio, gen):
    model = make_mae_micro(mask_ratio=mask_ratio).eval()
    L = model.num_patches  # 64 for 32x32 / patch 4
    keep = int(L * (1 - mask_ratio))
    images = torch.rand(3, 3, 32, 32, generator=gen)
    task = model.sample_task(images, gen)
    assert task["noise"].shape == (3, L)
    ids_keep, mask, ids_restore = model.mask_from_task(task)
    assert ids_keep.shape == (3, keep)
    assert mask.sum(dim=1).tolist() == [float(L - keep)] * 3
    # the visible patches are the `keep` smallest noise values
    expected_keep = torch.argsort(task["noise"], dim=1)[:, :keep]
    assert torch.equal(ids_keep, expected_keep)
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(3, keep))
    assert torch.equal(torch.argsort(ids_restore, dim=1)[:, :keep], ids_keep)
    with torch.no_grad():
        latent = model.forward_encoder_task(images, task)
    assert latent.shape == (3, 1 + keep, 128)


def test_same_noise_gives_same_mask_and_latent(make_mae_micro, gen):
    model = make_mae_micro().eval()
    images = torch.rand(2, 3, 32, 32, generator=gen)
    t1 = model.sample_task(images, torch.Generator().manual_seed(5))
    t2 = model.sample_task(images, torch.Generator().manual_seed(5))
    t3 = model.sample_task(images, torch.Generator().manual_seed(6))
    assert torch.equal(t1["noise"], t2["noise"]) and not torch.equal(t1["noise"], t3["noise"])
    assert all(torch.equal(a, b) for a, b in zip(model.mask_from_task(t1), model.mask_from_task(t2)))
    with torch.no_grad():
        assert torch.equal(model.forward_encoder_task(images, t1), model.forward_encoder_task(images, t2))


def test_task_select_gives_the_same_rows(make_mae_micro, gen):
    # the pruned teacher runs on a subset of rows with task.select(rows): results must be those rows
    model = make_mae_micro().eval()
    images = torch.rand(5, 3, 32, 32, generator=gen)
    task = model.sample_task(images, gen)
    rows = torch.tensor([1, 4])
    with torch.no_grad():
        full = model.forward_encoder_task(images, task)
        sub = model.forward_encoder_task(images.index_select(0, rows), task.select(rows))
    assert isinstance(task.select(rows), TaskDraw)
    assert_close_report(sub, full[rows], **FP32)


def test_prenorm_then_norm_equals_normal(make_mae_micro, gen):
    model = make_mae_micro().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5, generator=gen)
        model.norm.bias.normal_(0, 0.2, generator=gen)
    images = torch.rand(3, 3, 32, 32, generator=gen)
    task = model.sample_task(images, gen)
    with torch.no_grad():
        pre = model.forward_encoder_task(images, task, prenorm=True)
        post = model.forward_encoder_task(images, task)
    assert model.encoder_final_norm() is model.norm
    assert_close_report(model.encoder_final_norm()(pre), post, rtol=0, atol=0)
    assert not torch.allclose(pre, post)


# ---- geometry ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(), dict(img_size=24, patch_size=6, in_chans=1)])
def test_patchify_unpatchify_round_trip(kwargs, gen):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                     decoder_num_heads=2, **({"img_size": 32, "patch_size": 4} | kwargs))
    c, s, p = model.in_chans, model.patch_embed.img_size, model.patch_embed.patch_size
    images = torch.rand(2, c, s, s, generator=gen)
    patches = model.patchify(images)
    assert patches.shape == (2, (s // p) ** 2, p * p * c)
    assert torch.equal(model.unpatchify(patches), images)
    # MAE's order: patch index h*G + w, inside a patch (p, q, c)
    g = s // p
    h, w = 1, g - 1
    expected = images[1, :, h * p:(h + 1) * p, w * p:(w + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, h * g + w], expected)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("imagenet_norm", [False, True])
def test_reconstruct_keeps_visible_patches(make_mae_micro, norm_pix_loss, imagenet_norm, gen):
    extra = dict(input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD) if imagenet_norm else {}
    model = make_mae_micro(norm_pix_loss=norm_pix_loss, **extra).eval()
    images = torch.rand(2, 3, 32, 32, generator=gen)
    task = model.sample_task(images, gen)
    out = model.reconstruct(images, task)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    _, mask, _ = model.mask_from_task(task)
    visible = (mask == 0).unsqueeze(-1).expand(-1, -1, 48)
    got, want = model.patchify(out)[visible], model.patchify(images)[visible]
    if imagenet_norm:  # (x - m) / s * s + m is exact only up to one rounding
        assert_close_report(got, want, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, want)
    # hidden patches come from the decoder, not from the input
    hidden = (mask == 1).unsqueeze(-1).expand(-1, -1, 48)
    assert not torch.allclose(model.patchify(out)[hidden], model.patchify(images)[hidden])


def test_forward_matches_upstream_loss(make_mae_micro, gen):
    model = make_mae_micro().eval()
    images = torch.rand(3, 3, 32, 32, generator=gen)
    task = model.sample_task(images, gen)
    with torch.no_grad():
        loss, pred, mask = model(images, task)
        loss_tok, weight = model.task_loss_terms(images, task)
    target = model.patchify(images)  # mae_micro: no input normalisation, norm_pix_loss off
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    assert_close_report(loss, (per_patch * mask).sum() / mask.sum(), **FP32)  # mean over hidden patches
    assert_close_report(loss_tok, per_patch, **FP32)
    assert torch.equal(weight, mask)
    assert pred.shape == (3, 64, 48)


def test_noisy_task_target_has_the_target_statistics(make_mae_micro, gen):
    model = make_mae_micro()
    target = torch.rand(4, 64, 48, generator=gen) * 3 + 2
    noisy = model.noisy_task_target(target, torch.Generator().manual_seed(1))
    z = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert_close_report(noisy, z * target.std() + target.mean(), **FP32)


# ---- parameters the loss reaches ----------------------------------------------------------------------------

def test_encoder_parameter_names_are_what_the_encoder_loss_reaches(make_mae_micro, gen):
    model = make_mae_micro()
    names = set(model.encoder_parameter_names())
    assert "cls_token" in names and "norm.weight" in names and "patch_embed.proj.weight" in names
    assert not any(n.startswith(("decoder", "mask_token")) for n in names)
    assert "pos_embed" not in names  # frozen sin-cos
    images = torch.rand(2, 3, 32, 32, generator=gen)
    model.forward_encoder_task(images, model.sample_task(images, gen)).pow(2).mean().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached == names
    assert [p for p in model.encoder_parameters()] == [p for n, p in model.named_parameters() if n in names]


# ---- checkpoint round trip ----------------------------------------------------------------------------------

def test_state_dict_round_trip_loads_strictly(make_mae_micro, tmp_path, gen):
    src = make_mae_micro(seed=1).eval()
    dst = make_mae_micro(seed=2).eval()
    path = str(tmp_path / "mae.pth")
    torch.save({"model": src.state_dict()}, path)
    ckpt = load_checkpoint_file(path)
    load_model_state(dst, ckpt["model"], path)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
    images = torch.rand(2, 3, 32, 32, generator=gen)
    task = src.sample_task(images, gen)
    with torch.no_grad():
        assert torch.equal(src.forward_encoder_task(images, task), dst.forward_encoder_task(images, task))
    # the non-persistent normalisation buffers are not in the state dict
    assert not any("input_mean" in k or "input_std" in k for k in src.state_dict())
    bigger = make_mae_micro(depth=3)
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state(bigger, ckpt["model"], path)


# ---- building blocks and validation ----------------------------------------------------------------------------

def _mae_sincos_numpy(d, g):
    """facebookresearch/mae get_2d_sincos_pos_embed, restated in numpy (cls row of zeros first)."""
    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))  # (w, h)
    emb = np.concatenate([one(d // 2, grid[0]), one(d // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros((1, d)), emb], axis=0)


@pytest.mark.parametrize("d,g", [(16, 4), (32, 7), (1024, 14)])
def test_sincos_pos_embed_layout(d, g):
    emb = sincos_pos_embed_2d(d, g)
    assert emb.shape == (1, g * g + 1, d) and emb.dtype == torch.float32
    assert_close_report(emb[0], torch.from_numpy(_mae_sincos_numpy(d, g)), rtol=0, atol=1e-6)
    # hand check: patch (row 0, col 1) -> first half encodes position 1, second half position 0
    q = d // 4
    assert emb[0, 2, :q].tolist() == pytest.approx([math.sin(1.0 / 10000 ** (i / q)) for i in range(q)], abs=1e-6)
    assert emb[0, 2, 2 * q:3 * q].abs().max().item() == 0.0 and emb[0, 2, 3 * q:].tolist() == [1.0] * q
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 3)


def test_attention_equals_explicit_softmax(gen):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        attn = Attention(24, 3)
    x = torch.randn(2, 7, 24, generator=gen)
    n, l, d = x.shape
    qkv = attn.qkv(x).reshape(n, l, 3, 3, d // 3).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // 3), dim=-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(n, l, d))
    with torch.no_grad():
        assert_close_report(attn(x), expected, **FP32)


def _graph_node_names(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(nxt for nxt, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def test_attention_gradient_equals_timm_select_form_without_its_zero_filled_sums(gen):
    """timm's ``qkv[0], qkv[1], qkv[2]`` backward zero-fills three [3, N, H, L, d_h] tensors and sums them;
    ``unbind`` stacks the three grads once: the same gradient, bit for bit (adding exact zeros)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        attn = Attention(24, 3)
    x = torch.randn(3, 5, 24, generator=gen, requires_grad=True)
    up = torch.randn(3, 5, 24, generator=gen)
    out = attn(x)
    assert "SelectBackward0" not in _graph_node_names(out) and "UnbindBackward0" in _graph_node_names(out)
    got = torch.autograd.grad(out, [x, attn.qkv.weight, attn.qkv.bias], up)
    n, l, d = x.shape
    qkv = attn.qkv(x).reshape(n, l, 3, 3, d // 3).permute(2, 0, 3, 1, 4)
    timm = attn.proj(torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
                     .transpose(1, 2).reshape(n, l, d))
    want = torch.autograd.grad(timm, [x, attn.qkv.weight, attn.qkv.bias], up)
    assert torch.equal(out, timm)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_bad_configs_and_inputs_raise(make_mae_micro):
    with pytest.raises(ValueError, match="mask_ratio"):
        make_mae_micro(mask_ratio=1.0)
    with pytest.raises(ValueError, match="multiple"):
        PatchEmbed(30, 4, 3, 8)
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)
    model = make_mae_micro()
    images = torch.rand(1, 3, 24, 24)
    with pytest.raises(ValueError, match="32x32"):
        model.forward_encoder_task(images, model.sample_task(images))


def test_init_is_maes(make_mae_micro):
    model = make_mae_micro()
    assert torch.equal(model.norm.weight, torch.ones(128)) and torch.equal(model.blocks[0].attn.qkv.bias,
                                                                           torch.zeros(384))
    assert 0.01 < model.cls_token.std().item() < 0.03  # normal(std=0.02)
    assert_close_report(model.pos_embed, sincos_pos_embed_2d(128, 8), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"input_size": "32"}, {"depth": 1.5}, {"embed_dim": 0}, {"num_heads": True}])
def test_bad_size_arguments_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0].replace("input_size", "img_size")):
        create_model("mae_micro", **kwargs)


@pytest.mark.parametrize("fast", [False, True])
def test_encoder_input_checks_and_fp64_images(make_mae_micro, fast):
    """Both embedding paths refuse wrong channel counts and integer images with one clear error, and take fp64
    images as the fp32 they would be normalised to (the conv's weights are fp32)."""
    from unlearn_fast.models.visible_patches import visible_patch_embed
    model = make_mae_micro()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    task = model.sample_task(x.float())
    with visible_patch_embed(fast):
        out = model.forward_encoder_task(x, task)
        assert out.dtype == torch.float32
        assert torch.equal(out, model.forward_encoder_task(x.float(), task))
        with pytest.raises(ValueError, match="3 channels"):
            model.forward_encoder_task(torch.rand(2, 4, 32, 32), task)
        with pytest.raises(TypeError, match="floating-point images"):
            model.forward_encoder_task(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), task)
