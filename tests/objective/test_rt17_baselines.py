"""RT17 audit: the four MAGE baselines (``unlearn-fast baseline --loss_type ...``) against the official code.

The official math is restated here in plain PyTorch from ``engine_baseline.py`` (``compute_loss``,
``train_one_epoch_*``) and ``models_mage.py`` (``forward_encoder`` with given raw masks, ``forward_decoder``,
``LabelSmoothingCrossEntropy``, ``forward_weighted_loss``, ``forward_weighted_loss_noise_label``), as stored
for jpmorganchase/i2i_mage (REFERENCE.md §2). The encoder and decoder are rewritten from the model's modules
the official way (boolean-index dropping, ``x_after_pad`` scattering, MLM head over the *detached* word table),
so the gradient that reaches each parameter is the official one, not our model's forward compared with itself.
Draws follow the §11 seeding (task, dropout and baseline generators from (seed, rank, step)); that is the one
deliberate deviation (the official baselines draw from the global generators).

One baseline step (fp32, CPU, no update) is compared with the restatement: loss, retain and forget values,
the gradient of every parameter, and which parameters get a gradient at all (what the official optimizer
would update: AdamW skips parameters whose grad is None). Tolerances: values 1e-6 relative; gradients
1e-6 relative to each tensor's largest entry (the restatement sums in other orders: boolean indexing and
scatter instead of gather).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.models import create_model
from unlearn_fast.objective import (max_loss, noisy_label_loss, random_encoder_loss, random_encoder_target,
                                    retain_label_loss, split_token_loss, tile_retain_rows)
from unlearn_fast.train.seeding import seed_step_globals, step_generator
from unlearn_fast.train.step_baseline import baseline_step
from unlearn_fast.train.unlearn_setup import build_setup, make_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

SEED, STEP, FA, RA = 0, 5, 0.5, 0.8
VALUE_RTOL, GRAD_RTOL = 1e-6, 1e-6
R, F_ = 100.0, -100.0  # the dataset's labels: +100 retain, -100 forget
LABELS = {  # awkward batches: odd size, batch 1, all retain, a single retain row at the end, all forget
    "mixed5": [R, F_, F_, R, F_],
    "one_forget": [F_],
    "all_retain": [R, R],
    "one_retain_last": [F_, F_, R],
    "all_forget": [F_, F_, F_],
}


# ---- the official code, restated ----------------------------------------------------------------------------

def official_encoder(m, ids, drop_raw, all_raw):
    """models_mage.forward_encoder with the given raw masks (float [N, L])."""
    n = ids.shape[0]
    tok = ids.clone()
    tok[all_raw.nonzero(as_tuple=True)] = m.mask_token_label
    tok = torch.cat([torch.zeros(n, 1, dtype=tok.dtype), tok], dim=1)
    tok[:, 0] = m.fake_class_label
    drop = torch.cat([torch.zeros(n, 1), drop_raw], dim=1)
    emb = m.token_emb(tok.long())  # [N, 1+L, D]
    x = emb[(1 - drop).nonzero(as_tuple=True)].reshape(n, -1, emb.shape[-1])
    for blk in m.blocks:
        x = blk(x)
    return m.norm(x)


def official_decoder(m, x, drop_raw, all_raw):
    """models_mage.forward_decoder (pad_with_cls_token) and MlmLayer over word_embeddings.weight.data.detach()."""
    n = x.shape[0]
    drop = torch.cat([torch.zeros(n, 1), drop_raw], dim=1)
    all_ = torch.cat([torch.zeros(n, 1), all_raw], dim=1)
    x = m.decoder_embed(x)
    mask_tokens = x[:, 0:1].repeat(1, all_.shape[1], 1)
    pad = mask_tokens.clone()
    pad[(1 - drop).nonzero(as_tuple=True)] = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    pad = torch.where(all_.unsqueeze(-1).bool(), mask_tokens, pad)
    x = pad + m.decoder_pos_embed_learned
    for blk in m.decoder_blocks:
        x = blk(x)
    x = m.decoder_norm(x)
    word = m.token_emb.word_embeddings.weight.data.detach()
    h = m.mlm_layer.ln(m.mlm_layer.gelu(m.mlm_layer.fc(x)))
    return torch.matmul(h, word.transpose(0, 1)) + m.mlm_layer.bias  # [N, 1+L, V]


def label_smoothing_ce(x, target, smoothing=0.1):
    logprobs = F.log_softmax(x, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return (1.0 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)


def official_compute_loss(latent, guide, mis_guide, labels):
    """engine_baseline.compute_loss: BOTH terms weighted by (1 + s)."""
    s = torch.where(labels < 100, -1.0, 1.0)
    loss1 = torch.mean((latent - guide) ** 2, dim=(1, 2)) * (1.0 + s)
    loss2 = torch.mean((latent - mis_guide) ** 2, dim=(1, 2)) * (1.0 + s)
    return loss1.mean(), loss2.mean()


def corrected_compute_loss(latent, guide, mis_guide, labels):
    """--baseline_weighting corrected: the forget term weighted by (1 - s) (REFERENCE.md §11)."""
    s = torch.where(labels < 100, -1.0, 1.0)
    loss1 = torch.mean((latent - guide) ** 2, dim=(1, 2)) * (1.0 + s)
    loss2 = torch.mean((latent - mis_guide) ** 2, dim=(1, 2)) * (1.0 - s)
    return loss1.mean(), loss2.mean()


def official_step(kind, student, teacher, images, labels, weighting):
    """(loss, retain, forget) of engine_baseline.train_one_epoch_<kind>'s step, §11 draws."""
    seed_step_globals(SEED, 0, STEP)
    task = student.sample_task(images, step_generator(SEED, 0, STEP, "task", "cpu"))
    g = step_generator(SEED, 0, STEP, "baseline", "cpu")
    drop_raw, all_raw = task["token_drop_mask"].float(), task["token_all_mask"].float()
    gt = student.prepare_inputs(images)  # [N, L]
    bsz, seq_len = gt.shape
    if kind in ("max_full_model_loss", "full_model_noise"):  # model(samples, labels=..., forget_alpha=...)
        logits = official_decoder(student, official_encoder(student, gt, drop_raw, all_raw), drop_raw, all_raw)
        label = torch.where(labels < 100, -1.0, 1.0)
        mask = torch.cat([torch.zeros(bsz, 1), all_raw], dim=1)
        code_logits = logits[:, 1:, :student.codebook_size].reshape(bsz * seq_len, -1)
        ce = label_smoothing_ce(code_logits, gt.reshape(bsz * seq_len)).reshape(bsz, seq_len)
        retain = (ce * mask[:, 1:] * ((1.0 + label[:, None]) * 0.5)).sum() / mask[:, 1:].sum()
        if kind == "max_full_model_loss":
            forget = (ce * mask[:, 1:] * ((1.0 - label[:, None]) * 0.5)).sum() / mask[:, 1:].sum()
            return retain - FA * forget, retain, forget
        t = gt.float()  # clamp to the micro codebook (the official hard-codes 1023 for its 1024 codes)
        noise_ids = torch.clamp(torch.randn(bsz, seq_len, generator=g) * torch.std(t) + torch.mean(t), 0,
                                student.codebook_size - 1).round().long()
        ce_noise = label_smoothing_ce(code_logits, noise_ids.reshape(bsz * seq_len)).reshape(bsz, seq_len)
        forget = (ce_noise * mask[:, 1:] * ((1.0 - label[:, None]) * 0.5)).sum() / mask[:, 1:].sum()
        return retain + FA * forget, retain, forget
    loss_fn = official_compute_loss if weighting == "reference" else corrected_compute_loss
    if kind == "encoder_noise":
        latent = official_encoder(student, gt, drop_raw, all_raw)
        with torch.no_grad():
            guide = official_encoder(teacher, teacher.prepare_inputs(images), drop_raw, all_raw)
            mis_guide = torch.randn(guide.shape, generator=g) * torch.std(guide) + torch.mean(guide)
        r, f = loss_fn(latent, guide, mis_guide, labels)
        return RA * r + FA * f, r, f
    assert kind == "learn_others"
    logits = official_decoder(student, official_encoder(student, gt, drop_raw, all_raw), drop_raw, all_raw)
    with torch.no_grad():
        tgt = teacher.prepare_inputs(images)
        teacher_logits = official_decoder(teacher, official_encoder(teacher, tgt, drop_raw, all_raw), drop_raw,
                                          all_raw)
        retain_idx = (labels > 0).nonzero()
        num_retain = len(retain_idx)
        retain_idx = retain_idx.squeeze()
        if num_retain > 0:
            updated = torch.tile(teacher_logits[retain_idx, :, :], (math.ceil(bsz / num_retain), 1, 1))[:bsz]
        else:
            updated = torch.randn(teacher_logits.shape, generator=g)
    r, f = loss_fn(logits, teacher_logits, updated, labels)
    return RA * r + FA * f, r, f


