"""The Palette epoch loop against an independent restatement of the official loop (REFERENCE.md §3.2–§3.4:
``Network.forward``, ``Palette.unlearn_step``, ``BaseModel.unlearn``, ``LogTracker``, ``EMA``), on palette_micro
(16², CPU, fp32), fixed batches with hybrid and centre masks, every approach.

The restatement is written from the reference's text, not from unlearn_fast: it draws t, γ, ε from the same
per-step generator (seeded randomness is a §11 decision) and otherwise computes as the official code does —
``y_noisy`` by its (1±s) formula, the masked-copy MSEs, ``loss += …`` over the 13 (here 5) maps, the EMA when
``iter > ema_start and iter % ema_iter == 0`` over every parameter, a ``train/mse_loss`` line (the epoch's running
mean of ``loss.item()``) when ``iter % log_iter == 0``, then ``train/mse_loss``, ``epoch``, ``iters`` per epoch.
The EMA starts from the loaded weights (unlearn_fast's documented choice; the reference's starts from the
random initialisation).

Tolerances (fp32): log values rtol 1e-5 (the reference's teacher input for forget rows is ε up to one ulp,
unlearn_fast's is exactly ε; the fused loss sums in another order). With SGD the weights and the EMA agree to
2e-6. With Adam, elements whose true gradient is zero (a conv bias before a one-channel GroupNorm group, the key
bias of qkv) take ±lr steps from rounding noise, so the check counts the elements that differ (< 0.1 %) and
compares the Adam state's keys, steps and hyperparameters exactly.
"""
from __future__ import annotations

import copy
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import max_param_diff
from unlearn_fast.models import create_model
from unlearn_fast.models.palette import make_beta_schedule, schedule_buffers
from unlearn_fast.models.palette_masks import center_mask, hybrid_mask
from unlearn_fast.train.palette_steps import build_palette_setup
from unlearn_fast.train.palette_trainer import palette_train_loop
from unlearn_fast.train.seeding import seed_step_globals, step_generator

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SEED, SIZE, ALPHA = 7, 16, 0.3
FLAGS = {"ours": (1, 0, 0, 0), "random_encoder": (1, 0, 1, 0), "retain_label": (0, 0, 0, 1),
         "noisy_label": (0, 0, 1, 0), "max_loss": (0, 1, 0, 0)}  # fix_decoder, max_loss, learn_noise, learn_others
LOG_RTOL = 1e-5


@pytest.fixture(scope="module")
def base_net():
    torch.manual_seed(0)
    return create_model("palette_micro", unet=dict(image_size=SIZE))


