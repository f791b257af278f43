"""AUC (Mann-Whitney U with ties) and the before/after membership audit."""
import itertools

import numpy as np
import pytest
import torch

from unlearn_fast.eval.forget_audit import auc, forget_audit_summary, membership_auc


def brute_force_auc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_separable_and_identical_sets():
    assert auc([5, 6, 7], [1, 2]) == 1.0
    assert auc([1, 2], [5, 6, 7]) == 0.0
    assert auc([3, 1, 2], [2, 3, 1]) == 0.5
    assert auc([4.0], [4.0]) == 0.5


def test_known_small_cases_with_ties():
    assert auc([1, 2, 3], [2]) == pytest.approx(0.5)  # 0 + 0.5 + 1 over 3 pairs
    assert auc([0.1, 0.4, 0.35, 0.8], [0.2, 0.4, 0.05]) == pytest.approx(brute_force_auc(
        [0.1, 0.4, 0.35, 0.8], [0.2, 0.4, 0.05]))
    assert auc([0.1, 0.4, 0.35, 0.8], [0.2, 0.4, 0.05]) == pytest.approx(8.5 / 12)


@pytest.mark.parametrize("n_pos,n_neg", [(1, 1), (1, 9), (17, 5), (64, 33)])
def test_matches_brute_force_with_many_ties(n_pos, n_neg):
    rng = np.random.default_rng(n_pos * 100 + n_neg)
    pos = rng.integers(0, 4, n_pos).astype(float)
    neg = rng.integers(0, 4, n_neg).astype(float) - 0.5 * rng.integers(0, 2)
    assert auc(pos, neg) == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)


def test_matches_sklearn_if_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.3, 1, 50).round(1), rng.normal(0, 1, 70).round(1)
    labels = np.r_[np.ones(50), np.zeros(70)]
    assert auc(pos, neg) == pytest.approx(metrics.roc_auc_score(labels, np.r_[pos, neg]), abs=1e-12)


def test_membership_direction_lower_error_is_member():
    assert membership_auc(train_errors=[0.1, 0.2], unseen_errors=[0.5, 0.9]) == 1.0
    assert membership_auc(torch.tensor([0.5, 0.9]), np.array([0.1, 0.2])) == 0.0


def test_summary_before_after():
    before = {"forget_train": [0.1, 0.2, 0.15], "unseen": [0.4, 0.5, 0.45, 0.3]}
    after = {"forget_train": np.array([0.9, 0.8, 0.85]),
             "unseen": torch.tensor([0.9, 0.8, 0.85, 0.7], dtype=torch.float64)}
    s = forget_audit_summary(before, after)
    assert s["before"]["auc"] == 1.0
    assert s["after"]["auc"] == pytest.approx(brute_force_auc([-0.9, -0.8, -0.85], [-0.9, -0.8, -0.85, -0.7]))
    assert s["auc_change"] == pytest.approx(s["after"]["auc"] - 1.0)
    assert s["distance_from_chance"] == pytest.approx(abs(s["after"]["auc"] - 0.5))
    assert s["before"]["n_forget_train"] == 3 and s["before"]["n_unseen"] == 4
    assert s["before"]["mean_error_unseen"] == pytest.approx(0.4125)


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([np.nan], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        auc(np.ones((2, 2)), [1.0])
    with pytest.raises(ValueError, match="missing 'unseen'"):
        forget_audit_summary({"forget_train": [1.0]}, {"forget_train": [1.0], "unseen": [2.0]})
