"""One unlearning run against a plain-PyTorch restatement of the official trainer (REFERENCE.md §1.2-§1.5).

The restatement below follows ``engine_unlearn.train_one_epoch`` + ``main_unlearn.py`` + timm 0.3.2
``add_weight_decay`` + ``NativeScalerWithGradNormCount`` step by step, with nothing from unlearn_fast except
the model's own forward passes and the per-step seeded draws (the §11 deviation: no wall-clock reseed):

- each epoch begins with ``optimizer.zero_grad()``;
- lr set when ``it % accum_iter == 0`` at fractional epoch ``it / len + epoch`` (warmup, then half-cosine);
- loss = ra·(1/B)Σ(1+s)m + fa·(1/B)Σ(1-s)f; ``loss.item()`` must be finite; ``(loss / accum_iter).backward()``;
- when ``(it + 1) % accum_iter == 0``: clip the global L2 norm (if ``grad_clip`` is not None) -> AdamW step
  -> ``zero_grad()``;
- log.txt: global averages per epoch of ``optimizer.param_groups[0]["lr"]`` (read after the step) and of the
  three losses (``loss`` before the division by accum_iter).

Tolerance: the trainer's loss kernel and the restatement reduce in different orders, and AdamW turns tiny
gradient differences into ~lr-sized ones where a gradient is near 0 (at θ = θ0 the retain gradient is
exactly 0). The teacher is therefore a slightly perturbed copy of the student, so the gradients are far from
0, and weights must agree to 2e-6 after the run; one missing, extra or mis-scheduled update moves weights by
~lr = 1e-3, and one mis-set lr by ≥ 1e-4. The key third of each ``qkv.bias`` is left out of the comparison:
softmax is invariant to it, so its true gradient is always 0 and AdamW normalises pure rounding noise there.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.helpers import labelled_batches, max_param_diff
from unlearn_fast.ops import sample_batch_noise_reference
from unlearn_fast.train import step_reference
from unlearn_fast.train.lr_schedule import base_lr, effective_batch_size, lr_at
from unlearn_fast.train.optimizer import param_groups_weight_decay
from unlearn_fast.train.seeding import seed_step_globals, step_generator
from unlearn_fast.train.step_reference import NonFiniteLossError, optimizer_update, reference_step
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup, make_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

LR = 1e-3
WEIGHT_TOL = 2e-6
LOG_RTOL = 1e-5
LOG_KEYS = ("train_lr", "train_retain_l2_loss", "train_forget_l2_loss", "train_loss")


# ---- the restatement ------------------------------------------------------------------------------------

def ref_lr(e, lr, min_lr, warmup, epochs):
    """util/lr_sched.adjust_learning_rate."""
    if e < warmup:
        return lr * e / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))


def timm_032_add_weight_decay(named, weight_decay):
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if len(p.shape) == 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class PlainAdamW:
    """torch.optim.AdamW's update written out (fp32, betas (0.9, 0.95), eps 1e-8); params without grad skipped."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8):
        self.param_groups = [dict(g, lr=lr) for g in groups]
        self.b1, self.b2, self.eps, self.state = betas[0], betas[1], eps, {}

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                st["t"] += 1
                t, grad = st["t"], p.grad
                p.mul_(1 - g["lr"] * g["weight_decay"])
                st["m"].mul_(self.b1).add_(grad, alpha=1 - self.b1)
                st["v"].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
                denom = (st["v"].sqrt() / math.sqrt(1 - self.b2 ** t)).add_(self.eps)
                p.addcdiv_(st["m"], denom, value=-g["lr"] / (1 - self.b1 ** t))

    def zero_grad(self):  # torch 1.13's default: grads become zeros, not None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.zero_()


