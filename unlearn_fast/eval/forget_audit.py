"""Membership-style forgetting audit: can forget-train images still be told apart from unseen ones?

Given per-image reconstruction errors of the model on (a) the forget-set images it was unlearned on and
(b) unseen images of the same classes, a model that still "remembers" its training images reconstructs
them better (lower error). The audit AUC is the probability that a random forget-train image has a lower
error than a random unseen one (ties count 1/2):

    AUC = P(err_train < err_unseen) + 0.5 P(err_train = err_unseen)

0.5 means no membership signal (the goal after unlearning); near 1 means training images stand out.
:func:`auc` is the Mann-Whitney U statistic divided by n_pos * n_neg, with mid-ranks for ties.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["auc", "membership_auc", "forget_audit_summary"]


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1) if np.ndim(x) <= 1 else None
    if arr is None:
        raise ValueError(f"{name} must be a 1-D sequence of scores, got shape {np.shape(x)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Group boundaries of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auc(scores_pos: Any, scores_neg: Any) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the ROC AUC of positives scored above negatives."""
    pos, neg = _as_1d(scores_pos, "scores_pos"), _as_1d(scores_neg, "scores_neg")
    ranks = _midranks(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0  # Mann-Whitney U of the positives
    return float(u / (n_pos * n_neg))


def membership_auc(train_errors: Any, unseen_errors: Any) -> float:
    """AUC of "lower error means seen in training": auc(-train_errors, -unseen_errors)."""
    return auc(-_as_1d(train_errors, "train_errors"), -_as_1d(unseen_errors, "unseen_errors"))


def _side(errors: dict, when: str) -> dict:
    for key in ("forget_train", "unseen"):
        if key not in errors:
            raise ValueError(f"{when} errors need keys 'forget_train' and 'unseen', missing {key!r}")
    train, unseen = _as_1d(errors["forget_train"], f"{when}.forget_train"), _as_1d(errors["unseen"], f"{when}.unseen")
    return {"auc": membership_auc(train, unseen), "n_forget_train": int(train.size), "n_unseen": int(unseen.size),
            "mean_error_forget_train": float(train.mean()), "mean_error_unseen": float(unseen.mean())}


def forget_audit_summary(before: dict, after: dict) -> dict:
    """Audit before and after unlearning.

    before/after: {"forget_train": errors [N1], "unseen": errors [N2]} (numpy, torch or lists).
    Returns {"before": {...}, "after": {...}, "auc_change": after - before, "distance_from_chance":
    |after.auc - 0.5|}; each side holds auc, counts and mean errors.
    """
    b, a = _side(before, "before"), _side(after, "after")
    return {"before": b, "after": a, "auc_change": a["auc"] - b["auc"], "distance_from_chance": abs(a["auc"] - 0.5)}
