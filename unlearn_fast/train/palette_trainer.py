"""The Palette epoch loop and its outputs, in the reference layout (REFERENCE.md §3.4).

    <base_dir>/<run name>/config.json
                         /train.log                      "yy-mm-dd HH:MM:SS.mmm - INFO: train/mse_loss: 0.0123\t"
                         /checkpoint/{epoch}_Network.pth  buffers + denoise_fn.* (+ teacher_denoise_fn.*)
                         /checkpoint/{epoch}_Network_ema.pth   denoise_fn.* only
                         /checkpoint/{epoch}.state        {'epoch', 'iter', 'schedulers': [], 'optimizers': [Adam]}

Epochs are numbered 1..n_epoch as the reference numbers them, but exactly ``n_epoch`` run: the reference's
``while epoch <= n_epoch`` runs one more (§11). No per-epoch validation sampling (the reference samples its
2 held-out images with all 2000 steps after every epoch, §7 item 14); use ``palette-test`` on a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Iterable, List, Optional

import torch

from ..models.palette import as_palette_batch
from .checkpoint import atomic_save
from .palette_steps import PaletteSetup, palette_fast_step, palette_reference_step
from .step_reference import NonFiniteLossError

PALETTE_STEP_MODES = ("fast", "reference")


def palette_run_dir_name(opt_name: str, learn_others: int, fix_decoder: int, forget_alpha: float, max_loss: int,
                         learn_noise: int, stamp: Optional[str] = None) -> str:
    """The reference's run-directory name:
    ``{opt_name}_learn_others_{lo}_fixdecoder_{fd}_falpha_{α}_{yymmdd_HHMMSS}{_max_loss|_min_loss}_learn_noise_{ln}``;
    ``opt_name`` is the reference's ``opt['name']``: ``train_<config name>`` (``debug_<config name>`` with -d)."""
    stamp = stamp or time.strftime("%y%m%d_%H%M%S")
    post = "_max_loss" if max_loss else "_min_loss"
    return (f"{opt_name}_learn_others_{learn_others}_fixdecoder_{fix_decoder}_falpha_{forget_alpha}_"
            f"{stamp}{post}_learn_noise_{learn_noise}")


