"""The epoch loop: lr schedule per iteration, the chosen step, progress bar, log.txt, checkpoints."""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, List, Optional

import torch

from .checkpoint import save_unlearn_checkpoint
from .lr_schedule import lr_at, set_lr
from .run_outputs import append_log_line
from .step_baseline import baseline_step
from .step_fast import fast_step
from .step_graphed import GraphedUnlearnStep
from .step_reference import NonFiniteLossError, reference_step
from .unlearn_setup import UnlearnSetup

STEP_MODES = ("auto", "reference", "fast", "graphed")


def resolve_step_mode(mode: str, setup_device: torch.device, loss_type, accum_iter: int, balanced: bool) -> str:
    if mode not in STEP_MODES:
        raise ValueError(f"unknown --step {mode!r}; valid: {', '.join(STEP_MODES)}")
    if loss_type is not None:
        if mode in ("fast", "graphed"):
            print(f"unlearn_fast: baselines run the reference-semantics step (--step {mode} ignored)")
        return "reference"
    if mode == "graphed" and (setup_device.type != "cuda" or accum_iter != 1 or not balanced):
        why = ("no CUDA device" if setup_device.type != "cuda" else
               "--accum_iter > 1" if accum_iter != 1 else "batches are not balanced (use --forget_per_batch)")
        print(f"unlearn_fast: CUDA-graph step unavailable ({why}); using the fast eager step")
        return "fast"
    if mode == "auto":
        return "graphed" if setup_device.type == "cuda" and accum_iter == 1 and balanced else "fast"
    return mode


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def train_loop(setup: UnlearnSetup, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, *,
               epochs: int, lr: float, min_lr: float = 0.0, warmup_epochs: float = 0.0, start_epoch: int = 0,
               start_step_in_epoch: int = 0, output_dir: Optional[str] = None, args_dict: Optional[dict] = None,
               step_mode: str = "fast", readback_every: int = 20, progress: bool = True,
               save_every_epoch: bool = True, noise_seed: Optional[int] = None, forget_per_batch: Optional[int] = None,
               batch_size: Optional[int] = None, image_shape=None, on_epoch_end: Optional[Callable] = None
               ) -> List[dict]:
    """Run epochs ``start_epoch .. epochs-1``. ``epoch_batches(epoch)`` yields ``(images, labels)`` with labels
    ±100 (forget < 100, as the reference). Returns the per-epoch stats written to ``log.txt``."""
    if steps_per_epoch < 1:
        raise ValueError("the data gives no full batch: lower --batch_size or add images")
    graphed = None
    if step_mode == "graphed":
        graphed = GraphedUnlearnStep(setup, batch_size, forget_per_batch, image_shape,
                                     noise_seed=setup.seed if noise_seed is None else noise_seed)
    history = []
    accum = setup.accum_iter
    for epoch in range(start_epoch, epochs):
        bar = _progress(steps_per_epoch, progress, f"epoch {epoch + 1}/{epochs}")
        sums = torch.zeros(3, dtype=torch.float64)
        pending = torch.zeros(3, device=setup.device)
        n_pending = n_steps = 0
        lr_sum = 0.0
        t0, images_seen = time.perf_counter(), 0
        first = start_step_in_epoch if epoch == start_epoch else 0
        for it, (images, labels) in enumerate(epoch_batches(epoch), start=first):
            if it >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + it
            cur_lr = lr_at(it / steps_per_epoch + epoch, lr, min_lr, warmup_epochs, epochs)
            if it % accum == 0:
                set_lr(setup.optimizer, cur_lr)
            is_forget = labels < 100  # s = +1 iff label >= 100 (reference)
            update = (it + 1) % accum == 0
            if graphed is not None:
                graphed(images, is_forget, step, cur_lr)
            elif step_mode == "reference":
                fn = baseline_step if setup.loss_type is not None else reference_step
                out = fn(setup, images, is_forget, step, update)
                pending += torch.stack(list(out)).to(pending.device)
            else:
                out = fast_step(setup, images, is_forget, step, update, noise_seed=noise_seed)
                pending += torch.stack(list(out))
            n_pending += 1
            n_steps += 1
            lr_sum += cur_lr
            images_seen += images.shape[0]
            last = it == steps_per_epoch - 1
            if n_pending >= readback_every or last:
                vals = graphed.read_and_reset() if graphed is not None else pending.to("cpu", copy=True)
                pending.zero_()
                if not all(math.isfinite(v) for v in vals.tolist()):
                    raise NonFiniteLossError(f"loss became non-finite within steps {step - n_pending + 1}..{step} "
                                             f"(epoch {epoch}); stopping. The last saved checkpoint is intact.")
                sums += vals.double()
                if bar is not None:
                    rate = images_seen / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{vals[0].item() / n_pending:.4f}", lr=f"{cur_lr:.2e}",
                                    img_s=f"{rate:.1f}")
                n_pending = 0
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if n_steps == 0:
            raise ValueError(f"epoch {epoch} produced no batches")
        stats = {"train_lr": lr_sum / n_steps, "train_retain_l2_loss": sums[1].item() / n_steps,
                 "train_forget_l2_loss": sums[2].item() / n_steps, "train_loss": sums[0].item() / n_steps,
                 "epoch": epoch}
        history.append(stats)
        if output_dir is not None:
            if save_every_epoch:
                position = {"global_step": (epoch + 1) * steps_per_epoch, "epoch": epoch,
                            "next_epoch": epoch + 1, "step_in_epoch": 0}
                save_unlearn_checkpoint(output_dir, epoch, setup.student, setup.optimizer, setup.scaler,
                                        args_dict, [n for n, p in setup.student.named_parameters()
                                                    if p.requires_grad], position)
            append_log_line(output_dir, stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
        print(f"epoch {epoch}: loss {stats['train_loss']:.5f} retain {stats['train_retain_l2_loss']:.5f} "
              f"forget {stats['train_forget_l2_loss']:.5f} lr {stats['train_lr']:.3e}", flush=True)
    return history


__all__ = ["train_loop", "resolve_step_mode", "STEP_MODES"]