@torch.no_grad()
def plain_clip_(params, max_norm):
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    coef = min(max_norm / (total.item() + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)


def plain_loss(latent, guide, mis_guide, labels, retain_alpha, forget_alpha):
    s = torch.where(labels < 100, -1.0, 1.0)
    m = ((latent - guide) ** 2).mean(dim=(1, 2)) * (1.0 + s)
    f = ((latent - mis_guide) ** 2).mean(dim=(1, 2)) * (1.0 - s)
    r_loss, f_loss = m.mean(), f.mean()
    return retain_alpha * r_loss + forget_alpha * f_loss, r_loss, f_loss


def plain_reference_run(student, teacher, data, steps, *, epochs, lr, min_lr=0.0, warmup=0.0, accum=1,
                        grad_clip=3.0, weight_decay=0.05, retain_alpha=1.0, forget_alpha=0.0, seed=0,
                        noise_type="normal"):
    """``data[epoch]``: list of (images, labels ±100). Returns the per-epoch log lines."""
    enc = set(student.encoder_parameter_names())
    for n, p in student.named_parameters():
        p.requires_grad_(n in enc)
    student.train()
    opt = PlainAdamW(timm_032_add_weight_decay(list(student.named_parameters()), weight_decay), lr)
    logs = []
    for epoch in range(epochs):
        opt.zero_grad()
        seen = {k: [] for k in LOG_KEYS}
        for it, (images, labels) in enumerate(data[epoch][:steps]):
            step = epoch * steps + it
            if it % accum == 0:
                for g in opt.param_groups:
                    g["lr"] = ref_lr(it / steps + epoch, lr, min_lr, warmup, epochs)
            seed_step_globals(seed, 0, step)  # the §11 seeding instead of the wall clock
            task = student.sample_task(images, step_generator(seed, 0, step, "task", "cpu"))
            noise = sample_batch_noise_reference(images, noise_type,
                                                 generator=step_generator(seed, 0, step, "noise", "cpu"))
            latent = student.forward_encoder_task(student.prepare_inputs(images), task)
            with torch.no_grad():
                guide = teacher.forward_encoder_task(teacher.prepare_inputs(images), task)
                mis_guide = teacher.forward_encoder_task(teacher.prepare_inputs(noise), task)
            loss, r_loss, f_loss = plain_loss(latent, guide, mis_guide, labels, retain_alpha, forget_alpha)
            loss_value = loss.item()
            assert math.isfinite(loss_value)
            (loss / accum).backward()
            if (it + 1) % accum == 0:
                if grad_clip is not None:
                    plain_clip_(student.parameters(), grad_clip)
                opt.step()
                opt.zero_grad()
            for k, v in zip(LOG_KEYS, (opt.param_groups[0]["lr"], r_loss.item(), f_loss.item(), loss_value)):
                seen[k].append(v)
        logs.append({k: sum(v) / len(v) for k, v in seen.items()})
    return logs


# ---- helpers --------------------------------------------------------------------------------------------

def _perturbed_teacher(model):
    """A frozen copy 1e-2 away from the student, so no gradient starts at exactly 0 (see the docstring)."""
    teacher = make_teacher(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    return teacher


def _run_both(make_mae_micro, data, steps, *, epochs, accum=1, warmup=0.0, min_lr=0.0, grad_clip=3.0,
              forget_alpha=0.5, step_mode="reference"):
    model = make_mae_micro()
    teacher = _perturbed_teacher(model)
    plain_student = copy.deepcopy(model)
    expected = plain_reference_run(plain_student, teacher, data, steps, epochs=epochs, lr=LR, min_lr=min_lr,
                                   warmup=warmup, accum=accum, grad_clip=grad_clip, forget_alpha=forget_alpha)
    setup = build_setup(copy.deepcopy(model), "cpu", lr=LR, precision="fp32", forget_alpha=forget_alpha,
                        grad_clip=grad_clip, accum_iter=accum, teacher=copy.deepcopy(teacher))
    got = train_loop(setup, lambda e: iter(data[e]), steps, epochs=epochs, lr=LR, min_lr=min_lr,
                     warmup_epochs=warmup, step_mode=step_mode, progress=False, readback_every=1)
    return setup, plain_student, model, expected, got


def _weight_diff(a, b):
    """max |a - b| over the parameters, without the key bias (gradient identically 0, see the docstring)."""
    worst = 0.0
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m
        d = (p.detach().double() - q.detach().double()).abs()
        if n.endswith("attn.qkv.bias"):
            third = d.shape[0] // 3
            d = torch.cat([d[:third], d[2 * third:]])
        worst = max(worst, d.max().item())
    return worst


def _assert_same_run(setup, plain_student, model, expected, got, keys=LOG_KEYS):
    moved = _weight_diff(plain_student, model)
    assert moved > 1e-4, "the restated run did not train: the comparison would be vacuous"
    diff = _weight_diff(setup.student, plain_student)
    assert diff <= WEIGHT_TOL, f"weights differ from the restated reference by {diff:.3g} (movement {moved:.3g})"
    for e, (g, x) in enumerate(zip(got, expected)):
        for k in keys:
            assert g[k] == pytest.approx(x[k], rel=LOG_RTOL, abs=1e-12), f"epoch {e} {k}: {g[k]} vs {x[k]}"


MIX = [[100.0, -100.0, 100.0, -100.0, -100.0]]


# ---- the run against the restatement --------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(epochs=2, steps=3, warmup=1),                              # warmup: the first update at lr 0
    dict(epochs=2, steps=4, accum=2, warmup=1),                     # windows that divide the epoch
    dict(epochs=2, steps=3, warmup=2),                              # epochs == warmup_epochs: all warmup
    dict(epochs=2, steps=3, warmup=0, min_lr=2e-4),                 # no warmup; cosine to min_lr
    dict(epochs=1, steps=4, grad_clip=1e-3),                        # clipping active on every step
    dict(epochs=1, steps=4, grad_clip=None),                        # no clipping at all
    dict(epochs=1, steps=4, forget_alpha=0.0),                      # the default: retain term only
    dict(epochs=1, steps=4, labels=[[-100.0] * 3, [100.0] * 3]),    # all-forget and all-retain batches
    dict(epochs=2, steps=2, accum=2, warmup=0.5, labels=[[-100.0], [100.0]]),  # batch of 1
], ids=["warmup", "accum2", "warmup==epochs", "min_lr", "clip", "no_clip", "fa0", "one_kind", "batch1"])
def test_reference_step_run_matches_the_restatement(make_mae_micro, case):
    case = dict(case)
    data = labelled_batches(case["epochs"], case["steps"], case.pop("labels", MIX))
    steps = case.pop("steps")
    _assert_same_run(*_run_both(make_mae_micro, data, steps, **case), keys=LOG_KEYS)