# ---- helpers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mage_pair():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("mage_micro")
    teacher = make_teacher(model)  # 1e-2 away from the student, so no gradient starts at exactly 0
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if not n.startswith("vqgan."):
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    return model, teacher


def _images(n):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _assert_value(got, want, name):
    assert got.item() == pytest.approx(want.item(), rel=VALUE_RTOL, abs=1e-9), f"{name}: {got.item()} vs {want.item()}"


def _assert_grads(ours, official, kind):
    """Same parameters get a gradient (what AdamW would update), and the same gradient."""
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in official.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want), (f"{kind}: trained parameters differ; only ours: "
                                         f"{sorted(set(got) - set(want))[:6]}, only official: "
                                         f"{sorted(set(want) - set(got))[:6]}")
    for n, gw in want.items():
        scale = gw.abs().max().item()
        err = (got[n] - gw).abs().max().item()
        assert err <= GRAD_RTOL * scale + 1e-12, f"{kind} grad {n}: max err {err:.3g} (scale {scale:.3g})"
    return set(want)


CASES = [(k, "reference") for k in ("max_full_model_loss", "full_model_noise")] + \
        [(k, w) for k in ("encoder_noise", "learn_others") for w in ("reference", "corrected")]


@pytest.mark.parametrize("labels_name", list(LABELS))
@pytest.mark.parametrize("kind,weighting", CASES, ids=[f"{k}-{w[:3]}" for k, w in CASES])
def test_step_equals_official_values_and_gradients(mage_pair, kind, weighting, labels_name):
    model, teacher = mage_pair
    labels = torch.tensor(LABELS[labels_name])
    images = _images(labels.shape[0])
    setup = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", retain_alpha=RA, forget_alpha=FA,
                        loss_type=kind, teacher=copy.deepcopy(teacher), baseline_weighting=weighting)
    out = baseline_step(setup, images, labels < 100, STEP, update=False)
    official = copy.deepcopy(model)  # the official model: every non-frozen parameter is in its optimizer
    official.train()
    loss, r, f = official_step(kind, official, teacher, images, labels, weighting)
    loss.backward()
    _assert_value(out.loss, loss, "loss")
    _assert_value(out.retain, r, "retain")
    _assert_value(out.forget, f, "forget")
    trained = _assert_grads(setup.student, official, kind)
    held = {id(p) for g in setup.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for n, p in setup.student.named_parameters() if n in trained)
    if kind == "encoder_noise":  # the encoder path only (token_emb, blocks, norm)
        assert trained <= set(setup.student.encoder_parameter_names())
    elif trained:  # the whole model: decoder and MLM head too; the MLM's output matrix is the detached table
        assert {"decoder_embed.weight", "mlm_layer.bias", "decoder_pos_embed_learned"} <= trained
    never = {"cls_token", "mask_token", "patch_embed.proj.weight", "decoder_pred.weight"}  # unused by any forward
    assert not trained & never
    if weighting == "reference" and kind in ("encoder_noise", "learn_others") and not (labels >= 100).any():
        assert out.loss.item() == 0.0  # the (1+s) bug: an all-forget batch gets no loss at all


