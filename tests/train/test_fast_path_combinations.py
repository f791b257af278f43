"""The fast step against the reference-semantics step over the combinations of options a user can reach
(both families, every precision, accumulation with a partial window, alphas at 0, every noise kind, token
sharing, all-forget / all-retain / one-row batches, odd image layouts and dtypes), plus what it must refuse.

Tolerances: with the PyTorch twins (UNLEARN_FAST_BACKEND=torch) and MAE's conv patch embedding the two steps
run the same ops on the same rows, so on CPU they agree bitwise today; the bounds (losses 1e-5 relative,
weights 1e-6 absolute after 5 SGD steps at lr 1e-2 that move them by ~1e-3..1e-2) leave room for a GEMM that
blocks differently on the pruned teacher's smaller batch, while one step with another guide or another noise
moves a loss by > 1e-2 (a teacher with another tokenizer: 8 %).
"""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_fast
from tests.helpers import max_param_diff
from unlearn_fast.ops import NOISE_KINDS
from unlearn_fast.train.balanced_sampler import BalancedUnlearnSampler, proportional_forget_per_batch
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_reference import reference_step
from unlearn_fast.train.teacher_guides import front_ends_match
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-6
# mixed, all-forget, all-retain, one row, mixed: 5 micro-steps, so accum_iter 3 leaves a partial last window
PATTERNS = ([True, False, False, True, False], [True] * 3, [False] * 2, [True], [False, True, False])


def _model(name, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return unlearn_fast.create_model(name)


def _perturbed(model):
    """The student a few steps into unlearning: its encoder off the teacher's, so every loss term is non-zero."""
    g = torch.Generator().manual_seed(5)
    enc = set(model.encoder_parameter_names())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in enc:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _batches(patterns=PATTERNS, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(len(p), 3, size, size, generator=g), torch.tensor(p)) for p in patterns]


def _compare(student, teacher, batches=None, fast_kwargs=None, **kwargs):
    """Run both steps from identical copies; returns (worst relative loss gap, weight gap, weight movement)."""
    accum = kwargs.get("accum_iter", 1)
    ref, fast = (build_setup(copy.deepcopy(student), "cpu", lr=1e-2, teacher=copy.deepcopy(teacher), **kwargs,
                             **(extra or {})) for extra in (None, fast_kwargs))
    for s in (ref, fast):
        s.optimizer = torch.optim.SGD(s.trainable, lr=1e-2)  # AdamW would turn ulp noise into O(lr) steps
    worst = 0.0
    for step, (images, is_forget) in enumerate(batches or _batches()):
        update = (step + 1) % accum == 0
        a = reference_step(ref, images, is_forget, step, update)
        b = fast_step(fast, images, is_forget, step, update)
        for x, y in zip(a, b):
            worst = max(worst, abs(x.item() - y.item()) / max(abs(x.item()), 1e-6))
    return worst, max_param_diff(ref.student, fast.student), max_param_diff(ref.student, student)


COMBOS = [  # (model, precision, options): each option of the step appears at least once per family
    ("mae_micro", "fp32", dict(accum_iter=3, forget_alpha=0.5, noise_type="normal")),
    ("mae_micro", "reference", dict(forget_alpha=0.0, noise_type="uniform")),
    ("mae_micro", "bf16", dict(retain_alpha=0.0, forget_alpha=0.7, noise_type="constant", grad_clip=None)),
    ("mage_micro", "fp32", dict(forget_alpha=0.5, noise_type="uniform", share_tokenizer=True)),
    ("mage_micro", "reference", dict(accum_iter=3, forget_alpha=0.5, noise_type="constant")),
    ("mage_micro", "bf16", dict(retain_alpha=0.0, forget_alpha=0.7, noise_type="normal")),
]


@pytest.mark.parametrize("name,precision,options", COMBOS, ids=[f"{m}-{p}-{i}" for i, (m, p, _) in enumerate(COMBOS)])
def test_fast_step_equals_reference_step_across_options(monkeypatch, name, precision, options):
    assert {o.get("noise_type") for _, _, o in COMBOS} == set(NOISE_KINDS)  # every kind is covered
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    teacher = _model(name)
    loss_gap, weight_gap, moved = _compare(_perturbed(_model(name)), teacher, precision=precision,
                                           fast_kwargs=dict(visible_patch_embed=False), **options)
    assert moved > 1e-4, "the run did not train: the comparison would be vacuous"
    assert loss_gap <= LOSS_RTOL and weight_gap <= WEIGHT_ATOL, (loss_gap, weight_gap, moved)


