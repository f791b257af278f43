"""MAGE masking: the truncated-normal rate and exact-count drop/mask sets."""
import math

import pytest
import torch

from unlearn_fast.models import TaskDraw, create_model
from unlearn_fast.models.mage_masking import (drop_and_mask_sets, num_dropped_tokens, sample_mage_masks,
                                              sample_mask_rate, truncnorm_mean)

MAGE = dict(mu=0.55, std=0.25, low=0.5, high=1.0)


@pytest.mark.parametrize("batch,seq_len", [(1, 256), (7, 64), (3, 37), (2, 1)])
def test_exact_counts_and_drop_subset_of_all(batch, seq_len):
    g = torch.Generator().manual_seed(123)
    for _ in range(20):
        d = sample_mage_masks(batch, seq_len, generator=g)
        drop, all_ = d["token_drop_mask"], d["token_all_mask"]
        assert drop.dtype == torch.bool and tuple(drop.shape) == (batch, seq_len)
        k = math.ceil(seq_len * 0.5)
        assert d["num_dropped"] == k
        assert (drop.sum(1) == k).all()
        rate = float(d["mask_rate"])
        assert d["mask_rate"].dim() == 0 and 0.5 <= rate <= 1.0
        assert (all_.sum(1) == math.ceil(seq_len * rate)).all()
        assert not (drop & ~all_).any()  # drop ⊆ all


def test_sets_are_the_smallest_noise_positions_even_with_ties():
    noise = torch.tensor([[0.3, 0.1, 0.9, 0.5, 0.2, 0.7], [0.5] * 6])
    drop, all_ = drop_and_mask_sets(noise, 2, torch.tensor(0.6, dtype=torch.float64))  # ceil(3.6) = 4
    assert drop[0].tolist() == [False, True, False, False, True, False]
    assert all_[0].tolist() == [True, True, False, True, True, False]
    assert drop[1].sum() == 2 and all_[1].sum() == 4 and not (drop[1] & ~all_[1]).any()
    with pytest.raises(ValueError):
        drop_and_mask_sets(noise, 7, torch.tensor(0.6))


def test_seeded_reproducible_and_seed_sensitive():
    a = sample_mage_masks(4, 256, generator=torch.Generator().manual_seed(5))
    b = sample_mage_masks(4, 256, generator=torch.Generator().manual_seed(5))
    c = sample_mage_masks(4, 256, generator=torch.Generator().manual_seed(6))
    for key in ("token_drop_mask", "token_all_mask", "mask_rate"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["token_drop_mask"], c["token_drop_mask"])
    # rows get different positions
    assert not torch.equal(a["token_drop_mask"][0], a["token_drop_mask"][1])


def test_rate_distribution_is_the_reference_truncnorm():
    assert truncnorm_mean(**MAGE) == pytest.approx(0.694, abs=5e-4)
    g = torch.Generator().manual_seed(0)
    rates = torch.stack([sample_mask_rate(generator=g, **MAGE) for _ in range(4000)])
    assert rates.dtype == torch.float64 and float(rates.min()) >= 0.5 and float(rates.max()) <= 1.0
    # sd of the distribution is about 0.13, so the mean of 4000 draws is within 0.01 of 0.694 (> 4 sigma)
    assert float(rates.mean()) == pytest.approx(truncnorm_mean(**MAGE), abs=0.01)
    assert float(rates.median()) == pytest.approx(0.676, abs=0.015)  # REFERENCE.md §1.2 b
    # the CDF of the truncated normal at a few points (closed form), within 3 binomial sigmas
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    a, b = phi((0.5 - 0.55) / 0.25), phi((1.0 - 0.55) / 0.25)
    for x in (0.55, 0.7, 0.9):
        want = (phi((x - 0.55) / 0.25) - a) / (b - a)
        got = float((rates <= x).double().mean())
        assert abs(got - want) < 3 * math.sqrt(want * (1 - want) / 4000) + 1e-3


def test_rate_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    rates = torch.stack([sample_mask_rate(generator=g, **MAGE) for _ in range(2000)]).numpy()
    dist = stats.truncnorm((0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25, loc=0.55, scale=0.25)
    assert stats.kstest(rates, dist.cdf).pvalue > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError):
        sample_mage_masks(0, 10)
    with pytest.raises(ValueError):
        sample_mage_masks(2, 10, mask_ratio_min=0.8, mask_ratio_max=0.5)
    with pytest.raises(ValueError):
        sample_mask_rate(0.5, 0.0, 0.5, 1.0)
    assert num_dropped_tokens(256, 0.5) == 128 and num_dropped_tokens(37, 0.5) == 19


def test_model_sample_task_is_a_selectable_task_draw():
    model = create_model("mage_micro")
    images = torch.rand(5, 3, 32, 32)
    t = model.sample_task(images, torch.Generator().manual_seed(0))
    assert isinstance(t, TaskDraw)
    assert set(t) == {"token_drop_mask", "token_all_mask", "mask_rate", "num_dropped"}
    assert tuple(t["token_drop_mask"].shape) == (5, 64) and t["num_dropped"] == 32
    sub = t.select(torch.tensor([4, 1]))
    assert torch.equal(sub["token_all_mask"], t["token_all_mask"][[4, 1]])
    assert sub["mask_rate"] is t["mask_rate"] and sub["num_dropped"] == 32