def test_word_table_gets_gradient_only_through_the_encoder_input(mage_pair):
    """MAX LOSS trains the whole model, but the MLM head multiplies by the DETACHED word table: the table's
    gradient is what the embedding lookup alone receives (rows of ids that never occur in the batch stay 0)."""
    model, _ = mage_pair
    labels = torch.tensor(LABELS["mixed5"])
    setup = build_setup(copy.deepcopy(model), "cpu", precision="fp32", forget_alpha=FA,
                        loss_type="max_full_model_loss")
    baseline_step(setup, _images(5), labels < 100, STEP, update=False)
    grad = setup.student.token_emb.word_embeddings.weight.grad  # [V, D]
    seed_step_globals(SEED, 0, STEP)
    task = model.sample_task(_images(5), step_generator(SEED, 0, STEP, "task", "cpu"))
    ids = torch.where(task["token_all_mask"], model.mask_token_label, model.prepare_inputs(_images(5)))
    used = torch.zeros(grad.shape[0], dtype=torch.bool)
    used[ids.unique()] = True
    used[model.fake_class_label] = True
    assert grad[~used].abs().max().item() == 0.0
    assert grad[used].abs().sum().item() > 0.0


# ---- MAE (no official baseline code: the same formulas on its pixel loss / encoder latent / predictions) -----

