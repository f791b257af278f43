"""Inception Score from class probabilities, exactly the reference formula (§5.2, `metric.inception_score`).

The N predictions are cut, in the order given, into ``splits`` consecutive parts of ``N // splits`` rows
(the last ``N % splits`` rows are dropped, as the reference does). For each part:

    p(y)    = mean over the part of p(y|x)
    score_k = exp( mean_x KL( p(y|x) || p(y) ) )

and the result is ``(mean_k score_k, std_k score_k)`` with the population std (ddof 0). Like
``scipy.stats.entropy``, each row and p(y) are renormalised to sum 1 before the KL, and 0·log 0 = 0.
Because the splits follow the order of the rows, the score depends on that order. MAGE's eval.py keeps glob
order (class by class, as `run_eval`'s sorted order). Palette's eval365.py shuffles the list first
(``random.shuffle``, unseeded), so each split mixes all classes; class-sorted rows would give each split only a
few classes and a far lower score (5,000 images of 50 classes: each split of 500 sees 5 of them).
``shuffle_seed`` (e.g. ``PALETTE_SHUFFLE_SEED``) permutes the rows with a seeded generator first: the
reference's shuffle, reproducible.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["inception_score_from_probs", "split_kl_scores", "PALETTE_SHUFFLE_SEED"]

PALETTE_SHUFFLE_SEED = 0  # stands in for eval365.py's unseeded random.shuffle


def _as_probs(probs: Any) -> np.ndarray:
    if hasattr(probs, "detach") and hasattr(probs, "cpu"):
        probs = probs.detach().cpu().double().numpy()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, K] class probabilities, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    if np.any(p.sum(axis=1) <= 0):
        raise ValueError("every row of probs must have a positive sum")
    return p


def split_kl_scores(probs: Any, splits: int = 10, shuffle_seed: int | None = None) -> np.ndarray:
    """Per-split scores exp(mean KL(p(y|x) || p(y))) as a float64 array [splits].

    ``shuffle_seed``: permute the rows with ``numpy.random.default_rng(shuffle_seed)`` before splitting (Palette);
    None keeps the given order (MAGE)."""
    p = _as_probs(probs)
    if not isinstance(splits, (int, np.integer)) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    if shuffle_seed is not None:
        if not isinstance(shuffle_seed, (int, np.integer)) or isinstance(shuffle_seed, bool) or shuffle_seed < 0:
            raise ValueError(f"shuffle_seed must be a non-negative integer or None, got {shuffle_seed!r}")
        p = p[np.random.default_rng(int(shuffle_seed)).permutation(p.shape[0])]  # [N, K], rows mixed
    n = p.shape[0]
    if n < splits:
        raise ValueError(f"need at least one prediction per split: N={n} < splits={splits}")
    part_size = n // splits
    scores = np.empty(splits, dtype=np.float64)
    for k in range(splits):
        part = p[k * part_size:(k + 1) * part_size]  # [part_size, K]
        p_yx = part / part.sum(axis=1, keepdims=True)
        p_y = part.mean(axis=0)
        p_y = p_y / p_y.sum()
        # p_yx > 0 implies p_y > 0 (p_y averages rows including this one), so the log is finite where used.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p_yx > 0, p_yx * (np.log(p_yx) - np.log(p_y)), 0.0)
        scores[k] = np.exp(terms.sum(axis=1).mean())
    return scores


def inception_score_from_probs(probs: Any, splits: int = 10, shuffle_seed: int | None = None) -> tuple[float, float]:
    """(mean, std) Inception Score of class probabilities ``probs`` [N, K] (numpy or torch), over ``splits``;
    ``shuffle_seed`` as in :func:`split_kl_scores`."""
    scores = split_kl_scores(probs, splits, shuffle_seed)
    return float(np.mean(scores)), float(np.std(scores))
