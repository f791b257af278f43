"""Inception Score from probabilities: known values, the split rule, and the reference formula restated."""
import math

import numpy as np
import pytest
import torch

from unlearn_fast.eval.inception_score import inception_score_from_probs, split_kl_scores


def reference_is(preds, splits):
    """The reference loop, restated with plain numpy (scipy.stats.entropy semantics: normalise, 0 log 0 = 0)."""
    n = preds.shape[0]
    scores = []
    for k in range(splits):
        part = preds[k * (n // splits):(k + 1) * (n // splits), :]
        py = np.mean(part, axis=0)
        kls = []
        for row in part:
            p, q = row / row.sum(), py / py.sum()
            kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))
        scores.append(math.exp(np.mean(kls)))
    return float(np.mean(scores)), float(np.std(scores))


def test_uniform_predictions_score_one():
    mean, std = inception_score_from_probs(np.full((50, 17), 1 / 17), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k,splits", [(1, 1), (3, 2), (10, 10), (7, 3)])
def test_one_hot_evenly_used_scores_k(k, splits):
    # Each split holds every class equally often -> p(y) uniform, KL = log k for every image.
    per_split = np.eye(k)[np.repeat(np.arange(k), 2)]  # [2k, k]
    probs = np.concatenate([per_split] * splits)
    mean, std = inception_score_from_probs(probs, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_two_class_mixture_closed_form():
    # Rows [a, 1-a] and [1-a, a] in equal numbers: p(y) = [1/2, 1/2], KL = a log 2a + (1-a) log 2(1-a).
    a = 0.8
    probs = np.array([[a, 1 - a], [1 - a, a]] * 6)
    expected = math.exp(a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    mean, std = inception_score_from_probs(probs, splits=3)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_different_splits_give_mean_and_population_std():
    # Split 1 uniform (score 1), split 2 two one-hot classes (score 2): mean 1.5, population std 0.5.
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    mean, std = inception_score_from_probs(probs, splits=2)
    assert (mean, std) == pytest.approx((1.5, 0.5), abs=1e-12)
    assert split_kl_scores(probs, 2) == pytest.approx([1.0, 2.0])


def test_remainder_rows_are_dropped_like_the_reference():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6) * 0.3, size=23)  # 23 rows, 10 splits -> 10 parts of 2, 3 rows dropped
    assert inception_score_from_probs(probs, 10) == pytest.approx(inception_score_from_probs(probs[:20], 10),
                                                                  rel=1e-14)
    probs2 = probs.copy()
    probs2[20:] = np.eye(6)[0]  # the dropped rows do not matter
    assert inception_score_from_probs(probs2, 10) == inception_score_from_probs(probs, 10)


@pytest.mark.parametrize("n,k,splits", [(1, 4, 1), (37, 11, 4), (100, 1000, 10)])
def test_matches_reference_loop_with_zeros_and_unnormalised_rows(n, k, splits):
    rng = np.random.default_rng(n)
    probs = rng.dirichlet(np.ones(k) * 0.2, size=n)
    probs[probs < 1e-3] = 0.0  # exact zeros exercise 0 log 0
    probs *= rng.uniform(0.5, 2.0, size=(n, 1))  # the reference renormalises rows
    got = inception_score_from_probs(torch.from_numpy(probs), splits)
    assert got == pytest.approx(reference_is(probs, splits), rel=1e-10)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        inception_score_from_probs(np.ones(5))
    with pytest.raises(ValueError, match="N=3 < splits=10"):
        inception_score_from_probs(np.ones((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        inception_score_from_probs(np.array([[0.5, -0.1]]), splits=1)
    with pytest.raises(ValueError, match="positive sum"):
        inception_score_from_probs(np.zeros((2, 2)), splits=1)
    with pytest.raises(ValueError, match="splits"):
        inception_score_from_probs(np.ones((2, 2)), splits=0)


def test_matches_scipy_entropy_loop():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(9) * 0.5, size=30)
    scores = []
    for k in range(3):
        part = probs[k * 10:(k + 1) * 10]
        py = part.mean(0)
        scores.append(np.exp(np.mean([stats.entropy(row, py) for row in part])))
    assert inception_score_from_probs(probs, 3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)
