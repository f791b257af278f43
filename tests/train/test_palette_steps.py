"""Palette steps on palette_micro (CPU): each approach's loss against a plain restatement of REFERENCE.md
§3.2/§3.3 (with the same t, γ, ε draws), reference-semantics vs fast trajectories, what each approach trains,
the EMA, the flag table, and the epoch loop's outputs.

Tolerances: losses rtol 1e-5 (fp32, only the reduction order differs). Trajectories: max |Δw| <= 1e-6 after
3 SGD steps at lr 1e-2 (the fused loss changes gradients by ~1e-7 relative). Adam normalises each element's
gradient, so where the true gradient is zero it turns rounding noise into ±lr steps: the Adam check bounds
those and requires all other elements to agree.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import max_param_diff
from unlearn_fast.models import create_model
from unlearn_fast.models.palette import PaletteBatch
from unlearn_fast.train.palette_steps import (APPROACHES, ENCODER_ONLY, WITH_TEACHER, PaletteEMA, approach_from_flags,
                                             build_palette_setup, palette_fast_step, palette_reference_step)
from unlearn_fast.train.palette_trainer import palette_run_dir_name, palette_train_loop
from unlearn_fast.train.seeding import step_generator
from unlearn_fast.train.step_reference import NonFiniteLossError

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
LOSS_TOL = dict(rtol=1e-5, atol=1e-7)
SIZE = 16
ALPHA = 0.3


@pytest.fixture(scope="module")
def base_net():
    torch.manual_seed(0)
    return create_model("palette_micro")


def _batch(n=5, seed=1, forget=(True, False, False, True, False)):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, SIZE, SIZE)
    mask[:, :, 3:11, 4:13] = 1.0
    mask[n - 1, :, 0:4, :] = 1.0  # a different hole in the last row
    y_cond = gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g)
    return PaletteBatch(gt, mask, y_cond), torch.tensor(forget[:n])


def _setup(net, approach, fast=True, lr=1e-4, ema_decay=0.9999):
    return build_palette_setup(copy.deepcopy(net), "cpu", approach, forget_alpha=ALPHA, lr=lr, ema_decay=ema_decay,
                               seed=3, fast=fast)


# ---- a plain restatement of the reference's Network.forward ------------------------------------------------
def _plain_loss(net, approach, batch, is_forget, step, seed=3):
    gt, mask, y_cond = batch
    n = gt.shape[0]
    g = step_generator(seed, 0, step, "task", "cpu")
    t = torch.randint(1, net.gammas.shape[0], (n,), generator=g)
    u = torch.rand((n, 1), generator=g)
    eps = torch.randn(gt.shape, generator=g)
    gam = net.gammas
    gamma = ((gam[t] - gam[t - 1]).view(n, 1) * u + gam[t - 1].view(n, 1)).view(n)
    s = torch.where(is_forget, -1.0, 1.0).view(n, 1, 1, 1)
    sg = gamma.view(n, 1, 1, 1)
    y_noisy = sg.sqrt() * gt * (s + 1) * 0.5 + (1 - sg).sqrt() * eps + (1 - (1 - sg).sqrt()) * eps * (1 - s) * 0.5
    y_orig = sg.sqrt() * gt + (1 - sg).sqrt() * eps
    x_noisy = torch.cat([y_cond, y_noisy * mask + (1 - mask) * gt], 1)
    x_orig = torch.cat([y_cond, y_orig * mask + (1 - mask) * gt], 1)
    w_r, w_f = (s + 1) * 0.5, (1 - s) * 0.5
    student, teacher = net.denoise_fn, copy.deepcopy(net.denoise_fn)  # the teacher is the model before the step

    def wmse(a, b, b_forget=None, alpha=ALPHA):
        b_forget = b if b_forget is None else b_forget
        return F.mse_loss(a * w_r, b * w_r) + alpha * F.mse_loss(a * w_f, b_forget * w_f)

    with torch.no_grad():
        if approach in ("ours", "random_encoder"):
            f_t = teacher(x_noisy, gamma, return_feat=True)
            f_s = student(x_orig, gamma, return_feat=True)
            if approach == "ours":
                return sum(wmse(a, b) for a, b in zip(f_s, f_t))
            gb = step_generator(seed, 0, step, "baseline", "cpu")
            rand = [torch.randn(b.shape, generator=gb) * b.std() + b.mean() for b in f_t]
            return sum(wmse(a, b, r) for a, b, r in zip(f_s, f_t, rand))
        if approach == "retain_label":
            e_t = teacher(x_orig, gamma)
            retain = e_t[~is_forget]
            updated = torch.tile(retain, (math.ceil(n / retain.shape[0]), 1, 1, 1))[:n]
            return wmse(student(x_orig, gamma), e_t, updated)
        if approach == "noisy_label":
            return wmse(mask * eps, mask * student(x_noisy, gamma))
        return wmse(mask * eps, mask * student(x_orig, gamma), alpha=-ALPHA)  # max_loss: (1 - 2·1)·α


@pytest.mark.parametrize("approach", APPROACHES)
def test_one_step_loss_matches_plain_restatement(base_net, approach):
    batch, is_forget = _batch()
    expected = _plain_loss(base_net, approach, batch, is_forget, step=4)
    fast = palette_fast_step(_setup(base_net, approach), batch, is_forget, 4)
    ref = palette_reference_step(_setup(base_net, approach, fast=False), batch, is_forget, 4)
    torch.testing.assert_close(fast.loss, expected, **LOSS_TOL)
    torch.testing.assert_close(ref.loss, expected, **LOSS_TOL)
    torch.testing.assert_close(fast.loss, fast.retain + (-ALPHA if approach == "max_loss" else ALPHA) * fast.forget,
                               **LOSS_TOL)


def test_batch_of_one_and_all_forget(base_net):
    for forget in ((True,), (False,)):
        batch, is_forget = _batch(1, forget=forget)
        expected = _plain_loss(base_net, "ours", batch, is_forget, step=0)
        torch.testing.assert_close(palette_fast_step(_setup(base_net, "ours"), batch, is_forget, 0).loss, expected,
                                   **LOSS_TOL)
    batch, _ = _batch(3)
    all_forget = torch.ones(3, dtype=torch.bool)  # RETAIN LABEL without retain rows: random targets, finite
    out = palette_fast_step(_setup(base_net, "retain_label"), batch, all_forget, 0)
    assert math.isfinite(out.loss.item()) and out.retain.item() == 0.0


def _run_pair(base_net, approach, sgd: bool):
    ref, fast = _setup(base_net, approach, fast=False), _setup(base_net, approach)
    if sgd:  # plain SGD passes rounding noise through unamplified (see the module docstring)
        for s in (ref, fast):
            s.optimizer = torch.optim.SGD(s.network.denoise_fn.parameters(), lr=1e-2)
    for step in range(3):
        batch, is_forget = _batch(seed=10 + step)
        a = palette_reference_step(ref, batch, is_forget, step)
        b = palette_fast_step(fast, batch, is_forget, step)
        torch.testing.assert_close(b.loss, a.loss, **LOSS_TOL)
    return ref, fast


@pytest.mark.parametrize("approach", APPROACHES)
def test_reference_and_fast_trajectories_agree(base_net, approach):
    ref, fast = _run_pair(base_net, approach, sgd=True)
    assert max_param_diff(ref.network.denoise_fn, fast.network.denoise_fn) <= 1e-6
    assert max_param_diff(ref.ema.module, fast.ema.module) <= 1e-6
    assert max_param_diff(ref.network.denoise_fn, base_net.denoise_fn) > 1e-5  # it did train


def test_reference_and_fast_trajectories_agree_with_adam(base_net):
    """With Adam, elements whose true gradient is zero (the conv bias before a one-channel GroupNorm group, the
    key part of the qkv bias) take ±lr steps from rounding noise; every other element agrees."""
    ref, fast = _run_pair(base_net, "ours", sgd=False)
    fp = dict(fast.network.denoise_fn.named_parameters())
    diffs = torch.cat([(p - fp[n]).abs().flatten() for n, p in ref.network.denoise_fn.named_parameters()])
    assert diffs.max() <= 3 * 1e-4 + 1e-6  # at most one lr per step
    assert (diffs > 1e-6).float().mean() < 1e-3


@pytest.mark.parametrize("approach", APPROACHES)
def test_what_each_approach_trains(base_net, approach):
    setup = _setup(base_net, approach, lr=1e-3)
    batch, is_forget = _batch()
    palette_fast_step(setup, batch, is_forget, 0)
    before = dict(base_net.named_parameters())
    changed = {n for n, p in setup.network.named_parameters()
               if n.startswith("denoise_fn.") and not torch.equal(p, before[n])}
    encoder = set(setup.network.encoder_parameter_names())
    decoder = {n for n, _ in setup.network.denoise_fn.named_parameters(prefix="denoise_fn")} - encoder
    assert changed <= encoder | decoder and changed & encoder
    if approach in ENCODER_ONLY:
        assert not changed & decoder  # Ours / RANDOM ENCODER: the decoder is untouched, bit for bit
    else:
        assert {n for n in decoder if n.startswith(("denoise_fn.output_blocks.", "denoise_fn.out."))} & changed
    assert setup.network.has_teacher == (approach in WITH_TEACHER)
    if setup.network.has_teacher:  # frozen, eval, not in the optimizer, equal to the model before unlearning
        t = setup.network.teacher_denoise_fn
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        assert max_param_diff(t, base_net.denoise_fn) == 0.0
    n_opt = sum(len(g["params"]) for g in setup.optimizer.param_groups)
    assert n_opt == len(list(setup.network.denoise_fn.parameters()))  # the reference's Adam: all denoise_fn params


def test_ema_update_formula_and_layout(base_net):
    setup = _setup(base_net, "ours", lr=1e-3, ema_decay=0.5)
    p0 = {n: p.detach().clone() for n, p in setup.network.denoise_fn.named_parameters()}
    snaps = []
    for step in range(2):
        batch, is_forget = _batch(seed=20 + step)
        palette_fast_step(setup, batch, is_forget, step)
        snaps.append({n: p.detach().clone() for n, p in setup.network.denoise_fn.named_parameters()})
    ema = dict(setup.ema.module.named_parameters())
    for n in p0:
        expected = 0.5 * (0.5 * p0[n] + 0.5 * snaps[0][n]) + 0.5 * snaps[1][n]
        torch.testing.assert_close(ema[n], expected, rtol=1e-6, atol=1e-7)
    enc = next(n for n in p0 if n.startswith("input_blocks."))
    assert not torch.equal(ema[enc], p0[enc]) and not torch.equal(ema[enc], snaps[1][enc])
    state = setup.ema.state_dict()
    assert list(state) == [f"denoise_fn.{k}" for k in setup.network.denoise_fn.state_dict()]
    assert all(v.device.type == "cpu" for v in state.values())
    # the in-place foreach update equals the reference's allocating loop
    a = PaletteEMA(base_net.denoise_fn, 0.9)
    b = PaletteEMA(base_net.denoise_fn, 0.9)
    for m in (a, b):
        m.module.requires_grad_(False)
        for p in m.module.parameters():
            p.data.mul_(0.5)
    a.update()
    b.update_reference()
    assert max_param_diff(a.module, b.module) <= 1e-6
    with pytest.raises(ValueError, match="ema_decay"):
        PaletteEMA(base_net.denoise_fn, 1.5)


def test_flag_table_and_bad_combinations():
    assert approach_from_flags(fix_decoder=1) == "ours"
    assert approach_from_flags(fix_decoder=1, learn_noise=1) == "random_encoder"
    assert approach_from_flags(learn_others=1) == "retain_label"
    assert approach_from_flags(learn_noise=1) == "noisy_label"
    assert approach_from_flags() == "noisy_label"  # the reference runs the same branch
    assert approach_from_flags(max_loss=1) == "max_loss"
    for bad in (dict(fix_decoder=1, max_loss=1), dict(max_loss=1, learn_noise=1), dict(learn_others=1, fix_decoder=1),
                dict(learn_others=1, max_loss=1)):
        with pytest.raises(ValueError, match="unsupported flag combination"):
            approach_from_flags(**bad)
    with pytest.raises(ValueError, match="--max_loss must be 0 or 1"):
        approach_from_flags(max_loss=2)


@pytest.mark.parametrize("approach", ["ours", "max_loss"])
def test_bf16_opt_in_stays_close_to_fp32(base_net, approach):
    """bf16 autocast (opt-in): the loss within bf16 rounding of the fp32 loss (rtol 2e-2), fp32 weights."""
    batch, is_forget = _batch()
    fp32 = palette_fast_step(_setup(base_net, approach), batch, is_forget, 2)
    setup = build_palette_setup(copy.deepcopy(base_net), "cpu", approach, forget_alpha=ALPHA, seed=3,
                                precision="bf16")
    bf16 = palette_fast_step(setup, batch, is_forget, 2)
    assert bf16.loss.dtype == torch.float32
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=2e-2, atol=1e-4)
    assert all(p.dtype == torch.float32 for p in setup.network.parameters())
    assert max_param_diff(setup.network.denoise_fn, base_net.denoise_fn) > 0


def test_setup_rejects_bad_input(base_net):
    with pytest.raises(ValueError, match="unknown Palette precision"):
        build_palette_setup(copy.deepcopy(base_net), "cpu", "ours", precision="fp16")
    with pytest.raises(ValueError, match="unknown Palette approach"):
        build_palette_setup(copy.deepcopy(base_net), "cpu", "ours_v2")
    with pytest.raises(ValueError, match="forget_alpha"):
        build_palette_setup(copy.deepcopy(base_net), "cpu", "ours", forget_alpha=float("nan"))
    with pytest.raises(TypeError, match="Palette Network"):
        build_palette_setup(torch.nn.Linear(2, 2), "cpu", "ours")


def test_non_finite_loss_stops(base_net, tmp_path):
    setup = _setup(base_net, "ours")
    batch, is_forget = _batch()
    bad = PaletteBatch(batch.gt * float("nan"), batch.mask, batch.y_cond)
    with pytest.raises(NonFiniteLossError, match="step 0"):
        palette_reference_step(_setup(base_net, "ours", fast=False), bad, is_forget, 0)

    def batches(epoch):  # epoch 1 fine, epoch 2 NaN
        for _ in range(2):
            b = batch if epoch == 1 else bad
            yield {"gt_image": b.gt, "cond_image": b.y_cond, "mask": b.mask}, torch.where(is_forget, -1.0, 1.0)
    with pytest.raises(NonFiniteLossError, match="epoch 2"):
        palette_train_loop(setup, batches, 2, n_epoch=3, run_dir=str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["1.state", "1_Network.pth", "1_Network_ema.pth"]


def test_train_loop_runs_exactly_n_epoch_and_writes_reference_files(base_net, tmp_path):
    setup = _setup(base_net, "ours")
    batch, is_forget = _batch(4, forget=(True, False, True, False))
    labels = torch.where(is_forget, -1.0, 1.0).double()  # float64, as the DataLoader collates the reference's floats
    seen = []

    def batches(epoch):
        seen.append(epoch)
        for _ in range(5):  # more batches than steps_per_epoch: the loop stops at 3
            yield {"gt_image": batch.gt, "cond_image": batch.y_cond, "mask": batch.mask, "path": ["x"] * 4}, labels
    history = palette_train_loop(setup, batches, 3, n_epoch=2, run_dir=str(tmp_path), progress=False,
                                 readback_every=2, log_iter=8)
    assert seen == [1, 2] and [h["epoch"] for h in history] == [1, 2] and history[-1]["iters"] == 24
    ckpt = tmp_path / "checkpoint"
    assert sorted(os.listdir(ckpt)) == sorted(f"{e}{s}" for e in (1, 2) for s in ("_Network.pth", "_Network_ema.pth",
                                                                                  ".state"))
    net = torch.load(ckpt / "2_Network.pth", weights_only=True)
    assert list(net) == list(setup.network.state_dict())  # buffers, denoise_fn.*, teacher_denoise_fn.*
    assert list(net)[0] == "gammas" and any(k.startswith("teacher_denoise_fn.") for k in net)
    ema = torch.load(ckpt / "2_Network_ema.pth", weights_only=True)
    assert set(ema) == {k for k in net if k.startswith("denoise_fn.")}
    state = torch.load(ckpt / "2.state", weights_only=True)
    assert set(state) == {"epoch", "iter", "schedulers", "optimizers"}
    assert state["epoch"] == 2 and state["iter"] == 24 and state["schedulers"] == [] and len(state["optimizers"]) == 1
    assert state["optimizers"][0]["param_groups"][0]["lr"] == 1e-4
    log = (tmp_path / "train.log").read_text().splitlines()
    assert sum("train/mse_loss: " in x for x in log) >= 2 and any(x.endswith("INFO: epoch: 2\t") for x in log)
    assert not any("epoch: 3" in x for x in log) and log[-1].endswith("Number of Epochs has reached the limit, End.")
    mean = float(next(x for x in log if "train/mse_loss" in x).split("train/mse_loss: ")[1])
    assert math.isfinite(mean) and mean > 0


def test_train_loop_reads_back_a_short_epoch(base_net):
    """An epoch with fewer batches than steps_per_epoch: its losses are still read back and averaged."""
    batch, is_forget = _batch(4, forget=(True, False, True, False))
    labels = torch.where(is_forget, -1.0, 1.0)
    twin = _setup(base_net, "ours")
    expected = sum(palette_fast_step(twin, batch, is_forget, s).loss.item() for s in (0, 1)) / 2

    def batches(epoch):
        for _ in range(2):
            yield {"gt_image": batch.gt, "cond_image": batch.y_cond, "mask": batch.mask}, labels
    history = palette_train_loop(_setup(base_net, "ours"), batches, 5, n_epoch=1, progress=False, readback_every=20)
    assert history[0]["iters"] == 8
    assert history[0]["train/mse_loss"] == pytest.approx(expected, rel=1e-6)


def test_run_dir_name():
    assert (palette_run_dir_name("train_inpainting_places2", 0, 1, 0.1, 0, 0, stamp="240101_120000")
            == "train_inpainting_places2_learn_others_0_fixdecoder_1_falpha_0.1_240101_120000_min_loss_learn_noise_0")
    assert palette_run_dir_name("train_x", 0, 0, 0.25, 1, 0, stamp="s").endswith("_s_max_loss_learn_noise_0")
