"""The unlearning loop and the four baselines against an independent restatement of the official trainer.

The restatement below is written from REFERENCE.md §1.2-§1.7 and §2 (``engine_unlearn.train_one_epoch``,
``engine_baseline.train_one_epoch_*``, ``models_mage.forward_weighted_loss*``, ``main_*.py``), for MAGE and
MAE: it uses only the models' forward pieces and the per-step seeded draws of §11 (the one deliberate
deviation: no wall-clock reseed), and otherwise torch.optim.AdamW with timm 0.3.2's groups, the reference's
loss formulas (whole-batch denominators, the (1±s) factors, the (1+s) weighting of the forget term of
``encoder_noise`` / ``learn_others``), ONE student forward per step (both NOISY LABEL targets are scored
on the same logits, so on MAGE on the same embedding dropout), the per-iteration lr set every
``accum_iter`` micro-steps, clip 3.0, ``zero_grad`` at each epoch start (a partial accumulation window is
dropped) and ``log.txt`` as the global averages of the MetricLogger meters.

Tolerances (fp32 on the CPU): weights 2e-6 absolute after runs that move them by ~lr = 1e-3 (one
missing or mis-scheduled update moves them by ~1e-4 or more); log values 1e-5 relative; the lr of every
optimizer step exactly (the same float expression). The key third of each ``qkv.bias`` is left out of the
weight comparison: softmax is invariant to it, its true gradient is 0 and AdamW normalises rounding noise.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import labelled_batches, make_class_tree, save_random_pretrained
from unlearn_fast.models import create_model
from unlearn_fast.ops import sample_batch_noise_reference
from unlearn_fast.train.seeding import seed_step_globals, step_generator
from unlearn_fast.train.step_baseline import baseline_step
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup, make_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

LR, FA = 1e-3, 0.5
WEIGHT_TOL, LOG_RTOL = 2e-6, 1e-5
SEED = 0
MIX = [[100.0, -100.0, 100.0, -100.0, -100.0], [-100.0, 100.0, 100.0]]


# ---- the restatement ------------------------------------------------------------------------------------

def timm_032_groups(named, weight_decay):
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_sched(e, lr, min_lr, warmup, epochs):
    if e < warmup:
        return lr * e / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))


def l2_terms(latent, guide, mis_guide, labels, forget_on_retain_rows):
    s = torch.where(labels < 100, -1.0, 1.0)
    loss1 = ((latent.float() - guide.float()) ** 2).mean(dim=(1, 2)) * (1.0 + s)
    loss2 = ((latent.float() - mis_guide.float()) ** 2).mean(dim=(1, 2)) * ((1.0 + s) if forget_on_retain_rows
                                                                             else (1.0 - s))
    return loss1.mean(), loss2.mean()


def token_losses(model, out, target, task):
    """MAGE: LabelSmoothingCrossEntropy(0.1) over logits[:, 1:, :codebook], weight token_all_mask.
    MAE: pixel MSE per patch, weight = hidden patches."""
    if model.family == "mage":
        n, l = target.shape
        logp = F.log_softmax(out[:, 1:, :model.codebook_size].float().reshape(n * l, -1), dim=-1)
        nll = -logp.gather(-1, target.reshape(-1, 1)).squeeze(1)
        return (0.9 * nll + 0.1 * -logp.mean(-1)).reshape(n, l), task["token_all_mask"].float()
    _, mask, _ = model.mask_from_task(task)
    return ((out.float() - target.float()) ** 2).mean(-1), mask


def noisy_target(model, target, g):
    if model.family == "mage":  # round(clamp(randn * std(ids) + mean(ids), 0, 1023))
        t = target.float()
        z = torch.randn(target.shape, generator=g)
        return torch.round((z * t.std() + t.mean()).clamp(0, model.codebook_size - 1)).long()
    return torch.randn(target.shape, generator=g, dtype=target.dtype) * target.std() + target.mean()


def step_loss(kind, student, teacher, images, labels, step, weighting):
    """(loss, retain, forget) of one micro-step; draws as the §11 seeding (seed, rank 0, step)."""
    seed_step_globals(SEED, 0, step)
    task = student.sample_task(images, step_generator(SEED, 0, step, "task", "cpu"))
    if kind is None:  # engine_unlearn
        lo, hi = student.image_range
        noise = sample_batch_noise_reference(images, "normal", step_generator(SEED, 0, step, "noise", "cpu"), lo, hi)
        latent = student.forward_encoder_task(student.prepare_inputs(images), task)
        with torch.no_grad():
            guide = teacher.forward_encoder_task(teacher.prepare_inputs(images), task)
            mis_guide = teacher.forward_encoder_task(teacher.prepare_inputs(noise), task)
        r, f = l2_terms(latent, guide, mis_guide, labels, False)
        return r + FA * f, r, f
    g = step_generator(SEED, 0, step, "baseline", "cpu")
    inputs = student.prepare_inputs(images)
    if kind in ("max_full_model_loss", "full_model_noise"):  # forward_weighted_loss(_noise_label)
        out = student.forward_outputs(inputs, task)  # one forward for both targets
        target = student.task_target(inputs, task)
        ce, w = token_losses(student, out, target, task)
        ce_f = ce
        if kind == "full_model_noise":
            ce_f, _ = token_losses(student, out, noisy_target(student, target, g), task)
        sign = torch.where(labels < 100, -1.0, 1.0)[:, None]
        r = (ce * w * (1.0 + sign) * 0.5).sum() / w.sum()
        f = (ce_f * w * (1.0 - sign) * 0.5).sum() / w.sum()
        return (r + FA * f if kind == "full_model_noise" else r - FA * f), r, f
    if kind == "encoder_noise":
        latent = student.forward_encoder_task(inputs, task)
        with torch.no_grad():
            guide = teacher.forward_encoder_task(teacher.prepare_inputs(images), task)
            mis_guide = torch.randn(guide.shape, generator=g) * torch.std(guide) + torch.mean(guide)
        r, f = l2_terms(latent, guide, mis_guide, labels, weighting == "reference")
        return r + FA * f, r, f
    assert kind == "learn_others"
    logits = student.forward_outputs(inputs, task)
    with torch.no_grad():
        teacher_logits = teacher.forward_outputs(teacher.prepare_inputs(images), task)
        retain_idx = (labels > 0).nonzero().squeeze()
        num_retain = int((labels > 0).sum())
        if num_retain > 0:
            b = labels.shape[0]
            updated = torch.tile(teacher_logits[retain_idx], (math.ceil(b / num_retain), 1, 1))[:b]
        else:
            updated = torch.randn(teacher_logits.shape, generator=g)
    r, f = l2_terms(logits, teacher_logits, updated, labels, weighting == "reference")
    return r + FA * f, r, f


def restated_run(kind, student, teacher, data, steps, *, epochs, accum, warmup, weighting="reference", lr=LR):
    """Returns (log lines, lr of each optimizer step)."""
    if kind in (None, "encoder_noise"):  # only the encoder path gets gradients (the rest would be skipped by AdamW)
        enc = set(student.encoder_parameter_names())
        for n, p in student.named_parameters():
            p.requires_grad_(n in enc)
    student.train()
    opt = torch.optim.AdamW(timm_032_groups(list(student.named_parameters()), 0.05), lr=lr, betas=(0.9, 0.95),
                            foreach=False)
    logs, update_lrs = [], []
    for epoch in range(epochs):
        opt.zero_grad(set_to_none=False)  # torch 1.13's default
        meters = {"lr": [], "loss": [], "retain": [], "forget": []}
        for it, (images, labels) in enumerate(data[epoch][:steps]):
            if it % accum == 0:
                for group in opt.param_groups:
                    group["lr"] = lr_sched(it / steps + epoch, lr, 0.0, warmup, epochs)
            loss, r, f = step_loss(kind, student, teacher, images, labels, epoch * steps + it, weighting)
            loss_value = loss.item()
            assert math.isfinite(loss_value)
            (loss / accum).backward()
            if (it + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
                update_lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                opt.zero_grad(set_to_none=False)
            for k, v in zip(meters, (opt.param_groups[0]["lr"], loss_value, r.item(), f.item())):
                meters[k].append(v)
        logs.append({k: sum(v) / len(v) for k, v in meters.items()})
    return logs, update_lrs


# ---- helpers --------------------------------------------------------------------------------------------

def _model(name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(name)


def _perturbed_teacher(model):
    """A frozen copy 1e-2 away (tokenizer untouched), so no gradient starts at exactly 0."""
    teacher = make_teacher(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if not n.startswith("vqgan."):
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    return teacher


def _weight_diff(a, b):
    worst = 0.0
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m
        d = (p.detach().double() - q.detach().double()).abs().flatten()
        if n.endswith("attn.qkv.bias"):
            third = d.shape[0] // 3
            d = torch.cat([d[:third], d[2 * third:]])
        worst = max(worst, d.max().item())
    return worst


def _log_keys(kind):
    if kind in ("max_full_model_loss", "full_model_noise"):  # engine_baseline's meters, in order
        return ["train_lr", "train_loss", "train_retain_loss", "train_forget_loss", "epoch"]
    return ["train_lr", "train_retain_l2_loss", "train_forget_l2_loss", "train_loss", "epoch"]


def _assert_logs(got, expected, kind):
    names = {"train_lr": "lr", "train_loss": "loss", "train_retain_loss": "retain", "train_forget_loss": "forget",
             "train_retain_l2_loss": "retain", "train_forget_l2_loss": "forget"}
    for e, (g, x) in enumerate(zip(got, expected)):
        assert list(g) == _log_keys(kind) and g["epoch"] == e
        for k, v in names.items():
            if k in g:
                assert g[k] == pytest.approx(x[v], rel=LOG_RTOL, abs=1e-12), f"epoch {e} {k}: {g[k]} vs {x[v]}"


# ---- the loop and every baseline, MAGE and MAE ------------------------------------------------------------

CASES = [  # (model, loss_type, weighting, accum_iter, steps per epoch)
    ("mage_micro", None, "reference", 1, 3),
    ("mage_micro", None, "reference", 3, 5),            # accumulation; the epoch's last window (2 steps) dropped
    ("mage_micro", "max_full_model_loss", "reference", 3, 5),
    ("mage_micro", "full_model_noise", "reference", 3, 5),
    ("mage_micro", "encoder_noise", "reference", 3, 5),
    ("mage_micro", "encoder_noise", "corrected", 1, 3),
    ("mage_micro", "learn_others", "reference", 3, 5),
    ("mage_micro", "learn_others", "corrected", 1, 3),
    ("mae_micro", None, "reference", 3, 5),
    ("mae_micro", "full_model_noise", "reference", 1, 3),
    ("mae_micro", "learn_others", "reference", 3, 4),
]


@pytest.mark.parametrize("name,kind,weighting,accum,steps", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2][:3]}-acc{c[3]}" for c in CASES])
def test_train_loop_equals_the_restated_reference(name, kind, weighting, accum, steps):
    epochs, warmup = 2, 1
    data = labelled_batches(epochs, steps, MIX)
    model = _model(name)
    teacher = _perturbed_teacher(model)
    plain = copy.deepcopy(model)
    expected, expected_lrs = restated_run(kind, plain, teacher, data, steps, epochs=epochs, accum=accum,
                                          warmup=warmup, weighting=weighting)
    setup = build_setup(copy.deepcopy(model), "cpu", lr=LR, precision="fp32", forget_alpha=FA, accum_iter=accum,
                        teacher=copy.deepcopy(teacher), loss_type=kind, baseline_weighting=weighting)
    # the optimizer's groups are timm 0.3.2's over the parameters the reference trains
    ref_groups = timm_032_groups(list(plain.named_parameters()), 0.05)
    assert [len(g["params"]) for g in setup.optimizer.param_groups] == [len(g["params"]) for g in ref_groups]
    assert [g["weight_decay"] for g in setup.optimizer.param_groups] == [0.0, 0.05]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in setup.optimizer.param_groups)
    update_lrs = []
    real_step = setup.optimizer.step
    setup.optimizer.step = lambda *a, **k: (update_lrs.append(setup.optimizer.param_groups[0]["lr"]),
                                            real_step(*a, **k))[1]
    got = train_loop(setup, lambda e: iter(data[e]), steps, epochs=epochs, lr=LR, warmup_epochs=warmup,
                     step_mode="reference", progress=False, readback_every=1)
    assert update_lrs == expected_lrs  # one update per full window, at the window's first micro-step's lr
    assert len(update_lrs) == epochs * (steps // accum)
    moved = _weight_diff(plain, model)
    assert moved > 1e-4, "the restated run did not train: the comparison would be vacuous"
    diff = _weight_diff(setup.student, plain)
    assert diff <= WEIGHT_TOL, f"weights differ from the restated reference by {diff:.3g} (movement {moved:.3g})"
    _assert_logs(got, expected, kind)


def test_noisy_label_scores_both_targets_on_one_forward():
    """NOISY LABEL on MAGE: the reference computes the clean and the noisy CE from ONE forward (one embedding
    dropout draw). The step must give that loss and gradient, not a second forward's dropout for the forget term."""
    model = _model("mage_micro")
    setup = build_setup(copy.deepcopy(model), "cpu", lr=LR, precision="fp32", forget_alpha=FA,
                        loss_type="full_model_noise")
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor(
        [100.0, -100.0, -100.0, 100.0])
    out = baseline_step(setup, images, labels < 100, 5, update=False)
    plain = copy.deepcopy(model)
    plain.train()
    loss, r, f = step_loss("full_model_noise", plain, None, images, labels, 5, "reference")
    loss.backward()
    assert out.retain.item() == pytest.approx(r.item(), rel=1e-6)
    assert out.forget.item() == pytest.approx(f.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for (n, p), q in zip(setup.student.named_parameters(), plain.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


# ---- the same through the command line --------------------------------------------------------------------

@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data = make_class_tree(root / "data", ["cat", "dog", "bird", "fish"], 5, seed=0, size=(36, 40))
    return root, data


@pytest.mark.parametrize("name,command,kind,accum", [("mae_micro", "unlearn", None, 4),
                                                     ("mage_micro", "baseline", "full_model_noise", 1)])
def test_cli_run_equals_the_restated_reference(class_tree, tmp_path, monkeypatch, name, command, kind, accum):
    """lr = blr·eff_batch/256, the per-iteration schedule, the updates (4 steps a window: the epoch's last 2
    micro-steps are dropped), checkpoint weights and log.txt of a CLI run against the restatement fed the
    batches the run drew."""
    import unlearn_fast.cli.unlearn_command as unlearn_command
    from unlearn_fast.cli.main import main
    root, data = class_tree
    pretrained = save_random_pretrained(tmp_path / "pre.pth", name)
    seen = {}
    real_loop = unlearn_command.train_loop

    def spy(setup, epoch_batches, steps, **kw):
        seen.update(steps=steps, teacher=copy.deepcopy(setup.teacher), batches={}, lr=kw["lr"])

        def recorded(epoch):
            kept = seen["batches"].setdefault(epoch, [])
            for images, labels in epoch_batches(epoch):
                kept.append((images.clone(), labels.clone()))
                yield images, labels
        return real_loop(setup, recorded, steps, **kw)

    monkeypatch.setattr(unlearn_command, "train_loop", spy)
    out = tmp_path / "out"
    argv = [command, "--model", name, "--input_size", "32", "--data_path", data, "--forget_classes", "cat,dog",
            "--retain_classes", "bird,fish", "--num_image_per_class", "5", "--batch_size", "3", "--epochs", "2",
            "--warmup_epochs", "1", "--accum_iter", str(accum), "--blr", "0.1", "--forget_alpha", str(FA),
            "--num_workers", "0", "--output_dir", str(out), "--no_progress", "--device", "cpu", "--resume",
            pretrained, "--precision", "fp32", "--step", "reference"]
    if kind is not None:
        argv += ["--loss_type", kind]
    assert main(argv) == 0
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    steps = seen["steps"]
    assert steps == 20 // 3
    assert seen["lr"] == 0.1 * 3 * accum / 256
    with open(os.path.join(run_dir, "opt.yaml")) as fh:
        assert json.load(fh)["lr"] == seen["lr"]
    start = torch.load(pretrained, weights_only=True)["model"]
    plain = create_model(name)
    plain.load_state_dict(start)
    original = copy.deepcopy(plain)
    expected, _ = restated_run(kind, plain, seen["teacher"], seen["batches"], steps, epochs=2, accum=accum, warmup=1,
                               lr=seen["lr"])
    trained = create_model(name)
    trained.load_state_dict(torch.load(os.path.join(run_dir, "checkpoint-1.pth"), weights_only=True)["model"])
    assert _weight_diff(plain, original) > 1e-4, "the restated run did not train: the comparison would be vacuous"
    diff = _weight_diff(trained, plain)
    assert diff <= WEIGHT_TOL, f"checkpoint weights differ from the restated reference by {diff:.3g}"
    with open(os.path.join(run_dir, "log.txt")) as fh:
        got = [json.loads(line) for line in fh]
    _assert_logs(got, expected, kind)
