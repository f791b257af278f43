"""Evaluation during unlearning (``--eval_every N``, N in epochs), with keep-best weights.

Plugs into the trainer's per-epoch hook: ``train_loop(..., on_epoch_end=evaluator)``. The unit is the epoch
because that is where the hook is (a step-level hook would need the trainer to sync mid-epoch); with the
demo's single long epoch, run more epochs of fewer steps to evaluate more often. Evaluation runs after
epochs ``every-1, 2*every-1, ...`` (0-based; i.e. after every ``every``-th epoch) and, when ``epochs`` is
given, always after the last one.

What it measures, on a small held-out set the caller passes (images never trained on, flagged forget or
retain): the per-image task error of the model under *fixed* task draws (drawn once from ``mask_seed`` with
the family's ``sample_task`` and a CPU generator, so every evaluation sees the same masks):

- MAE (default ``score_fn``): the inpainting MSE over the hidden pixels (all channels) of ``reconstruct``,
  pixels in [0, 1].
- Any other family with ``task_loss_terms`` (MAGE: the label-smoothed cross-entropy of the true VQ token ids
  at the masked positions, i.e. how well the model predicts the hidden content): :func:`family_task_errors`.
- Or pass ``score_fn(model, images, task) -> per-image error [n]``.

``retain_mse`` / ``forget_mse`` are the means over each set (named ``mse`` for every family; for MAGE they
hold the token cross-entropy); ``*_before`` are measured when the evaluator is built, on
``reference_model`` when given (the frozen teacher, so a resumed run compares with the original model), else
on ``model`` (then build the evaluator before training starts). Criterion ``forget_gap`` (higher is better):

    forget_gap = forget_mse / forget_mse_before - retain_mse / retain_mse_before

the relative rise of the forget error minus that of the retain error: unlearning should raise the first and
keep the second at 1. The epoch with the highest gap so far (ties keep the earlier) has its trainable
parameters (``requires_grad``; for unlearning, the encoder) saved atomically to ``<output_dir>/best.pth``
as ``{"model": state_dict, "epoch", "criterion", "score", "metrics"}``. Every evaluation appends one JSON
line to ``<output_dir>/eval_log.txt`` (the first, ``"epoch": null, "phase": "before"``, at construction).

    evaluator = PeriodicEvaluator(setup.student, held_images, held_is_forget, mask_seed=0, every=2,
                                  output_dir=out, epochs=args.epochs)
    train_loop(setup, batches, steps, epochs=args.epochs, lr=lr, on_epoch_end=evaluator)
    evaluator.best   # {"epoch": ..., "score": ..., "metrics": {...}} or None
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, List, Optional

import torch
from torch import nn

from ..atomic_files import atomic_save
from ..models.state_dict_io import read_checkpoint
from ..train.checkpoint import load_model_state
from .chunked import apply_in_chunks
from ..train.seeding import derive_seed

CRITERIA = ("forget_gap",)  # all higher-is-better
EVAL_CHUNK = 256


@torch.no_grad()
def mae_inpaint_errors(model: nn.Module, images: torch.Tensor, task) -> torch.Tensor:
    """Per-image MSE [n] over the hidden pixels (every channel) of ``model.reconstruct(images, task)``."""
    recon = model.reconstruct(images, task).float()  # [n, C, H, W]
    _, mask, _ = model.mask_from_task(task)  # [n, L], 1 = hidden
    per_patch = mask.unsqueeze(-1).expand(-1, -1, model.patch_embed.patch_size ** 2 * model.in_chans)
    hidden = model.unpatchify(per_patch.float())  # [n, C, H, W]
    sq = (recon - images.float()).pow(2) * hidden
    return sq.flatten(1).sum(1) / hidden.flatten(1).sum(1).clamp_min(1.0)  # [n]


@torch.no_grad()
def family_task_errors(model: nn.Module, images: torch.Tensor, task) -> torch.Tensor:
    """Per-image [n] mean of the family's own training loss over its weighted (hidden) positions."""
    loss, weight = model.task_loss_terms(model.prepare_inputs(images), task)  # [n, L'], [n, L']
    weight = weight.float()
    return (loss.float() * weight).sum(1) / weight.sum(1).clamp_min(1e-12)


