"""Palette Network: official key layout, feature mode, the §3.2 inputs, teacher, checkpoint loading."""
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn_fast import create_model
from unlearn_fast.models.palette import (SCHEDULE_BUFFERS, Network, PaletteBatch, load_palette_checkpoint,
                                         palette_unlearn_inputs, save_palette_checkpoint, schedule_buffers,
                                         make_beta_schedule)
from unlearn_fast.models.palette_unet import AttentionBlock

PLACES2_FEATURES = ([(64, 256, 256)] * 3 + [(64, 128, 128)] + [(128, 128, 128)] * 2 + [(128, 64, 64)]
                    + [(256, 64, 64)] * 2 + [(256, 32, 32)] + [(512, 32, 32)] * 3)  # §3.1


def _listing(keys_dir):
    """(name, shape, dtype) rows of the official listing, in state_dict order."""
    rows = []
    for line in (pathlib.Path(keys_dir) / "palette_network_places2.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        rows.append((name, shape, dtype))
    return rows


def _ours(model):
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


def _meta_places2():
    with torch.device("meta"):
        return create_model("palette_places2")


def _batch(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 4: 3 * size // 4, size // 8: 3 * size // 4] = 1
    y_cond = gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g)
    return PaletteBatch(gt, mask, y_cond)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("palette_micro").eval()


# ---- key layout ------------------------------------------------------------------------------------
def test_places2_keys_match_pretrained_listing_in_order(reference_keys_dir):
    listing = _listing(reference_keys_dir)
    assert len(listing) == 658
    pretrained = [r for r in listing if not r[0].startswith("teacher_denoise_fn.")]
    assert len(pretrained) == 332
    assert _ours(_meta_places2()) == pretrained  # names, shapes, dtypes and order


def test_places2_with_teacher_matches_full_listing(reference_keys_dir):
    model = _meta_places2()
    model.attach_teacher()
    assert _ours(model) == _listing(reference_keys_dir)


def test_places2_sizes():
    model = _meta_places2()
    total = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("denoise_fn."))
    enc = sum(p.numel() for n, p in model.named_parameters() if n in set(model.encoder_parameter_names()))
    assert total == 62641347 and enc == 25044416  # listing header / §3.1
    assert all(n.startswith(("denoise_fn.cond_embed", "denoise_fn.input_blocks", "denoise_fn.middle_block"))
               for n in model.encoder_parameter_names())
    attn = [n for n, m in model.named_modules() if isinstance(m, AttentionBlock)]
    assert attn == ["denoise_fn.middle_block.1"]


# ---- feature mode ----------------------------------------------------------------------------------
def test_places2_feature_shapes_on_meta():
    model = _meta_places2()
    x = torch.empty(2, 6, 256, 256, device="meta")
    feats = model.denoise_fn(x, torch.empty(2, device="meta"), return_feat=True)
    assert [tuple(f.shape) for f in feats] == [(2,) + s for s in PLACES2_FEATURES]
    assert model.denoise_fn.feature_shapes(256) == PLACES2_FEATURES
    assert sum(math.prod(s) for s in PLACES2_FEATURES) == 22282240  # ≈ 22.28 M elements per image


def test_micro_features_are_the_block_outputs(micro):
    b = _batch(2, 16)
    x = torch.cat([b.y_cond, b.gt], 1)
    gam = torch.tensor([0.3, 0.9])
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o))
             for m in list(micro.denoise_fn.input_blocks) + [micro.denoise_fn.middle_block]]
    with torch.no_grad():
        full = micro.denoise_fn(x, gam)
        for h in hooks:
            h.remove()
        feats = micro.denoise_fn(x, gam, return_feat=True)
    assert full.shape == (2, 3, 16, 16)
    assert len(feats) == len(micro.denoise_fn.input_blocks) + 1 == 5
    assert [tuple(f.shape[1:]) for f in feats] == micro.denoise_fn.feature_shapes(16)
    for f, s in zip(feats, seen):
        torch.testing.assert_close(f, s, rtol=0, atol=0)


