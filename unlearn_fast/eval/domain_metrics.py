"""Domain metrics: FID / IS / cosine / recognition of generated digits, measured with the digit classifier.

These are the paper's metric *formulas* (§5.2, §5.3) on a *different network*: the features, probabilities
and embeddings come from :mod:`unlearn_fast.eval.digit_classifier` (a small CNN trained on MNIST digits),
not from Inception-v3 or CLIP. The numbers are comparable between runs of the demo, never with the paper's
or with ``run_eval``'s. Each is computed separately on the forget and the retain images (``labels`` in
``forget_digits`` or not); generated[i] is the model's output for originals[i]:

- ``domain_fid``: ``fid_from_features`` of the classifier features (128-d) of generated vs originals;
  ``None`` for fewer than 2 images. Lower = outputs look like the real digits of that set.
- ``domain_is`` / ``domain_is_std``: ``inception_score_from_probs`` of the classifier probabilities of the
  generated images, in ``domain_is_splits`` splits: by default one split per 250 images, at least 1 and at
  most 10 (so 1 for the demo's 250-image sets; the std of a single split is 0). At most the number of
  distinct digits in the set.
- ``domain_cosine``: ``paired_cosine_mean`` of the classifier embeddings of generated[i] and originals[i].
- ``recognition_rate``: fraction of generated images the classifier labels as their true digit. On forget
  images: how often the forgotten digit is still recognisable (lower = more forgotten).
  ``originals_recognition_rate``: the same on the originals (the classifier's accuracy: the ceiling).

    clf = load_or_train_digit_classifier(seed=0, holdout_per_class=50)
    m = domain_metrics(recon, originals, labels, clf, forget_digits=[0, 1, 2, 3, 4])
    m["forget"]["recognition_rate"], m["retain"]["domain_fid"]
    m = domain_metrics_of_model(mae, originals, task, labels, clf, [0, 1])   # reconstructs first (MAE)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .chunked import apply_in_chunks
from .clip_cosine import paired_cosine_mean
from .frechet import fid_from_features
from .inception_score import inception_score_from_probs

IMAGES_PER_IS_SPLIT = 250
MAX_IS_SPLITS = 10
RECONSTRUCT_CHUNK = 256
NOTE = ("domain metrics: FID/IS/cosine formulas on a small MNIST-digit CNN's features, probabilities and "
        "embeddings (not Inception/CLIP); comparable between demo runs only")


def default_is_splits(n: int) -> int:
    """One split per IMAGES_PER_IS_SPLIT images, at least 1, at most MAX_IS_SPLITS."""
    return max(1, min(MAX_IS_SPLITS, n // IMAGES_PER_IS_SPLIT))


def _check_inputs(generated, originals, labels, forget_digits) -> tuple[torch.Tensor, np.ndarray]:
    for name, x in (("generated", generated), ("originals", originals)):
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4:
            raise ValueError(f"{name} must be a float tensor [N, C, H, W], got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        bad = (~torch.isfinite(x.detach()).flatten(1).all(1)).sum().item()  # [N] -> count
        if bad:  # else it surfaces as "probs must be finite" from deep inside the Inception Score
            raise ValueError(f"{name} has {bad} of {x.shape[0]} images with NaN or inf pixels; "
                             f"{'the model produced non-finite outputs' if name == 'generated' else 'bad input'}")
    if generated.shape != originals.shape:
        raise ValueError(f"generated and originals must have one shape (pairs), got {tuple(generated.shape)} "
                         f"and {tuple(originals.shape)}")
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.is_floating_point() or labels.shape != (generated.shape[0],):
        raise ValueError(f"labels must be integer digits [N] = [{generated.shape[0]}], got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    forget = np.asarray(sorted({int(d) for d in forget_digits}), dtype=np.int64)
    if forget.size == 0:
        raise ValueError("forget_digits is empty")
    return labels.long(), forget


def _set_metrics(gen: torch.Tensor, orig: torch.Tensor, labels: torch.Tensor, classifier,
                 is_splits: Optional[int]) -> dict:
    n = gen.shape[0]
    gen_probs, orig_probs = classifier.probs(gen).cpu(), classifier.probs(orig).cpu()  # [n, 10]
    splits = default_is_splits(n) if is_splits is None else min(int(is_splits), n)
    is_mean, is_std = inception_score_from_probs(gen_probs, splits=splits)
    gen_feat, orig_feat = classifier.features(gen).cpu(), classifier.features(orig).cpu()  # [n, F]
    return {
        "n": int(n),
        "domain_fid": fid_from_features(gen_feat, orig_feat) if n >= 2 else None,
        "domain_is": is_mean, "domain_is_std": is_std, "domain_is_splits": int(splits),
        "domain_cosine": paired_cosine_mean(classifier.embed(gen).cpu(), classifier.embed(orig).cpu()),
        "recognition_rate": float((gen_probs.argmax(-1) == labels).double().mean()),
        "originals_recognition_rate": float((orig_probs.argmax(-1) == labels).double().mean()),
    }


def domain_metrics(generated: torch.Tensor, originals: torch.Tensor, labels, classifier,
                   forget_digits: Sequence[int], is_splits: Optional[int] = None) -> dict:
    """{"forget": {...}, "retain": {...}, "note": NOTE, "classifier": {...}} for paired images.

    generated, originals: [N, C, 32, 32] in [0, 1] (pairs by row); labels: digits [N]; classifier: a
    :class:`~unlearn_fast.eval.digit_classifier.DigitClassifier`. A set with no images is left out.
    ``is_splits``: IS splits per set (default: see module docstring).
    """
    labels, forget = _check_inputs(generated, originals, labels, forget_digits)
    if is_splits is not None and (not isinstance(is_splits, int) or is_splits < 1):
        raise ValueError(f"is_splits must be a positive integer or None, got {is_splits!r}")
    in_forget = torch.from_numpy(np.isin(labels.numpy(), forget))  # [N] bool
    out = {}
    for name, rows in (("forget", in_forget), ("retain", ~in_forget)):
        idx = torch.nonzero(rows).flatten()
        if len(idx):
            out[name] = _set_metrics(generated.index_select(0, idx.to(generated.device)),
                                     originals.index_select(0, idx.to(originals.device)), labels[idx],
                                     classifier, is_splits)
    out["note"] = NOTE
    info = getattr(classifier, "train_info", {}) or {}
    out["classifier"] = {"heldout_accuracy": info.get("heldout_accuracy"), "path": info.get("path")}
    return out


@torch.no_grad()
def reconstruct_in_chunks(model, images: torch.Tensor, task, chunk: int = RECONSTRUCT_CHUNK) -> torch.Tensor:
    """``model.reconstruct`` of ``images [N, C, H, W]`` under ``task`` (a TaskDraw for the N rows), in eval
    mode and chunks of ``chunk`` rows on the model's device; returns [N, C, H, W] on the CPU."""
    if not hasattr(model, "reconstruct"):
        raise TypeError(f"{type(model).__name__} has no reconstruct(images, task); domain metrics of a model "
                        f"need one (MAE has it)")
    parts = apply_in_chunks(model, images, task, lambda m, x, t: m.reconstruct(x, t).float().cpu(), chunk)
    return torch.cat(parts)


def domain_metrics_of_model(model, originals: torch.Tensor, task, labels, classifier,
                            forget_digits: Sequence[int], is_splits: Optional[int] = None) -> dict:
    """:func:`domain_metrics` of ``model``'s reconstructions of ``originals`` under the fixed ``task``."""
    recon = reconstruct_in_chunks(model, originals, task)
    return domain_metrics(recon, originals.detach().float().cpu(), labels, classifier, forget_digits, is_splits)


__all__ = ["domain_metrics", "domain_metrics_of_model", "reconstruct_in_chunks", "default_is_splits", "NOTE"]