def _batches(n_steps, bs, labels=None, seed=0):
    """Fixed batches as the DataLoader yields them: (sample dict, float64 labels ±1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_steps):
        gt = torch.rand(bs, 3, SIZE, SIZE, generator=g) * 2 - 1
        mask = torch.stack([hybrid_mask(100 * k + i, (SIZE, SIZE)) if (i + k) % 3 else center_mask((SIZE, SIZE))
                            for i in range(bs)])  # [bs, 1, H, W]
        y_cond = gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g)
        lab = (torch.tensor(labels[k % len(labels)]) if labels is not None
               else torch.where(torch.arange(bs) % 2 == k % 2, -1.0, 1.0))
        out.append(({"gt_image": gt, "cond_image": y_cond, "mask": mask, "path": [f"{k}_{i}" for i in range(bs)]},
                    lab.double()))
    return out


# ---- the restatement ---------------------------------------------------------------------------------------
class _OfficialNetwork:
    """``models/network.py`` Network.forward + weighted_mse_loss / weighted_others_loss, in words of §3.2–§3.3."""

    def __init__(self, net, approach, alpha):
        self.gammas = net.gammas.clone()
        self.denoise_fn = copy.deepcopy(net.denoise_fn).train()
        self.fix_decoder, self.max_loss, self.learn_noise, self.learn_others = FLAGS[approach]
        self.alpha = alpha
        if self.fix_decoder or self.learn_others:  # the teacher, made after loading (kept in eval: unlearn_fast)
            self.teacher = copy.deepcopy(self.denoise_fn).eval()

    def _wmse(self, t1, t2, l, use_noise=False, g=None, target_forget=None):
        r = F.mse_loss(t1 * (l + 1.0) * 0.5, t2 * (l + 1.0) * 0.5)
        if use_noise:
            t2 = torch.randn(t2.shape, generator=g) * torch.std(t2) + torch.mean(t2)
        if target_forget is not None:
            t2 = target_forget
        f = (1 - 2.0 * self.max_loss) * F.mse_loss(t1 * (1.0 - l) * 0.5, t2 * (1.0 - l) * 0.5)
        return r + self.alpha * f

    def loss(self, y_0, y_cond, mask, labels, step):
        b = y_0.shape[0]
        g = step_generator(SEED, 0, step, "task", "cpu")
        t = torch.randint(1, self.gammas.shape[0], (b,), generator=g)
        g1, g2 = self.gammas.gather(-1, t - 1).view(b, 1), self.gammas.gather(-1, t).view(b, 1)
        gam = ((g2 - g1) * torch.rand((b, 1), generator=g) + g1).view(b, -1)  # [b, 1]
        noise = torch.randn(y_0.shape, generator=g)
        sg, l = gam.view(-1, 1, 1, 1), labels[:, None, None, None]
        y_noisy = (sg.sqrt() * y_0 * (l + 1.0) * 0.5 + (1 - sg).sqrt() * noise
                   + (1 - (1 - sg).sqrt()) * noise * (1.0 - l) * 0.5)
        y_orig = sg.sqrt() * y_0 + (1 - sg).sqrt() * noise
        x_noisy = torch.cat([y_cond, y_noisy * mask + (1. - mask) * y_0], 1)
        x_orig = torch.cat([y_cond, y_orig * mask + (1. - mask) * y_0], 1)
        gb = step_generator(SEED, 0, step, "baseline", "cpu")
        if self.learn_others:
            with torch.no_grad():
                tf = self.teacher(x_orig, gam)
                idx = (labels > 0).nonzero().squeeze()
                n_retain = torch.sum((labels + 1.0) * 0.5).item()
                upd = (torch.tile(tf[idx], (math.ceil(b / n_retain), 1, 1, 1))[:b] if n_retain > 0
                       else torch.randn(tf.shape, generator=gb))
            return self._wmse(self.denoise_fn(x_orig, gam), tf, l, target_forget=upd)
        if self.fix_decoder:  # Ours (learn_noise 0) / RANDOM ENCODER (learn_noise 1)
            with torch.no_grad():
                tf = self.teacher(x_noisy, gam, return_feat=True)
            fs = self.denoise_fn(x_orig, gam, return_feat=True)
            loss = 0
            for a, c in zip(fs, tf):
                loss += self._wmse(a, c, l, use_noise=bool(self.learn_noise), g=gb)
            return loss
        x = x_orig if self.max_loss else x_noisy  # MAX LOSS: standard input; NOISY LABEL: forget rows pure noise
        return self._wmse(mask * noise, mask * self.denoise_fn(x, gam), l)


def _official_loop(net, approach, batches, steps, n_epoch, lr, decay, ema_start, ema_iter, log_iter, sgd):
    """``Palette.unlearn_step`` per epoch + ``BaseModel.unlearn``'s epoch lines (exactly n_epoch epochs, §11)."""
    on = _OfficialNetwork(net, approach, ALPHA)
    params = [p for p in on.denoise_fn.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if sgd else torch.optim.Adam(params, lr=lr, weight_decay=0)
    ema = copy.deepcopy(on.denoise_fn)
    it, lines = 0, []
    for epoch in range(1, n_epoch + 1):
        total, count = 0.0, 0  # LogTracker, reset every epoch
        for k in range(steps):
            step = (epoch - 1) * steps + k
            sample, labels = batches[step]
            seed_step_globals(SEED, 0, step)  # dropout
            opt.zero_grad()
            loss = on.loss(sample["gt_image"], sample["cond_image"], sample["mask"], labels.float(), step)
            loss.backward()
            opt.step()
            it += len(sample["path"])
            total, count = total + loss.item(), count + 1
            if it % log_iter == 0:
                lines.append(("train/mse_loss", total / count))
            if it > ema_start and it % ema_iter == 0:
                for p, e in zip(on.denoise_fn.parameters(), ema.parameters()):
                    e.data = e.data * decay + (1 - decay) * p.data
        lines += [("train/mse_loss", total / count), ("epoch", epoch), ("iters", it)]
    return on, ema, opt, lines


def _run_unlearn_fast(net, approach, batches, steps, n_epoch, lr, decay, ema_start, ema_iter, log_iter, sgd, mode,
                      run_dir):
    setup = build_palette_setup(copy.deepcopy(net), "cpu", approach, forget_alpha=ALPHA, lr=lr, ema_decay=decay,
                                seed=SEED, fast=mode == "fast")
    if sgd:
        setup.optimizer = torch.optim.SGD(setup.network.denoise_fn.parameters(), lr=lr)

    def epoch_batches(epoch):
        return iter(batches[(epoch - 1) * steps:epoch * steps])
    palette_train_loop(setup, epoch_batches, steps, n_epoch=n_epoch, run_dir=str(run_dir), step_mode=mode,
                       readback_every=2, progress=False, log_iter=log_iter, ema_start=ema_start, ema_iter=ema_iter)
    return setup


def _log_lines(run_dir):
    out = []
    for line in open(os.path.join(run_dir, "train.log")):
        m = re.fullmatch(r".* - INFO: (train/mse_loss|epoch|iters)\s*: (\S+)\t", line.rstrip("\n"))
        if m:
            out.append((m.group(1), float(m.group(2)) if m.group(1) == "train/mse_loss" else int(m.group(2))))
    return out


def _assert_same_lines(ours, official):
    assert [k for k, _ in ours] == [k for k, _ in official]
    for (key, a), (_, b) in zip(ours, official):
        if key == "train/mse_loss":
            assert a == pytest.approx(b, rel=LOG_RTOL), (ours, official)
        else:
            assert a == b


# ---- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approach,mode", [("ours", "reference"), ("ours", "fast"), ("random_encoder", "fast"),
                                           ("retain_label", "fast"), ("noisy_label", "reference"),
                                           ("max_loss", "fast")])