def test_unet_rejects_bad_input(micro):
    with pytest.raises(ValueError, match="x must be"):
        micro.denoise_fn(torch.zeros(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="gammas"):
        micro.denoise_fn(torch.zeros(2, 6, 16, 16), torch.zeros(3))
    with pytest.raises(ValueError, match="multiples"):
        micro.denoise_fn(torch.zeros(1, 6, 15, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="divisible"):
        create_model("palette_micro", unet=dict(inner_channel=24))


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_matches_plain_einsum(legacy):
    torch.manual_seed(1)
    blk = AttentionBlock(64, num_head_channels=16, legacy_order=legacy)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 5, 3)  # 15 tokens
    b, c, t, heads, ch = 2, 64, 15, 4, 16
    qkv = blk.qkv(blk.norm(x.reshape(b, c, t)))
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q / ch ** 0.25, k / ch ** 0.25), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
    want = (x.reshape(b, c, t) + blk.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)


# ---- schedule ----------------------------------------------------------------------------------------
def test_schedule_buffers_match_numpy_formulas():
    betas = np.linspace(1e-6, 1e-2, 2000, dtype=np.float64)
    alphas = 1 - betas
    gammas = np.cumprod(alphas)
    prev = np.append(1.0, gammas[:-1])
    var = betas * (1 - prev) / (1 - gammas)
    want = dict(gammas=gammas, sqrt_recip_gammas=np.sqrt(1 / gammas), sqrt_recipm1_gammas=np.sqrt(1 / gammas - 1),
                posterior_log_variance_clipped=np.log(np.maximum(var, 1e-20)),
                posterior_mean_coef1=betas * np.sqrt(prev) / (1 - gammas),
                posterior_mean_coef2=(1 - prev) * np.sqrt(alphas) / (1 - gammas))
    got = schedule_buffers(make_beta_schedule("linear", 2000, 1e-6, 1e-2))
    assert list(got) == list(SCHEDULE_BUFFERS)
    for k in SCHEDULE_BUFFERS:
        assert got[k].dtype == torch.float32
        np.testing.assert_allclose(got[k].numpy(), want[k].astype(np.float32), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unsupported beta schedule 'sigmoid'; supported: linear, quad, warmup10"):
        make_beta_schedule("sigmoid")


def _official_betas(schedule, n, lo, hi, s=8e-3):
    """The official make_beta_schedule restated: numpy float64, the cosine schedule in torch float64."""
    if schedule in ("warmup10", "warmup50"):
        betas = hi * np.ones(n, dtype=np.float64)
        warm = int(n * {"warmup10": 0.1, "warmup50": 0.5}[schedule])
        betas[:warm] = np.linspace(lo, hi, warm, dtype=np.float64)
        return betas
    if schedule == "const":
        return hi * np.ones(n, dtype=np.float64)
    if schedule == "jsd":
        return 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    t = torch.arange(n + 1, dtype=torch.float64) / n + s
    a = torch.cos(t / (1 + s) * np.pi / 2).pow(2)
    a = a / a[0]
    return (1 - a[1:] / a[:-1]).clamp(max=0.999).numpy()


@pytest.mark.parametrize("schedule,n,lo,hi", [("warmup10", 2000, 1e-6, 1e-2), ("warmup10", 7, 1e-4, 0.1),
                                               ("warmup50", 1000, 1e-4, 0.02), ("const", 50, 1e-6, 0.02),
                                               ("jsd", 100, 1e-6, 1e-2), ("cosine", 1000, 1e-6, 1e-2),
                                               ("cosine", 3, 1e-6, 1e-2)])
def test_every_official_beta_schedule(schedule, n, lo, hi):
    """warmup10 / warmup50 / const / jsd / cosine as the official code computes them, bit for bit in float64
    (their buffers are what a checkpoint trained with them holds)."""
    got = make_beta_schedule(schedule, n, lo, hi)
    want = _official_betas(schedule, n, lo, hi)
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert np.array_equal(got.numpy(), want)
    assert float(got.max()) <= 1.0 and float(got.min()) > 0.0
    if schedule == "cosine":
        assert float(got.max()) <= 0.999
    m = create_model("palette_micro", beta_schedule=dict(train=dict(schedule=schedule, n_timestep=n,
                                                                   linear_start=lo, linear_end=hi)))
    assert m.num_timesteps == n


def test_schedule_from_nested_config_phase():
    m = create_model("palette_micro", beta_schedule=dict(train=dict(schedule="linear", n_timestep=7,
                                                                   linear_start=1e-4, linear_end=0.1),
                                                        test=dict(schedule="linear", n_timestep=5)))
    assert m.num_timesteps == 7
    m2 = create_model("palette_micro", phase="test",
                      beta_schedule=dict(train=dict(n_timestep=7), test=dict(n_timestep=5)))
    assert m2.num_timesteps == 5


# ---- §3.2 inputs ------------------------------------------------------------------------------------
def test_unlearn_inputs_forget_rows_are_pure_noise(micro):
    b = _batch(4, 16)
    is_forget = torch.tensor([True, False, True, False])
    g = torch.Generator().manual_seed(5)
    s_in, t_in, gamma = palette_unlearn_inputs(b.gt, b.mask, b.y_cond, is_forget, micro.gammas, g)
    # the same draws, restated: t, then U(γ_{t-1}, γ_t), then ε
    g = torch.Generator().manual_seed(5)
    T = micro.num_timesteps
    t = torch.randint(1, T, (4,), generator=g)
    u = torch.rand((4, 1), generator=g)
    lo, hi = micro.gammas[t - 1], micro.gammas[t]
    torch.testing.assert_close(gamma, (hi - lo) * u.view(4) + lo, rtol=0, atol=0)
    assert bool(((gamma <= lo) & (gamma >= hi)).all())  # γ decreases with t
    eps = torch.randn(b.gt.shape, generator=g)
    hole, known = b.mask.bool().expand_as(b.gt), ~b.mask.bool().expand_as(b.gt)
    g4 = gamma.view(-1, 1, 1, 1)
    standard = g4.sqrt() * b.gt + (1 - g4).sqrt() * eps
    for inp in (s_in, t_in):
        assert inp.shape == (4, 6, 16, 16)
        assert torch.equal(inp[:, :3], b.y_cond)
        assert torch.equal(inp[:, 3:][known], b.gt[known])  # known context is y0 exactly
    torch.testing.assert_close(s_in[:, 3:][hole], standard[hole], rtol=1e-6, atol=1e-6)
    for i in range(4):
        got, h = t_in[i, 3:], hole[i]
        if is_forget[i]:
            c = (1 - g4[i]).sqrt()  # the reference's y_noisy at s = -1: ε up to its rounding, bit for bit
            assert torch.equal(got[h], (0 * b.gt[i] + c * eps[i] + (1 - c) * eps[i] * 2 / 2)[h])
            torch.testing.assert_close(got[h], eps[i][h], rtol=0, atol=5e-7)
        else:
            torch.testing.assert_close(got[h], standard[i][h], rtol=1e-6, atol=1e-6)
            assert torch.equal(got, s_in[i, 3:])


def test_sample_task_and_features_follow_the_same_draws(micro):
    b = _batch(3, 16)
    is_forget = torch.tensor([False, True, True])
    s_in, t_in, gamma = palette_unlearn_inputs(b.gt, b.mask, b.y_cond, is_forget, micro.gammas,
                                               torch.Generator().manual_seed(2))
    task = micro.sample_task(b, torch.Generator().manual_seed(2))
    assert torch.equal(task["gamma"], gamma)
    assert torch.equal(micro.task_input(b, task), s_in)
    assert torch.equal(micro.task_input(b, task, noise_rows=is_forget), t_in)
    with torch.no_grad():
        feats = micro.forward_encoder_features(b, task, noise_rows=is_forget)
        direct = micro.denoise_fn(t_in, gamma, return_feat=True)
    for a, d in zip(feats, direct):
        assert torch.equal(a, d)
    task2 = micro.sample_task(b.gt, torch.Generator().manual_seed(2))  # gt alone is enough to draw
    assert all(torch.equal(task[k], task2[k]) for k in task)


def test_protocol_pieces(micro):
    b = _batch(2, 16)
    task = micro.sample_task(b, torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="forward_encoder_features"):
        micro.forward_encoder_task(b, task)
    with pytest.raises(TypeError, match="PaletteBatch"):
        micro.prepare_inputs(b.gt)
    assert micro.prepare_inputs(dict(gt_image=b.gt, cond_image=b.y_cond, mask=b.mask, path=["a"])) == b
    assert micro.family == "palette" and micro.image_range == (-1.0, 1.0)
    # the per-element task loss gives Palette's whole-batch masked MSE
    with torch.no_grad():
        sq, w = micro.task_loss_terms(b, task)
        eps_hat = micro.predict_noise(b, task)
    want = F.mse_loss(b.mask * eps_hat, b.mask * task["noise"], reduction="sum") / eps_hat.numel()
    torch.testing.assert_close(sq.sum() / w.sum(), want, rtol=1e-5, atol=1e-7)


def test_encoder_loss_reaches_only_encoder_params():
    torch.manual_seed(0)
    m = create_model("palette_micro").train()
    b = _batch(2, 16)
    task = m.sample_task(b, torch.Generator().manual_seed(1))
    sum(f.square().mean() for f in m.forward_encoder_features(b, task)).backward()
    enc = set(m.encoder_parameter_names())
    for n, p in m.named_parameters():
        if n in enc:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


# ---- teacher ------------------------------------------------------------------------------------------
def test_attach_teacher_is_frozen_eval_copy():
    torch.manual_seed(0)
    m = create_model("palette_micro", unet=dict(dropout=0.5))
    teacher = m.attach_teacher()
    assert m.has_teacher and teacher is m.teacher_denoise_fn
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in m.denoise_fn.parameters())
    m.train()
    assert m.denoise_fn.training and not teacher.training  # the reference's teacher would be training
    b = _batch(2, 16)
    task = m.sample_task(b, torch.Generator().manual_seed(0))
    f1 = m.teacher_encoder_features(b, task)
    f2 = m.teacher_encoder_features(b, task)
    assert all(torch.equal(a, c) for a, c in zip(f1, f2))  # no dropout: deterministic
    m.eval()
    with torch.no_grad():
        fs = m.forward_encoder_features(b, task)
    assert all(torch.equal(a, c) for a, c in zip(f1, fs))  # same weights as the student at attach time
    with pytest.raises(ValueError, match="already attached"):
        m.attach_teacher()
    with pytest.raises(ValueError, match="no teacher"):
        create_model("palette_micro").teacher_encoder_features(b, task)