@pytest.mark.parametrize("kind", ["max_full_model_loss", "full_model_noise", "encoder_noise", "learn_others"])
def test_mae_step_equals_restated_formulas(make_mae_micro, kind):
    model = make_mae_micro(0)
    teacher = make_teacher(model)
    labels = torch.tensor([F_, R, F_])
    images = _images(3)
    setup = build_setup(copy.deepcopy(model), "cpu", precision="fp32", retain_alpha=RA, forget_alpha=FA,
                        loss_type=kind, teacher=copy.deepcopy(teacher))
    out = baseline_step(setup, images, labels < 100, STEP, update=False)
    st = copy.deepcopy(model).train()
    seed_step_globals(SEED, 0, STEP)
    task = st.sample_task(images, step_generator(SEED, 0, STEP, "task", "cpu"))
    g = step_generator(SEED, 0, STEP, "baseline", "cpu")
    s = torch.where(labels < 100, -1.0, 1.0)
    if kind in ("max_full_model_loss", "full_model_noise"):
        pred = st.forward_outputs(images, task)
        target = st.task_target(images, task)
        _, mask, _ = st.mask_from_task(task)
        per_patch = ((pred - target) ** 2).mean(-1)  # [N, L]
        r = (per_patch * mask * ((1 + s[:, None]) * 0.5)).sum() / mask.sum()
        if kind == "max_full_model_loss":
            f = (per_patch * mask * ((1 - s[:, None]) * 0.5)).sum() / mask.sum()
            loss = r - FA * f
        else:
            noisy = torch.randn(target.shape, generator=g) * target.std() + target.mean()
            f = (((pred - noisy) ** 2).mean(-1) * mask * ((1 - s[:, None]) * 0.5)).sum() / mask.sum()
            loss = r + FA * f
    elif kind == "encoder_noise":
        latent = st.forward_encoder_task(images, task)
        with torch.no_grad():
            guide = teacher.forward_encoder_task(images, task)
            mis = torch.randn(guide.shape, generator=g) * torch.std(guide) + torch.mean(guide)
        r, f = official_compute_loss(latent, guide, mis, labels)
        loss = RA * r + FA * f
    else:
        pred = st.forward_outputs(images, task)
        with torch.no_grad():
            tp = teacher.forward_outputs(images, task)
            updated = tp[torch.tensor([1, 1, 1])]  # the one retain row, tiled
        r, f = official_compute_loss(pred, tp, updated, labels)
        loss = RA * r + FA * f
    loss.backward()
    _assert_value(out.loss, loss, "loss")
    _assert_value(out.retain, r, "retain")
    _assert_value(out.forget, f, "forget")
    _assert_grads(setup.student, st, kind)


# ---- findings (each failed before its fix) ----------------------------------------------------------------------