def test_fast_step_run_matches_the_restatement(make_mae_micro):
    data = labelled_batches(2, 4, MIX)
    _assert_same_run(*_run_both(make_mae_micro, data, 4, epochs=2, accum=2, warmup=1, step_mode="fast"),
                     keys=LOG_KEYS[1:])


# Accumulation at the epoch's end and the logged lr, as the reference's train_one_epoch.

def test_partial_accumulation_window_is_dropped_at_the_epoch_end(make_mae_micro):
    data = labelled_batches(3, 3, MIX)  # 3 micro-steps, accum 2: the 3rd of each epoch never updates
    _assert_same_run(*_run_both(make_mae_micro, data, 3, epochs=3, accum=2, warmup=1), keys=LOG_KEYS[1:])


def test_logged_lr_is_the_optimizer_lr_of_each_micro_step(make_mae_micro):
    data = labelled_batches(2, 4, MIX)
    setup, plain, model, expected, got = _run_both(make_mae_micro, data, 4, epochs=2, accum=2, warmup=1)
    assert _weight_diff(setup.student, plain) <= WEIGHT_TOL  # the updates themselves agree
    for g, x in zip(got, expected):
        assert g["train_lr"] == pytest.approx(x["train_lr"], rel=1e-12)


def test_accum_iter_beyond_the_epoch_never_updates(make_mae_micro):
    data = labelled_batches(2, 2, MIX)
    setup, plain, model, expected, got = _run_both(make_mae_micro, data, 2, epochs=2, accum=5, warmup=1)
    assert max_param_diff(setup.student, model) == 0.0 and max_param_diff(plain, model) == 0.0
    for g, x in zip(got, expected):
        assert g["train_lr"] == pytest.approx(x["train_lr"], rel=1e-12)


# ---- forget_alpha 0: the forget term changes nothing ----------------------------------------------------