# ---- checkpoints --------------------------------------------------------------------------------------
def _fake_checkpoint(rows, prefix=""):
    # zero-stride zeros: the file stays tiny, and loading still checks every name and shape
    return {prefix + n: torch.zeros(1).expand(s) if s else torch.zeros(()) for n, s, _ in rows}


def test_places2_checkpoint_loads_and_keeps_the_layout(tmp_path, reference_keys_dir):
    rows = [r for r in _listing(reference_keys_dir) if not r[0].startswith("teacher_denoise_fn.")]
    path = tmp_path / "16_Network.pth"
    state = _fake_checkpoint(rows, prefix="module.")  # a DDP-prefixed file
    state["module.gammas"] = torch.linspace(0.99, 0.5, 2000)
    torch.save(state, path)
    model = _meta_places2().to_empty(device="cpu")
    load_palette_checkpoint(model, path)
    torch.testing.assert_close(model.gammas, torch.linspace(0.99, 0.5, 2000), rtol=0, atol=0)
    assert float(model.denoise_fn.out[2].weight.detach().abs().sum()) == 0.0
    del state
    model.denoise_fn.to("meta")  # free the weights: the teacher copy only needs names and shapes
    model.attach_teacher()
    assert _ours(model) == _listing(reference_keys_dir)