def _default_score_fn(model: nn.Module) -> Callable:
    if all(hasattr(model, a) for a in ("reconstruct", "mask_from_task", "unpatchify", "patch_embed")):
        return mae_inpaint_errors
    if all(hasattr(model, a) for a in ("task_loss_terms", "prepare_inputs")):
        return family_task_errors
    raise TypeError(f"no default evaluation for {type(model).__name__}: pass score_fn(model, images, task) "
                    f"-> per-image error [n]")


@torch.no_grad()
def per_image_errors(model: nn.Module, images: torch.Tensor, task, score_fn: Optional[Callable] = None,
                     chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Per-image errors [n] (fp64, CPU) of ``model`` in eval mode on CPU ``images`` under the draw ``task``,
    ``chunk`` images at a time on the model's device. ``score_fn``: default by family (module docstring)."""
    score_fn = _default_score_fn(model) if score_fn is None else score_fn
    n = images.shape[0]
    errs = []
    sizes = [min(chunk, n - lo) for lo in range(0, n, chunk)]
    for e, size in zip(apply_in_chunks(model, images, task, score_fn, chunk), sizes):
        e = torch.as_tensor(e)
        if e.shape != (size,):
            raise ValueError(f"score_fn must return one error per image [{size}], got shape {tuple(e.shape)}")
        errs.append(e.detach().double().cpu())
    return torch.cat(errs)


class PeriodicEvaluator:
    """Callable ``(epoch, stats)`` for ``train_loop(on_epoch_end=...)``; see the module docstring."""

    def __init__(self, model: nn.Module, holdout_images: torch.Tensor, holdout_is_forget, mask_seed: int,
                 every: int, criterion: str = "forget_gap", output_dir: Optional[str] = None, *,
                 score_fn: Optional[Callable] = None, epochs: Optional[int] = None,
                 max_per_set: Optional[int] = None, reference_model: Optional[nn.Module] = None,
                 announce: bool = False):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every (--eval_every) must be an integer >= 1 epochs, got {every!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
        if not torch.is_tensor(holdout_images) or holdout_images.ndim < 1 or not holdout_images.is_floating_point():
            raise ValueError("holdout_images must be a float tensor [N, C, H, W]")
        is_forget = torch.as_tensor(holdout_is_forget).detach().cpu()
        if is_forget.dtype != torch.bool or is_forget.shape != (holdout_images.shape[0],):
            raise ValueError(f"holdout_is_forget must be a bool tensor [N] = [{holdout_images.shape[0]}], got "
                             f"{is_forget.dtype} of shape {tuple(is_forget.shape)}")
        if max_per_set is not None and (not isinstance(max_per_set, int) or max_per_set < 1):
            raise ValueError(f"max_per_set must be a positive integer or None, got {max_per_set!r}")
        self.model, self.every, self.criterion, self.output_dir = model, every, criterion, output_dir
        self.announce = announce  # one console line per evaluation (the command line)
        self.epochs = epochs
        self.score_fn = score_fn if score_fn is not None else _default_score_fn(model)
        self.sets = {}
        for name, rows in (("retain", ~is_forget), ("forget", is_forget)):
            idx = torch.nonzero(rows).flatten()[:max_per_set]  # the first max_per_set of each set
            if len(idx) == 0:
                raise ValueError(f"the held-out set has no {name} images; both sets are needed for {criterion}")
            images = holdout_images.detach().index_select(0, idx.to(holdout_images.device)).cpu()
            g = torch.Generator().manual_seed(derive_seed(mask_seed, "periodic_eval", name))
            self.sets[name] = (images, model.sample_task(images, g))  # fixed draws, CPU
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
        self.history: List[dict] = []
        self.best: Optional[dict] = None
        self.before = self.evaluate(reference_model)
        for name in ("retain", "forget"):
            if not self.before[f"{name}_mse"] > 0:
                raise ValueError(f"the model's {name} error before training is {self.before[f'{name}_mse']}; "
                                 f"{criterion} divides by it")
        self._log(dict(epoch=None, phase="before", **self.before))

    @property
    def best_path(self) -> Optional[str]:
        return None if self.output_dir is None else os.path.join(self.output_dir, "best.pth")

    def should_evaluate(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or (self.epochs is not None and epoch == self.epochs - 1)

    @torch.no_grad()
    def evaluate(self, model: Optional[nn.Module] = None) -> dict:
        """{"retain_mse", "forget_mse"}: mean per-image error of each held-out set under the fixed draws, of
        ``model`` (default: the model being trained)."""
        model = self.model if model is None else model
        out = {}
        for name, (images, task) in self.sets.items():
            value = per_image_errors(model, images, task, self.score_fn).mean().item()
            if not math.isfinite(value):
                raise ValueError(f"the {name} error is not finite ({value})")
            out[f"{name}_mse"] = value
        return out

    def score(self, metrics: dict) -> float:
        """The criterion's value (higher is better) for metrics from :meth:`evaluate`."""
        return (metrics["forget_mse"] / self.before["forget_mse"]
                - metrics["retain_mse"] / self.before["retain_mse"])

    def __call__(self, epoch: int, stats: Optional[dict] = None) -> Optional[dict]:
        """Evaluate if ``epoch`` is due (see :meth:`should_evaluate`); returns the logged record or None."""
        if not self.should_evaluate(epoch):
            return None
        metrics = self.evaluate()
        score = self.score(metrics)
        improved = self.best is None or score > self.best["score"]
        record = dict(epoch=int(epoch), phase="train", **metrics,
                      retain_ratio=metrics["retain_mse"] / self.before["retain_mse"],
                      forget_ratio=metrics["forget_mse"] / self.before["forget_mse"],
                      **{self.criterion: score}, best=improved)
        if stats:
            record["train"] = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        if improved:
            self.best = {"epoch": int(epoch), "score": score, "metrics": metrics}
            if self.output_dir is not None:
                self._save_best(epoch, score, metrics)
        self.history.append(record)
        self._log(record)
        if self.announce:
            print(f"eval epoch {epoch}: forget error x{record['forget_ratio']:.3f}, retain "
                  f"x{record['retain_ratio']:.3f} of the original model; {self.criterion} {score:.4f}"
                  + (" (best so far)" if improved else ""))
        return record

    def _save_best(self, epoch: int, score: float, metrics: dict) -> None:
        state = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}
        atomic_save({"model": state, "epoch": int(epoch), "criterion": self.criterion, "score": float(score),
                     "metrics": dict(metrics)}, self.best_path)

    def _log(self, record: dict) -> None:
        if self.output_dir is not None:
            with open(os.path.join(self.output_dir, "eval_log.txt"), "a") as fh:
                fh.write(json.dumps(record) + "\n")


def load_best_weights(model: nn.Module, path: str) -> dict:
    """Load a ``best.pth`` (trainable parameters only) into ``model``; returns the file's dict."""
    blob = read_checkpoint(path)
    state = blob.get("model") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a best.pth written by PeriodicEvaluator (no 'model' dict)")
    full = model.state_dict()
    unknown = [k for k in state if k not in full]
    if unknown:
        raise ValueError(f"{path} holds {len(unknown)} parameters the model lacks, e.g. {unknown[:3]}")
    full.update(state)
    load_model_state(model, full, path)
    return blob


__all__ = ["PeriodicEvaluator", "mae_inpaint_errors", "family_task_errors", "per_image_errors", "load_best_weights",
           "CRITERIA"]