class PaletteRunLog:
    """``train.log`` lines in the reference's logging format (appended, flushed per line)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def info(self, message: str) -> None:
        if self.path is None:
            return
        now = time.time()
        stamp = time.strftime("%y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        with open(self.path, "a") as fh:
            fh.write(f"{stamp} - INFO: {message}\n")

    def value(self, key: str, value) -> None:
        self.info("{:5s}: {}\t".format(str(key), value))


def write_config_json(run_dir: str, config: dict) -> None:
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=4, sort_keys=False, default=str)


def save_palette_epoch(checkpoint_dir: str, epoch: int, iters: int, setup: PaletteSetup) -> List[str]:
    """The three files of one epoch, each written atomically. Returns their paths."""
    net_path = os.path.join(checkpoint_dir, f"{epoch}_Network.pth")
    atomic_save({k: v.detach().cpu() for k, v in setup.network.state_dict().items()}, net_path)
    paths = [net_path]
    if setup.ema is not None:
        paths.append(os.path.join(checkpoint_dir, f"{epoch}_Network_ema.pth"))
        atomic_save(setup.ema.state_dict(), paths[-1])
    paths.append(os.path.join(checkpoint_dir, f"{epoch}.state"))
    atomic_save({"epoch": int(epoch), "iter": int(iters), "schedulers": [],
                 "optimizers": [setup.optimizer.state_dict()]}, paths[-1])
    return paths


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def palette_train_loop(setup: PaletteSetup, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, *,
                       n_epoch: int, run_dir: Optional[str] = None, checkpoint_subdir: str = "checkpoint",
                       step_mode: str = "fast", readback_every: int = 20, progress: bool = True,
                       log_iter: float = 1e4, save_checkpoint_epoch: int = 1) -> List[dict]:
    """Run epochs 1..``n_epoch``. ``epoch_batches(epoch)`` yields ``(sample dict, labels)`` with the reference's
    keys (gt_image, cond_image, mask) and labels +1 retain / −1 forget. Returns one stats dict per epoch."""
    if step_mode not in PALETTE_STEP_MODES:
        raise ValueError(f"unknown step mode {step_mode!r}; valid: {', '.join(PALETTE_STEP_MODES)}")
    if steps_per_epoch < 1 or n_epoch < 1 or readback_every < 1 or save_checkpoint_epoch < 1:
        raise ValueError(f"need steps_per_epoch, n_epoch, readback_every, save_checkpoint_epoch >= 1; got "
                         f"{steps_per_epoch}, {n_epoch}, {readback_every}, {save_checkpoint_epoch}")
    log = PaletteRunLog(os.path.join(run_dir, "train.log") if run_dir else None)
    ckpt_dir = None
    if run_dir:
        ckpt_dir = os.path.join(run_dir, checkpoint_subdir)
        os.makedirs(ckpt_dir, exist_ok=True)
    history, iters, logged_at = [], 0, 0
    for epoch in range(1, n_epoch + 1):
        bar = _progress(steps_per_epoch, progress, f"epoch {epoch}/{n_epoch}")
        sums = torch.zeros(3, dtype=torch.float64)  # loss, retain, forget over the epoch
        pending = torch.zeros(3, device=setup.device)  # on the device until the next read-back
        n_pending = n_steps = images = 0
        t0 = time.perf_counter()

        def read_back(last_step: int) -> None:  # the only host sync of the fast path
            nonlocal n_pending, logged_at
            vals = pending.to("cpu", torch.float64)
            pending.zero_()
            if not all(math.isfinite(v) for v in vals.tolist()):
                raise NonFiniteLossError(f"loss became non-finite within steps {last_step - n_pending + 1}.."
                                         f"{last_step} (epoch {epoch}); stopping. Checkpoints already written are "
                                         "intact.")
            sums.add_(vals)
            if bar is not None:
                bar.set_postfix(loss=f"{vals[0].item() / n_pending:.4g}",
                                img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.1f}")
            n_pending = 0
            if int(iters // log_iter) > int(logged_at // log_iter):  # passed a multiple of log_iter images
                log.value("train/mse_loss", sums[0].item() / n_steps)  # the epoch's running mean
                logged_at = iters

        step = (epoch - 1) * steps_per_epoch
        for it, (sample, labels) in enumerate(epoch_batches(epoch)):
            if it >= steps_per_epoch:
                break
            step = (epoch - 1) * steps_per_epoch + it
            batch = as_palette_batch(sample)
            is_forget = torch.as_tensor(labels) < 0  # s = -1 (CPU)
            if step_mode == "reference":
                out = palette_reference_step(setup, batch, is_forget, step)
            else:
                out = palette_fast_step(setup, batch, is_forget, step)
            pending += torch.stack(list(out))
            n_pending += 1
            n_steps += 1
            iters += batch.gt.shape[0]
            images += batch.gt.shape[0]
            if n_pending >= readback_every:
                read_back(step)
            if bar is not None:
                bar.update(1)
        if n_pending:
            read_back(step)
        if bar is not None:
            bar.close()
        if n_steps == 0:
            raise ValueError(f"epoch {epoch} produced no batches")
        stats = {"train/mse_loss": sums[0].item() / n_steps, "epoch": epoch, "iters": iters,
                 "train/retain_loss": sums[1].item() / n_steps, "train/forget_loss": sums[2].item() / n_steps}
        history.append(stats)
        for key in ("train/mse_loss", "epoch", "iters"):
            log.value(key, stats[key])
        if ckpt_dir is not None and epoch % save_checkpoint_epoch == 0:
            log.info(f"Saving the self at the end of epoch {epoch:.0f}")
            save_palette_epoch(ckpt_dir, epoch, iters, setup)
        print(f"epoch {epoch}: train/mse_loss {stats['train/mse_loss']:.6g} (retain {stats['train/retain_loss']:.6g}, "
              f"forget {stats['train/forget_loss']:.6g}), {iters} images so far", flush=True)
    log.info("Number of Epochs has reached the limit, End.")
    return history


__all__ = ["palette_train_loop", "palette_run_dir_name", "save_palette_epoch", "write_config_json",
           "PaletteRunLog", "PALETTE_STEP_MODES"]