def test_saved_checkpoint_is_the_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    m = create_model("palette_micro")
    m.attach_teacher()
    path = tmp_path / "2_Network.pth"
    save_palette_checkpoint(m, path)
    saved = torch.load(path, weights_only=True)
    keys = list(saved)
    assert keys[:6] == list(SCHEDULE_BUFFERS)
    assert keys == list(m.state_dict())
    assert [k for k in keys if k.startswith("teacher_denoise_fn.")] == \
        ["teacher_" + k for k in keys if k.startswith("denoise_fn.")]
    assert all(torch.equal(saved[k], v) for k, v in m.state_dict().items())


def test_loader_teacher_keys_and_errors(tmp_path):
    torch.manual_seed(0)
    src = create_model("palette_micro")
    src.attach_teacher()
    with torch.no_grad():
        src.teacher_denoise_fn.out[2].bias.fill_(7.0)
    path = tmp_path / "3_Network.pth"
    save_palette_checkpoint(src, path)

    plain = create_model("palette_micro")
    load_palette_checkpoint(plain, path)  # teacher keys ignored: the model has none
    assert torch.equal(plain.denoise_fn.out[2].bias, src.denoise_fn.out[2].bias)
    with pytest.raises(ValueError, match=r"unexpected keys \(teacher_denoise_fn"):
        load_palette_checkpoint(create_model("palette_micro"), path, ignore_teacher_keys=False)

    with_teacher = create_model("palette_micro")
    with_teacher.attach_teacher()
    load_palette_checkpoint(with_teacher, path)
    assert float(with_teacher.teacher_denoise_fn.out[2].bias[0]) == 7.0

    pretrained = {k: v for k, v in src.state_dict().items() if not k.startswith("teacher_denoise_fn.")}
    with pytest.raises(ValueError, match="attach_teacher"):
        load_palette_checkpoint(with_teacher, pretrained)

    bad = dict(pretrained)
    bad.pop("denoise_fn.out.2.bias")
    bad["denoise_fn.extra"] = torch.zeros(1)
    bad["denoise_fn.out.0.weight"] = torch.zeros(5)
    with pytest.raises(ValueError) as e:
        load_palette_checkpoint(create_model("palette_micro"), bad)
    msg = str(e.value)
    assert "missing keys (denoise_fn.out.2.bias)" in msg and "unexpected keys (denoise_fn.extra)" in msg
    assert "denoise_fn.out.0.weight: file (5,) vs model (32,)" in msg

    ema = {k: v for k, v in pretrained.items() if k.startswith("denoise_fn.")}
    with pytest.raises(ValueError, match="require_schedule=False"):
        load_palette_checkpoint(create_model("palette_micro"), ema)
    m = create_model("palette_micro")
    load_palette_checkpoint(m, ema, require_schedule=False)
    assert torch.equal(m.denoise_fn.out[2].bias, src.denoise_fn.out[2].bias)

    longer = dict(pretrained, **schedule_buffers(make_beta_schedule("linear", 25, 1e-4, 0.02)))
    m = create_model("palette_micro")
    load_palette_checkpoint(m, longer)  # the file's schedule wins, whatever its length
    assert m.num_timesteps == 25
    with pytest.raises(FileNotFoundError):
        load_palette_checkpoint(m, tmp_path / "nope.pth")


def test_constructors():
    m = create_model("palette", unet=dict(inner_channel=32, channel_mults=[1, 2], res_blocks=1, attn_res=[],
                                          num_head_channels=32, image_size=16),
                     beta_schedule=dict(train=dict(schedule="quad", n_timestep=4, linear_start=1e-4,
                                                   linear_end=0.02)))
    assert isinstance(m, Network) and m.num_timesteps == 4
    assert len(m.denoise_fn.input_blocks) == 4
    with pytest.raises(ValueError, match="use_fp16"):
        create_model("palette_micro", unet=dict(use_fp16=True))