@pytest.mark.parametrize("precision,share", [("fp32", False), ("bf16", False), ("reference", True)])
def test_teacher_with_another_tokenizer_tokenizes_for_itself(monkeypatch, capsys, precision, share):
    """BUG (fixed): where sharing is exact (equal precision) or asked for, the teacher reused the student's code
    ids. A teacher given separately (build_setup(teacher=...), --teacher) may hold another VQGAN: the reference
    step tokenizes with the teacher's own, so the fast step computed other guides (losses 8 % off), silently."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    student, teacher = _model("mage_micro"), _model("mage_micro", seed=1)  # another VQGAN
    loss_gap, weight_gap, moved = _compare(student, teacher, batches=_batches()[:2], precision=precision,
                                           forget_alpha=0.5, fast_kwargs=dict(share_tokenizer=share))
    assert moved > 1e-4
    assert loss_gap <= LOSS_RTOL and weight_gap <= WEIGHT_ATOL, (loss_gap, weight_gap)
    assert capsys.readouterr().out.count("teacher's frozen weights differ") == 1  # said once, not every step


def test_front_ends_match_follows_the_weights():
    student = _model("mage_micro")
    teacher = copy.deepcopy(student).requires_grad_(False)
    assert front_ends_match(student, teacher)
    with torch.no_grad():
        teacher.vqgan.encoder.conv_in.weight.add_(1e-3)  # in place: the version counter moves
    assert not front_ends_match(student, teacher)
    with torch.no_grad():
        teacher.vqgan.encoder.conv_in.weight.sub_(1e-3)
        teacher.vqgan.encoder.conv_in.weight.copy_(student.vqgan.encoder.conv_in.weight)
    assert front_ends_match(student, teacher)
    assert not front_ends_match(student, _model("mage_micro", seed=1))  # another teacher object: compared anew
    mae = _model("mae_micro")
    assert front_ends_match(mae, _model("mae_micro", seed=1))  # MAE's front end is the identity


@pytest.mark.parametrize("loss_type", ["encoder_noise", "max_full_model_loss"])
def test_fast_step_refuses_a_baseline_setup(loss_type):
    """BUG (fixed): fast_step ran the paper's objective on a baseline's setup (train_loop's default step_mode is
    'fast'), training and logging something else than the baseline without a word."""
    model = _model("mae_micro")
    setup = build_setup(model, "cpu", precision="fp32", forget_alpha=0.5, loss_type=loss_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, is_forget = _batches()[0]
    with pytest.raises(ValueError, match=f"{loss_type}.*baseline_step"):
        fast_step(setup, images, is_forget, 0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("layout", ["channels_last", "transposed_view", "float64", "float16", "int64_labels",
                                    "expanded_batch"])
def test_odd_image_layouts_and_dtypes_give_the_reference_numbers(monkeypatch, layout):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    images, is_forget = _batches()[0]
    images = {"channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
              "transposed_view": lambda x: x.transpose(2, 3), "float64": lambda x: x.double(),
              "float16": lambda x: x.half(), "expanded_batch": lambda x: x[:1].expand(len(x), -1, -1, -1),
              }.get(layout, lambda x: x)(images)
    is_forget = is_forget.long() if layout == "int64_labels" else is_forget
    for name in ("mae_micro", "mage_micro"):
        model = _model(name)
        loss_gap, weight_gap, _ = _compare(_perturbed(model), _model(name), batches=[(images, is_forget)],
                                           precision="fp32", forget_alpha=0.5,
                                           fast_kwargs=dict(visible_patch_embed=False))
        assert loss_gap <= LOSS_RTOL and weight_gap <= WEIGHT_ATOL, (name, loss_gap, weight_gap)


def test_uint8_images_are_refused_by_both_steps():
    images = (_batches()[0][0] * 255).to(torch.uint8)
    is_forget = _batches()[0][1]
    for step in (reference_step, fast_step):
        setup = build_setup(_model("mae_micro"), "cpu", precision="fp32", forget_alpha=0.5)
        with pytest.raises((TypeError, ValueError), match="floating"):
            step(setup, images, is_forget, 0)


@pytest.mark.parametrize("labels", [[0, 1, 0, 1], [-1, 1, -1, 1], [float("nan"), 100.0, -100.0, 100.0],
                                    [-100.0, 50.0, -100.0, 100.0]])
def test_balanced_sampler_refuses_labels_the_step_reads_otherwise(labels):
    """BUG (fixed): the sampler took label < 0 as forget, the trainer label < 100: 0/1 flags, +1 signs, 50 or NaN
    built batches whose forget rows the step counted differently (NaN: a retain row to the sampler, forget to
    the reference), or with 0/1 flags no forget row at all."""
    with pytest.raises(ValueError, match=r"-100\.0 \(forget\) / 100\.0 \(retain\)"):
        BalancedUnlearnSampler(torch.tensor(labels), 2, 1)
    with pytest.raises(ValueError, match="bool mask"):
        proportional_forget_per_batch(torch.tensor(labels), 2)


def test_balanced_sampler_accepts_the_reference_labels_in_any_numeric_type():
    as_float = list(BalancedUnlearnSampler(torch.tensor([-100.0, 100.0, -100.0, 100.0]), 2, 1, seed=3))
    assert list(BalancedUnlearnSampler(torch.tensor([-100, 100, -100, 100]), 2, 1, seed=3)) == as_float
    assert list(BalancedUnlearnSampler(torch.tensor([True, False, True, False]), 2, 1, seed=3)) == as_float
    with pytest.raises(ValueError, match="batch_size"):
        proportional_forget_per_batch([-100.0, 100.0], 0)