@pytest.mark.parametrize("step_mode", ["reference", "fast"])
def test_forget_alpha_zero_makes_the_noise_irrelevant(make_mae_micro, step_mode):
    """With the default forget_alpha 0 the weights and the retain loss are bitwise those of any other noise
    input: the forget term adds exactly nothing to the gradient, and its draws disturb no other draw."""
    model = make_mae_micro()
    teacher = _perturbed_teacher(model)
    data = labelled_batches(1, 3, MIX)
    runs = []
    for noise_type in ("normal", "uniform", "constant"):
        setup = build_setup(copy.deepcopy(model), "cpu", lr=LR, precision="fp32", forget_alpha=0.0,
                            noise_type=noise_type, teacher=copy.deepcopy(teacher))
        hist = train_loop(setup, lambda e: iter(data[e]), 3, epochs=1, lr=LR, step_mode=step_mode, progress=False)
        runs.append((setup.student, hist[0]))
    assert max_param_diff(runs[0][0], model) > 1e-4
    for student, hist in runs[1:]:
        assert max_param_diff(student, runs[0][0]) == 0.0
        assert hist["train_loss"] == runs[0][1]["train_loss"] == hist["train_retain_l2_loss"]
    assert runs[1][1]["train_forget_l2_loss"] != runs[0][1]["train_forget_l2_loss"]  # still computed and logged


def test_forget_alpha_zero_still_stops_on_a_non_finite_forget_term(make_mae_micro, monkeypatch):
    """0 · NaN = NaN: the reference's loss.item() check stops the run even with forget_alpha 0."""
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.0)
    monkeypatch.setattr(step_reference, "sample_batch_noise",
                        lambda images, *a, **k: torch.full_like(images, float("nan")))
    before = {n: p.detach().clone() for n, p in setup.student.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        reference_step(setup, torch.rand(2, 3, 32, 32), torch.tensor([True, False]), 3)
    assert all(torch.equal(p, before[n]) for n, p in setup.student.named_parameters())
    assert all(p.grad is None for p in setup.trainable)  # stopped before backward, as the reference


# ---- lr schedule, lr scaling ----------------------------------------------------------------------------

@pytest.mark.parametrize("warmup,epochs,min_lr", [(5, 6, 0.0), (0, 3, 0.0), (2, 4, 1e-5), (3, 3, 0.0),
                                                  (0.5, 2, 1e-4), (4, 3, 0.0)])
def test_lr_at_equals_the_reference_formula_per_iteration(warmup, epochs, min_lr):
    steps = 7
    for e in range(epochs):
        for it in range(steps):
            x = it / steps + e
            assert lr_at(x, 1e-3, min_lr, warmup, epochs) == pytest.approx(ref_lr(x, 1e-3, min_lr, warmup, epochs),
                                                                           rel=1e-12, abs=1e-20)
    if warmup > 0:
        assert lr_at(0.0, 1e-3, min_lr, warmup, epochs) == 0.0  # the first update runs at lr 0


def test_lr_from_blr_uses_the_effective_batch():
    # main_unlearn.py: eff = batch_size * accum_iter * world_size; lr = blr * eff / 256 unless --lr is given
    for batch, accum, world in [(32, 1, 4), (7, 3, 1), (1, 1, 1), (16, 5, 3)]:
        eff = effective_batch_size(batch, accum, world)
        assert eff == batch * accum * world
        assert base_lr(None, 1e-4, eff) == pytest.approx(1e-4 * eff / 256, rel=1e-15)
        assert base_lr(2e-4, 1e-4, eff) == 2e-4


# ---- optimizer groups (timm 0.3.2) ----------------------------------------------------------------------

class _Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.scalar = nn.Parameter(torch.ones(()))         # 0-d: len(shape) == 0, so timm 0.3.2 DOES decay it
        self.vec = nn.Parameter(torch.ones(4))              # 1-D: no decay
        self.head = nn.Module()
        self.head.bias = nn.Parameter(torch.ones(3, 2))     # 2-D but named .bias: no decay
        self.table = nn.Parameter(torch.ones(1, 1, 4))      # 3-D token: decays
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def test_weight_decay_groups_follow_timm_0_3_2_including_0d_params():
    m = _Shapes()
    ours = param_groups_weight_decay(m.named_parameters(), 0.05)
    ref = timm_032_add_weight_decay(m.named_parameters(), 0.05)
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in ref] == [0.0, 0.05]
    for a, b in zip(ours, ref):  # same members in the same order: official optimizer state indices line up
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    assert any(p is m.scalar for p in ours[1]["params"])


def test_weight_decay_groups_on_the_models(make_mae_micro):
    from unlearn_fast.models import create_model
    for model in (make_mae_micro(), create_model("mage_micro")):
        named = list(model.named_parameters())
        ours, ref = param_groups_weight_decay(named, 0.05), timm_032_add_weight_decay(named, 0.05)
        assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in ref]