def test_loop_with_sgd_equals_the_official_loop(base_net, tmp_path, approach, mode):
    """Batch 3, log_iter 3 (a line after every step: every step's loss is checked through the running mean),
    ema_start 4 / ema_iter 6 (EMA after steps 2, 4 and 6 only), 2 epochs of 3 steps."""
    batches = _batches(6, 3)
    kw = dict(steps=3, n_epoch=2, lr=1e-2, decay=0.7, ema_start=4, ema_iter=6, log_iter=3, sgd=True)
    on, ema, _, lines = _official_loop(base_net, approach, batches, **kw)
    setup = _run_unlearn_fast(base_net, approach, batches, mode=mode, run_dir=tmp_path, **kw)
    _assert_same_lines(_log_lines(tmp_path), lines)
    assert len(lines) == 6 + 6
    assert max_param_diff(setup.network.denoise_fn, on.denoise_fn) <= 2e-6
    assert max_param_diff(setup.ema.module, ema) <= 2e-6
    assert max_param_diff(setup.network.denoise_fn, base_net.denoise_fn) > 1e-4  # it trained
    assert max_param_diff(setup.ema.module, base_net.denoise_fn) > 1e-5  # the EMA moved


def test_ema_skips_the_first_step_of_a_batch_of_one(base_net, tmp_path):
    """ema_start 1, ema_iter 1 (the reference config) with batch 1: iter = 1 after the first step is not > 1, so
    the first EMA update comes after step 2; all-forget and all-retain batches; dropout 0.1 in the student."""
    net = create_model("palette_micro", unet=dict(image_size=SIZE, dropout=0.1))
    net.load_state_dict(base_net.state_dict())
    batches = _batches(4, 1, labels=[[-1.0], [1.0]])
    kw = dict(steps=2, n_epoch=2, lr=1e-2, decay=0.5, ema_start=1, ema_iter=1, log_iter=2, sgd=True)
    on, ema, _, lines = _official_loop(net, "ours", batches, **kw)
    setup = _run_unlearn_fast(net, "ours", batches, mode="fast", run_dir=tmp_path, **kw)
    _assert_same_lines(_log_lines(tmp_path), lines)
    assert max_param_diff(setup.network.denoise_fn, on.denoise_fn) <= 2e-6
    assert max_param_diff(setup.ema.module, ema) <= 2e-6
    # 3 EMA updates, not 4: the encoder EMA is 0.5³ of the start plus the later weights
    one_more = copy.deepcopy(ema)
    for p, e in zip(on.denoise_fn.parameters(), one_more.parameters()):
        e.data = e.data * 0.5 + 0.5 * p.data
    assert max_param_diff(setup.ema.module, one_more) > 1e-4


