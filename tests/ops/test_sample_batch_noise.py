"""sample_batch_noise: the reference noise formulas (REFERENCE.md §1.2 step 4), the seed/step path and
batch_mean_std. Oracles are restated here by hand (fp64 statistics, the same seeded generator).

Tolerances: fp32 noise vs the hand restatement 1e-6 relative (the statistics are computed in fp64 on
both sides and rounded to fp32); statistics vs fp64 1e-6 relative.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import assert_close_report
from unlearn_fast.ops import NOISE_KINDS, batch_mean_std, sample_batch_noise, sample_batch_noise_reference


def _images(gen, shape=(3, 3, 8, 8)):
    # per-sample and per-channel offsets so that a per-sample or per-channel statistic would be wrong
    x = torch.rand(shape, generator=gen) * 0.3
    x = x + torch.linspace(0.0, 0.4, shape[0]).view(-1, 1, 1, 1) + torch.linspace(0.0, 0.2, shape[1]).view(1, -1, 1, 1)
    return x


def _hand_stats(x: torch.Tensor):
    v = x.double().reshape(-1)
    mean = v.sum() / v.numel()
    std = math.sqrt(((v - mean) ** 2).sum().item() / (v.numel() - 1))  # unbiased
    return mean.item(), std


@pytest.mark.parametrize("entry", [sample_batch_noise, sample_batch_noise_reference])
def test_normal_is_clamped_affine_randn_with_global_unbiased_stats(op_backend, entry, gen):
    images = _images(gen)
    out = entry(images, "normal", generator=torch.Generator().manual_seed(123))
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(123))
    mean, std = _hand_stats(images)
    expected = (z.double() * std + mean).clamp(0.0, 1.0)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert_close_report(out, expected, rtol=1e-6, atol=1e-6, name="normal noise")


def test_normal_std_is_unbiased_and_mean_global_without_clamp(op_backend):
    # two elements 0 and 1: mean 0.5, unbiased std sqrt(0.5) (the biased one would be 0.5)
    images = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    out = sample_batch_noise(images, "normal", generator=torch.Generator().manual_seed(7),
                             low=-math.inf, high=math.inf)
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    assert_close_report(out, z * math.sqrt(0.5) + 0.5, rtol=1e-6, atol=1e-7)


def test_normal_clamps_to_the_given_range(op_backend, gen):
    images = torch.rand(4, 3, 16, 16, generator=gen) * 4 - 2  # std ~1.15: many draws fall outside [0, 1]
    out = sample_batch_noise(images, "normal", generator=gen)
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    out = sample_batch_noise(images, "normal", generator=gen, low=-1.0, high=1.0)
    assert out.min().item() == -1.0 and out.max().item() == 1.0


@pytest.mark.parametrize("entry", [sample_batch_noise, sample_batch_noise_reference])
def test_uniform_is_rand_in_unit_interval(op_backend, entry, gen):
    images = torch.rand(2, 3, 5, 7, generator=gen) * 10 + 5  # the images' range must not matter
    out = entry(images, "uniform", generator=torch.Generator().manual_seed(9))
    expected = torch.rand(images.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out, expected)
    assert out.min().item() >= 0.0 and out.max().item() < 1.0


@pytest.mark.parametrize("entry", [sample_batch_noise, sample_batch_noise_reference])
def test_constant_is_the_batch_mean(op_backend, entry, gen):
    images = _images(gen, (2, 3, 5, 5))
    out = entry(images, "constant")
    mean, _ = _hand_stats(images)
    assert out.shape == images.shape
    assert_close_report(out, torch.full(images.shape, mean, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert torch.unique(out).numel() == 1


@pytest.mark.parametrize("entry", [sample_batch_noise, sample_batch_noise_reference])
def test_unknown_kind_names_the_valid_kinds(entry):
    with pytest.raises(ValueError) as info:
        entry(torch.rand(1, 3, 4, 4), "gaussian")
    msg = str(info.value)
    assert "gaussian" in msg and all(k in msg for k in ("normal", "uniform", "constant"))
    assert set(NOISE_KINDS) == {"normal", "uniform", "constant"}


def test_bad_images_and_argument_combinations():
    with pytest.raises(ValueError, match="non-empty"):
        sample_batch_noise(torch.empty(0, 3, 4, 4), "normal")
    with pytest.raises(ValueError, match="floating"):
        sample_batch_noise(torch.ones(1, 3, 4, 4, dtype=torch.uint8), "normal")
    with pytest.raises(ValueError, match="seed"):
        sample_batch_noise(torch.rand(1, 3, 4, 4), "normal", step=3)
    with pytest.raises(ValueError, match="either"):
        sample_batch_noise(torch.rand(1, 3, 4, 4), "normal", torch.Generator(), seed=1, step=0)


def test_noise_does_not_track_gradients(gen):
    images = torch.rand(2, 3, 4, 4, generator=gen, requires_grad=True)
    for kind in NOISE_KINDS:
        assert not sample_batch_noise(images, kind, generator=gen).requires_grad
        assert not sample_batch_noise(images, kind, seed=0, step=0).requires_grad


# ---- seed / step path --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_seed_step_path_is_reproducible_and_step_dependent(op_backend, kind, gen):
    images = _images(gen, (2, 3, 6, 6))
    a = sample_batch_noise(images, kind, seed=11, step=4)
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    b = sample_batch_noise(images, kind, seed=11, step=4)
    assert torch.equal(a, b)
    assert torch.equal(a, sample_batch_noise(images, kind, seed=11, step=torch.tensor(4)))  # tensor step
    assert not torch.equal(a, sample_batch_noise(images, kind, seed=11, step=5))
    assert not torch.equal(a, sample_batch_noise(images, kind, seed=12, step=4))
    # neighbouring steps give unrelated streams, not shifted copies
    c = sample_batch_noise(images, kind, seed=11, step=5)
    assert not torch.equal(a.reshape(-1)[1:], c.reshape(-1)[:-1])


def test_seed_step_path_has_the_batch_statistics(op_backend, gen):
    images = torch.rand(8, 3, 32, 32, generator=gen) * 0.5 + 0.25
    mean, std = _hand_stats(images)
    out = sample_batch_noise(images, "normal", seed=3, step=17, low=-math.inf, high=math.inf)
    z = (out.double() - mean) / std  # should be standard normal draws (24576 of them)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1.0) < 0.05
    clamped = sample_batch_noise(images, "normal", seed=3, step=17)
    assert clamped.min().item() >= 0.0 and clamped.max().item() <= 1.0
    const = sample_batch_noise(images, "constant", seed=3, step=17)
    assert_close_report(const, torch.full(images.shape, mean, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    u = sample_batch_noise(images, "uniform", seed=3, step=17)
    assert u.min().item() >= 0.0 and u.max().item() < 1.0 and abs(u.double().mean().item() - 0.5) < 0.02


# ---- batch_mean_std ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (3, 3, 7, 5), (16, 3, 31, 33)], ids=lambda s: "x".join(map(str, s)))
def test_batch_mean_std_matches_fp64(op_backend, shape, dtype, gen):
    # a large offset: a naive fp32 single-pass variance would lose most digits here
    images = (torch.rand(shape, generator=gen) + 100.0).to(dtype)
    mean, std = batch_mean_std(images)
    ref = images.double()
    assert mean.dtype == std.dtype == torch.float32 and mean.dim() == std.dim() == 0
    assert_close_report(mean, ref.mean(), rtol=1e-6, atol=0.0, name="mean")
    assert_close_report(std, ref.std(), rtol=1e-5, atol=0.0, name="std (unbiased)")