def test_no_weighted_token_is_named_not_a_silent_zero_loss(make_mae_micro):
    """Finding: with no hidden token in the batch (MAE --mask_ratio 0) MAX LOSS / NOISY LABEL divided by a
    clamped 0 and returned loss 0: the run then only weight-decayed the model, step after step. The official
    divides by the masked count (0/0 = nan -> "Loss is nan, stopping training"); here the cause is named."""
    with pytest.raises(ValueError, match="no token"):
        split_token_loss(torch.rand(3, 5), torch.zeros(3, 5), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="no token"):
        max_loss(torch.rand(2, 4), torch.zeros(2, 4, dtype=torch.bool), torch.tensor([False, True]), 0.5)
    model = make_mae_micro(0, mask_ratio=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup = build_setup(model, "cpu", lr=1e-2, precision="fp32", forget_alpha=FA, loss_type="max_full_model_loss")
    with pytest.raises(ValueError, match="no token"):
        baseline_step(setup, _images(3), torch.tensor([True, False, True]), 0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was updated


@pytest.mark.parametrize("fn", ["max", "noisy"])
def test_token_losses_keep_fp64(fn, gen):
    """Finding: split_token_loss cast fp64 token losses to fp32 (the only objective that did: the l2 ops keep
    fp64), so an fp64 oracle or gradcheck of MAX LOSS / NOISY LABEL was impossible."""
    clean = torch.rand(3, 7, generator=gen, dtype=torch.float64).requires_grad_(True)
    noisy = torch.rand(3, 7, generator=gen, dtype=torch.float64).requires_grad_(True)
    weight = (torch.rand(3, 7, generator=gen) < 0.6).double()
    weight[0, 0] = 1.0
    is_forget = torch.tensor([True, False, True])
    if fn == "max":
        out = max_loss(clean, weight, is_forget, 0.3)
        assert torch.autograd.gradcheck(lambda x: max_loss(x, weight, is_forget, 0.3).loss, (clean,))
    else:
        out = noisy_label_loss(clean, noisy, weight, is_forget, 0.3)
        assert torch.autograd.gradcheck(lambda a, b: noisy_label_loss(a, b, weight, is_forget, 0.3).loss,
                                        (clean, noisy))
    assert out.loss.dtype == out.retain.dtype == out.forget.dtype == torch.float64


def test_teacher_outputs_are_constants(gen):
    """Finding: the official computes the guide, its random target and the tiled retain logits under no_grad,
    so no gradient reaches them. Here a teacher output that required grad (a caller without no_grad, a teacher
    left trainable) got gradient from the loss, through the op's differentiable twin and through the random
    target's std / mean. The baselines now treat every teacher-derived tensor as a constant."""
    is_forget = torch.tensor([True, False, False, True, False])
    shape = (5, 6, 9)
    latent = torch.randn(shape, generator=gen).requires_grad_(True)
    guide = torch.randn(shape, generator=gen).requires_grad_(True)
    target = random_encoder_target(guide, torch.Generator().manual_seed(1))
    assert not target.requires_grad
    for weighting in ("reference", "corrected"):
        out = random_encoder_loss(latent, guide, target, is_forget, RA, FA, weighting)
        out.loss.backward()
        assert guide.grad is None, weighting
        # the student's gradient is the one with a detached guide
        lat2 = latent.detach().clone().requires_grad_(True)
        random_encoder_loss(lat2, guide.detach(), target, is_forget, RA, FA, weighting).loss.backward()
        torch.testing.assert_close(latent.grad, lat2.grad, rtol=1e-6, atol=0)
        latent.grad = None
    student = torch.randn(shape, generator=gen).requires_grad_(True)
    teacher_out = torch.randn(shape, generator=gen).requires_grad_(True)
    assert not tile_retain_rows(teacher_out, is_forget).requires_grad
    for weighting in ("reference", "corrected"):
        retain_label_loss(student, teacher_out, is_forget, RA, FA, weighting).loss.backward()
        assert teacher_out.grad is None, weighting


def test_random_target_draws_and_stats_in_fp32_for_a_half_guide(gen):
    """The official target is randn_like(guide) * std(guide) + mean(guide) on an fp32 guide. A bf16 / fp16 guide
    (a half-precision teacher) gets the same fp32 target from the same draw, not a unit normal rounded to bf16
    scaled by rounded statistics."""
    guide32 = torch.randn(4, 7, 16, generator=gen) * 3 + 0.7
    for dt in (torch.bfloat16, torch.float16):
        half = guide32.to(dt)
        got = random_encoder_target(half, torch.Generator().manual_seed(9))
        assert got.dtype == torch.float32
        h = half.float()
        want = torch.randn(half.shape, generator=torch.Generator().manual_seed(9)) * torch.std(h) + torch.mean(h)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