# ---- loss scaling, clipping, skipped steps --------------------------------------------------------------

def test_optimizer_update_unscales_before_clipping_and_skips_inf_steps(make_mae_micro):
    """NativeScalerWithGradNormCount: unscale_ -> clip 3.0 on the true gradients -> step (skipped on inf) ->
    update (backoff 0.5; GradScaler defaults: init 2^16, growth 2 every 2000 good steps)."""
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", grad_clip=3.0)
    setup.scaler = torch.amp.GradScaler("cpu")  # the defaults the reference's scaler uses
    assert setup.scaler.get_scale() == 2.0 ** 16
    assert setup.scaler.get_growth_factor() == 2.0 and setup.scaler.get_backoff_factor() == 0.5
    assert setup.scaler.get_growth_interval() == 2000
    # a finite step: the scaled gradients are unscaled first, then clipped to norm 3.0
    true_grads = [torch.full_like(p, 0.1) for p in setup.trainable]
    setup.scaler.scale(sum((p * g).sum() for p, g in zip(setup.trainable, true_grads))).backward()
    assert setup.trainable[0].grad[0].max().item() == pytest.approx(0.1 * 2.0 ** 16)  # scaled
    seen = []
    real_step = setup.optimizer.step
    setup.optimizer.step = lambda *a, **k: (seen.append(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in setup.trainable])).item()), real_step(*a, **k))[1]
    true_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in true_grads])).item()
    assert true_norm > 3.0
    optimizer_update(setup)
    assert seen == [pytest.approx(3.0, rel=1e-4)]  # fp32 norm over ~0.4 M elements
    assert setup.scaler.get_scale() == 2.0 ** 16 and all(p.grad is None for p in setup.trainable)
    # an inf gradient: no step, weights unchanged, scale halves, grads cleared
    before = [p.detach().clone() for p in setup.trainable]
    setup.scaler.scale(sum(p.sum() for p in setup.trainable)).backward()
    setup.trainable[0].grad[0] = float("inf")
    optimizer_update(setup)
    assert len(seen) == 1  # the optimizer's step() ran its skip path in the scaler, never the update
    assert all(torch.equal(p, b) for p, b in zip(setup.trainable, before))
    assert setup.scaler.get_scale() == 2.0 ** 15 and all(p.grad is None for p in setup.trainable)


# ---- steps per epoch with several ranks (DistributedSampler + DataLoader(drop_last=True)) ---------------

@pytest.mark.parametrize("n,batch_size,world_size", [(99, 10, 2), (13, 1, 2), (7, 4, 2), (50, 4, 3), (64, 8, 4),
                                                     (31, 5, 1), (23, 3, 8)])
def test_reference_shuffle_pad_to_world_counts_steps_as_the_reference(n, batch_size, world_size):
    from torch.utils.data import DataLoader, DistributedSampler

    from unlearn_fast.train.balanced_sampler import ReferenceShuffleBatchSampler
    data = list(range(n))
    ref_steps = len(DataLoader(data, batch_size=batch_size, drop_last=True,
                               sampler=DistributedSampler(data, num_replicas=world_size, rank=0, shuffle=True)))
    if ref_steps == 0:
        with pytest.raises(ValueError, match="a batch larger than the data"):
            ReferenceShuffleBatchSampler(n, batch_size, world_size=world_size, pad_to_world=True)
        return
    per_rank = [list(ReferenceShuffleBatchSampler(n, batch_size, seed=3, rank=r, world_size=world_size,
                                                  pad_to_world=True)) for r in range(world_size)]
    assert all(len(b) == ref_steps for b in per_rank)
    assert all(len(batch) == batch_size for b in per_rank for batch in b)
    rows = [i for step in range(ref_steps) for r in range(world_size) for i in per_rank[r][step]]
    assert set(rows) <= set(data)
    assert len(set(rows)) == min(len(rows), n)  # rows repeat only as padding, once every row is used
    plain = ReferenceShuffleBatchSampler(n, batch_size, world_size=world_size, drop_last=True) \
        if n >= batch_size * world_size else None
    if plain is not None:  # the default count is N // (world * batch): equal or one step fewer
        assert ref_steps - plain.steps_per_epoch in (0, 1)