@pytest.mark.parametrize("approach", ["ours", "retain_label"])
def test_loop_with_adam_equals_the_official_loop(base_net, tmp_path, approach):
    """Adam 1e-3 (the reference's optimizer over every denoise_fn parameter): moments only for the parameters the
    approach trains (the encoder for Ours), the same steps and hyperparameters; weights and EMA agree except on the
    zero-gradient elements."""
    batches = _batches(6, 3, labels=[[-1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])
    kw = dict(steps=3, n_epoch=2, lr=1e-3, decay=0.9, ema_start=1, ema_iter=1, log_iter=6, sgd=False)
    on, ema, opt, lines = _official_loop(base_net, approach, batches, **kw)
    setup = _run_unlearn_fast(base_net, approach, batches, mode="fast", run_dir=tmp_path, **kw)
    _assert_same_lines(_log_lines(tmp_path), lines)
    mine, theirs = setup.optimizer.state_dict(), opt.state_dict()
    assert sorted(mine["state"]) == sorted(theirs["state"])
    n_params = len(list(base_net.denoise_fn.parameters()))
    n_encoder = len(base_net.encoder_parameter_names())
    assert len(mine["state"]) == (n_encoder if approach == "ours" else n_params)
    assert all(int(mine["state"][i]["step"]) == int(theirs["state"][i]["step"]) == 6 for i in mine["state"])
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert mine["param_groups"][0][key] == theirs["param_groups"][0][key]
    for a, b in ((setup.network.denoise_fn, on.denoise_fn), (setup.ema.module, ema)):
        diff = torch.cat([(p - q).abs().flatten() for p, q in zip(a.parameters(), b.parameters())])
        assert diff.max() <= 6 * 1e-3 + 1e-6  # at most one lr per step, on the zero-gradient elements
        assert (diff > 1e-6).float().mean() < 1e-3


def test_noise_schedule_buffers_equal_numpy_restatement():
    """``set_new_noise_schedule``: np.linspace betas (float64), cumprod, the posterior terms, then float32."""
    for schedule, n, lo, hi in (("linear", 2000, 1e-6, 0.01), ("linear", 2000, 1e-4, 0.09), ("quad", 1000, 1e-6, 0.02),
                                ("linear", 10, 1e-4, 0.2), ("linear", 2, 0.1, 0.3)):
        betas = (np.linspace(lo, hi, n, dtype=np.float64) if schedule == "linear"
                 else np.linspace(lo ** 0.5, hi ** 0.5, n, dtype=np.float64) ** 2)
        gammas = np.cumprod(1.0 - betas)
        prev = np.append(1.0, gammas[:-1])
        post = betas * (1.0 - prev) / (1.0 - gammas)
        expected = dict(gammas=gammas, sqrt_recip_gammas=np.sqrt(1.0 / gammas),
                        sqrt_recipm1_gammas=np.sqrt(1.0 / gammas - 1),
                        posterior_log_variance_clipped=np.log(np.maximum(post, 1e-20)),
                        posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - gammas),
                        posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - gammas))
        got = schedule_buffers(make_beta_schedule(schedule, n, lo, hi))
        for k, v in expected.items():
            assert torch.equal(got[k], torch.tensor(v, dtype=torch.float32)), (schedule, n, k)
