"""The epoch loop: each batch checked, lr schedule per iteration, the chosen step, progress bar, log.txt, checkpoints.

Exact resume: nothing in a step depends on generator state carried from earlier steps. Task draws,
noise and dropout come from generators seeded by (seed, rank, step) at every step, the lr is a function
of the position, and each item's crop/flip is seeded by (seed, epoch, index). A checkpoint therefore
only needs the model, optimizer and scaler states, the position (epoch, step in epoch) and the running
sums of the epoch's log line; the sampler skips the batches already done (``start_step``).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Iterable, List, Optional

import torch

from ..atomic_files import atomic_link_or_copy
from .checkpoint import accumulated_grads, save_unlearn_checkpoint
from .device_prefetch import DevicePrefetcher
from .distributed import DDPStudent, DistContext, all_reduce_mean_
from .loop_inputs import check_output_dir_for_run, checked_batches
from .lr_schedule import lr_at, set_lr
from .progress import progress_bar
from .run_outputs import append_log_line
from .seeding import philox_noise_key
from .step_baseline import baseline_step
from .step_fast import fast_step
from .step_graphed import GraphedUnlearnStep
from .step_reference import NonFiniteLossError, reference_step
from .unlearn_setup import UnlearnSetup, check_int, check_real

STEP_MODES = ("auto", "reference", "fast", "graphed")


def resolve_step_mode(mode: str, setup_device: torch.device, loss_type, accum_iter: int, balanced: bool,
                      world_size: int = 1) -> str:
    """The step a run uses. CUDA graphs need a GPU, --accum_iter 1 and balanced batches; any ``world_size``
    (several ranks run two graphs around an explicit gradient all-reduce, see step_graphed)."""
    if mode not in STEP_MODES:
        raise ValueError(f"unknown --step {mode!r}; valid: {', '.join(STEP_MODES)}")
    if loss_type is not None:
        if mode in ("fast", "graphed"):
            print(f"unlearn_fast: baselines run the reference-semantics step (--step {mode} ignored)")
        return "reference"
    # several ranks (world_size > 1) graph too: two graphs around an all-reduce of one flat gradient buffer
    graph_ok = setup_device.type == "cuda" and accum_iter == 1 and balanced
    if mode == "graphed" and not graph_ok:
        why = ("no CUDA device" if setup_device.type != "cuda" else
               "--accum_iter > 1" if accum_iter != 1 else
               "batches are not balanced (use --forget_per_batch)")
        print(f"unlearn_fast: CUDA-graph step unavailable ({why}); using the fast eager step")
        return "fast"
    if mode == "auto":
        return "graphed" if graph_ok else "fast"
    return mode


class _EpochMeter:
    """Loss sums of one epoch: per-step values stay on the device and are read back (and, with several
    ranks, averaged over ranks) every ``readback_every`` steps, at save points and at the epoch end."""

    def __init__(self, device, graphed, dist: Optional[DistContext], progress: Optional[dict] = None):
        self.pending = torch.zeros(3, device=device)
        self.graphed, self.dist = graphed, dist
        self.sums = torch.zeros(3, dtype=torch.float64)
        self.n_pending = self.n_steps = 0
        self.lr_sum = 0.0
        if progress:  # resumed mid-epoch: the sums so far, so the epoch's log line is the uninterrupted one
            self.sums = torch.tensor(progress["epoch_sums"], dtype=torch.float64)
            self.n_steps, self.lr_sum = int(progress["epoch_steps"]), float(progress["epoch_lr_sum"])

    def add(self, out, lr: float) -> None:
        if out is not None:
            self.pending += torch.stack(list(out)).to(self.pending.device)
        self.n_pending += 1
        self.n_steps += 1
        self.lr_sum += lr

    def flush(self, step: int, epoch: int) -> Optional[torch.Tensor]:
        """Read back; raise NonFiniteLossError if a loss since the last flush was NaN/inf."""
        if self.n_pending == 0:
            return None
        if self.graphed is not None:
            vals = self.graphed.read_and_reset()
        else:
            if self.dist is not None:
                all_reduce_mean_(self.pending, self.dist)
            vals = self.pending.to("cpu", copy=True)
            self.pending.zero_()
        n = self.n_pending
        self.n_pending = 0
        if not all(math.isfinite(v) for v in vals.tolist()):
            raise NonFiniteLossError(f"loss became non-finite within steps {step - n + 1}..{step} (epoch {epoch}); "
                                     "stopping. Checkpoints already written are intact.")
        self.sums += vals.double()
        return vals / n

    def position(self) -> dict:
        return {"epoch_sums": self.sums.tolist(), "epoch_steps": self.n_steps, "epoch_lr_sum": self.lr_sum}


def _weights_finite(setup: UnlearnSetup) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in setup.trainable]).all())


# the reference's whole-model baselines log their MetricLogger meters under these names, in this order
# (engine_baseline.py); the unlearn run and the encoder baselines use the l2 names (engine_unlearn.py)
_PLAIN_LOSS_NAMES = ("max_full_model_loss", "full_model_noise")


def epoch_log_line(loss_type, lr: float, loss: float, retain: float, forget: float, epoch: int) -> dict:
    """One ``log.txt`` line with the reference's keys for ``loss_type`` (None: the paper's objective)."""
    if loss_type in _PLAIN_LOSS_NAMES:
        return {"train_lr": lr, "train_loss": loss, "train_retain_loss": retain, "train_forget_loss": forget,
                "epoch": epoch}
    return {"train_lr": lr, "train_retain_l2_loss": retain, "train_forget_l2_loss": forget, "train_loss": loss,
            "epoch": epoch}


def train_loop(setup: UnlearnSetup, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, *,
               epochs: int, lr: float, min_lr: float = 0.0, warmup_epochs: float = 0.0, start_epoch: int = 0,
               start_step_in_epoch: int = 0, output_dir: Optional[str] = None, args_dict: Optional[dict] = None,
               step_mode: str = "fast", readback_every: int = 20, progress: bool = True,
               save_every_epoch: bool = True, noise_seed: Optional[int] = None, forget_per_batch: Optional[int] = None,
               batch_size: Optional[int] = None, image_shape=None, on_epoch_end: Optional[Callable] = None,
               save_every_steps: Optional[int] = None, epoch_progress: Optional[dict] = None,
               dist: Optional[DistContext] = None, all_reduce_in_graph: bool = False,
               on_checkpoint: Optional[Callable[[str], None]] = None,
               optimizer_layout: Optional[list] = None) -> List[dict]:
    """Run epochs ``start_epoch .. epochs-1`` of ``steps_per_epoch`` steps each, and return the per-epoch stats
    (also written to ``log.txt``).

    ``setup``: from :func:`~unlearn_fast.train.unlearn_setup.build_setup`. ``epoch_batches(epoch)`` returns an
    iterable of ``(images, labels)`` batches: ``images`` a float tensor [N, C, H, W] in the model's range ([0, 1]
    for MAE and MAGE, not normalised), ``labels`` [N] of -100 (forget) / +100 (retain) as the reference (int or
    float; or a bool mask, True = forget; a label in [0, 100) or NaN is refused). Each batch is checked before its
    step, with the epoch and step in the error. At most ``steps_per_epoch`` batches are read per epoch; for
    ``start_epoch`` it must skip the first ``start_step_in_epoch`` batches and give the remaining ones (one that
    ends early is a ValueError, raised before the epoch's log line and checkpoint). An exception of
    ``epoch_batches`` itself (the user's data error) is raised as it is, with a note naming the epoch and step;
    the checkpoints written before it are kept. ``lr`` (> 0): the peak of the schedule (linear warmup over
    ``warmup_epochs``, then a half-cosine to ``min_lr`` at ``epochs``), set every ``accum_iter`` steps.
    ``step_mode``: 'fast' (default), 'reference' or 'graphed' (CUDA; see :func:`resolve_step_mode`).

    ``output_dir``: also write ``log.txt`` (one JSON line per epoch) and ``checkpoint-{epoch}.pth`` /
    ``.safetensors`` after every epoch (``save_every_epoch``); made if missing. A run from its start refuses a
    folder that already holds a run's log.txt or checkpoints (a resumed one, ``start_epoch`` or
    ``start_step_in_epoch`` > 0, writes on into it).
    ``save_every_steps``: also keep ``checkpoint-last.pth`` = the state after every N-th step (at an
    optimizer update) and after every epoch, with the position and ``epoch_progress`` (the running log
    sums) that a resumed run passes back in. ``dist``: several ranks (the student a :class:`DDPStudent`);
    only rank 0 writes and prints. With ``step_mode='graphed'`` the student runs without DDP's reducer and
    the graphed step all-reduces a flat gradient buffer between its two graphs (or, ``all_reduce_in_graph``,
    inside the first one). ``on_checkpoint(path)``: called after each checkpoint file is complete (the newest
    one is what a stopped run resumes from). ``optimizer_layout``: parameter names per AdamW group that the
    checkpoints' optimizer state is saved in (the reference's whole-model optimizer, so that its loader reads
    them; see ``optimizer_state_in_layout``). ``on_epoch_end(epoch, stats)``: called after each epoch's outputs.
    """
    if not isinstance(setup, UnlearnSetup):
        raise TypeError(f"setup must be the UnlearnSetup of build_setup(model, device, ...), got "
                        f"{type(setup).__name__}")
    if not callable(epoch_batches):
        raise TypeError("epoch_batches must be a function of the epoch that returns its (images, labels) batches "
                        f"(e.g. lambda epoch: loader), got {type(epoch_batches).__name__}")
    steps_per_epoch = check_int(steps_per_epoch, "steps_per_epoch", 0)
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (the data gives no full batch: lower "
                         "--batch_size or add images)")
    # a negative epoch would train at a negative lr (warmup of a negative fraction)
    start_epoch, epochs = check_int(start_epoch, "start_epoch", 0), check_int(epochs, "epochs", None)
    if epochs <= start_epoch:
        raise ValueError(f"epochs must be > start_epoch ({start_epoch}), got {epochs}: nothing to train (epochs is "
                         "the total count; the last epoch trained is epochs - 1)")
    start_step_in_epoch = check_int(start_step_in_epoch, "start_step_in_epoch", 0)
    if start_step_in_epoch >= steps_per_epoch:
        raise ValueError(f"start_step_in_epoch must be in [0, {steps_per_epoch}), got {start_step_in_epoch}")
    lr = check_real(lr, "lr", 0.0, above=True)  # a negative lr ascends the loss; NaN poisons the weights
    min_lr, warmup_epochs = check_real(min_lr, "min_lr", 0.0), check_real(warmup_epochs, "warmup_epochs", 0.0)
    readback_every = check_int(readback_every, "readback_every", 1)
    if save_every_steps is not None:
        save_every_steps = check_int(save_every_steps, "--save_every_steps", 1)
    dist = dist if dist is not None and dist.enabled else None
    is_main = dist is None or dist.is_main
    ddp = setup.student if isinstance(setup.student, DDPStudent) else None
    if dist is not None and ddp is None:
        raise ValueError("a multi-rank run needs the student wrapped in DDPStudent")
    if step_mode not in ("reference", "fast", "graphed"):
        raise ValueError(f"step_mode must be 'reference', 'fast' or 'graphed' (resolve 'auto' with "
                         f"resolve_step_mode), got {step_mode!r}")
    if setup.loss_type is not None and step_mode != "reference":
        print(f"unlearn_fast: baselines run the reference-semantics step (step_mode {step_mode!r} ignored)")
        step_mode = "reference"
    writes = output_dir is not None and is_main
    if writes:  # made now, not found missing at the first checkpoint an epoch later
        output_dir = check_output_dir_for_run(output_dir, fresh=start_epoch == 0 and start_step_in_epoch == 0)
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create output_dir {output_dir!r}: {e.strerror}") from None
    # the rank's Philox key for the fused noise, the same in the eager and the graphed step (which always
    # draws Philox noise: keyed by setup.seed when no noise_seed is given)
    noise_key = None if noise_seed is None else philox_noise_key(noise_seed, setup.rank)
    graphed = None
    if step_mode == "graphed":
        if dist is not None:  # DDP's reducer hooks cannot be captured: the step all-reduces the gradients itself
            ddp.use_flat_grads()
        graphed = GraphedUnlearnStep(setup, batch_size, forget_per_batch, image_shape,
                                     noise_seed=philox_noise_key(setup.seed if noise_seed is None else noise_seed,
                                                                 setup.rank), dist=dist,
                                     all_reduce_in_graph=all_reduce_in_graph)
    trainable_names = [n for n, p in setup.student.named_parameters() if p.requires_grad]

    def check_weights(global_step: int) -> None:
        # on every rank (their weights are equal), so all ranks stop together
        if output_dir is not None and not _weights_finite(setup):
            raise NonFiniteLossError(f"the weights became non-finite before the checkpoint at global step "
                                     f"{global_step}; stopping. Checkpoints already written are intact.")

    def save(tag, epoch_done: int, position: dict, safetensors: bool) -> str:
        position = dict(position, steps_per_epoch=steps_per_epoch, seed=setup.seed,
                        world_size=1 if dist is None else dist.world_size)
        # graphed: no accumulation, and with several ranks .grad are views of the (zeroed) flat buffer
        grads = accumulated_grads(setup.student) if graphed is None else {}
        if grads:  # only at an epoch end that is not an update (mid-epoch saves follow an update)
            position["accumulated_grads"] = grads
        path = save_unlearn_checkpoint(output_dir, epoch_done, setup.student, setup.optimizer, setup.scaler,
                                       args_dict, trainable_names, position, tag=tag, safetensors=safetensors,
                                       optimizer_layout=optimizer_layout)
        if on_checkpoint is not None:
            on_checkpoint(path)
        return path

    history = []
    accum = setup.accum_iter
    for epoch in range(start_epoch, epochs):
        setup.student.train(True)  # as the reference's train_one_epoch: a callback may have left it in eval()
        bar = progress_bar(steps_per_epoch, progress and is_main, f"epoch {epoch} ({epoch + 1}/{epochs})")
        first = start_step_in_epoch if epoch == start_epoch else 0
        meter = _EpochMeter(setup.device, graphed, dist, epoch_progress if first else None)
        t0, images_seen = time.perf_counter(), 0
        if graphed is None and first == 0:  # the reference's train_one_epoch starts with zero_grad: a partial window
            # of the last epoch is dropped (a resume inside an epoch keeps its window)
            setup.optimizer.zero_grad(set_to_none=True)
        lr_now = float(setup.optimizer.param_groups[0]["lr"])  # the reference logs the optimizer's lr
        # fast/graphed steps on a GPU: batch k+1's images are copied beside step k (device_prefetch.py)
        source = checked_batches(epoch_batches, epoch, first, steps_per_epoch, setup.student.image_range,
                                 output_dir if writes else None)
        batches = DevicePrefetcher(source, setup.device, limit=steps_per_epoch - first,
                                   enabled=step_mode != "reference")
        try:  # the bar is closed however the epoch ends, so a stop message starts on its own line
            taken = 0  # batches of this epoch run by this call
            for it, (images, is_forget) in enumerate(batches, start=first):  # the limit ends it at steps_per_epoch
                taken += 1
                step = epoch * steps_per_epoch + it
                cur_lr = lr_at(it / steps_per_epoch + epoch, lr, min_lr, warmup_epochs, epochs)
                if it % accum == 0:
                    set_lr(setup.optimizer, cur_lr)
                    lr_now = cur_lr
                update = (it + 1) % accum == 0
                if ddp is not None:
                    ddp.begin_step(step)
                sync = ddp.no_sync() if ddp is not None and not update else contextlib.nullcontext()
                try:
                    with sync:
                        if graphed is not None:
                            graphed(images, is_forget, step, cur_lr)
                            out = None
                        elif step_mode == "reference":
                            fn = baseline_step if setup.loss_type is not None else reference_step
                            out = fn(setup, images, is_forget, step, update)
                        else:
                            out = fast_step(setup, images, is_forget, step, update, noise_seed=noise_key)
                except (ValueError, TypeError) as e:  # e.g. the model refusing a batch's image size: say where
                    e.add_note(f"unlearn_fast: raised by the batch of step {it} of epoch {epoch} (global step {step})")
                    raise
                meter.add(out, lr_now)
                images_seen += images.shape[0]
                last = it == steps_per_epoch - 1
                mid_save = (save_every_steps is not None and update and not last
                            and (step + 1) % save_every_steps == 0)
                if meter.n_pending >= readback_every or last or mid_save:
                    vals = meter.flush(step, epoch)
                    if bar is not None and vals is not None:
                        rate = images_seen / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{vals[0].item():.4f}", lr=f"{cur_lr:.2e}", img_s=f"{rate:.1f}")
                if mid_save and output_dir is not None:
                    check_weights(step + 1)
                    if writes:  # the epoch in progress is unfinished: the reference 'epoch' is the one before
                        save("last", epoch - 1, dict(meter.position(), global_step=step + 1, epoch=epoch,
                                                     next_epoch=epoch, step_in_epoch=it + 1), safetensors=False)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if taken == 0:
            raise ValueError(f"epoch {epoch} produced no batches")
        if first + taken < steps_per_epoch:  # the losses since the last read-back, the epoch's log line, the
            # checkpoint's position and the lr schedule all assume steps_per_epoch steps: stop instead of writing them
            raise ValueError(f"epoch {epoch} produced {first + taken} of its {steps_per_epoch} batches (the batch "
                             "source ended early); stopping. Checkpoints already written are intact.")
        n_steps, sums = meter.n_steps, meter.sums
        loss, retain, forget = (v / n_steps for v in sums.tolist())
        stats = epoch_log_line(setup.loss_type, meter.lr_sum / n_steps, loss, retain, forget, epoch)
        history.append(stats)
        check_weights((epoch + 1) * steps_per_epoch)
        if writes:
            position = {"global_step": (epoch + 1) * steps_per_epoch, "epoch": epoch, "next_epoch": epoch + 1,
                        "step_in_epoch": 0}
            path = None
            if save_every_epoch:
                path = save(None, epoch, position, safetensors=True)
            if save_every_steps is not None:
                last_path = os.path.join(output_dir, "checkpoint-last.pth")
                if path is not None:
                    atomic_link_or_copy(path, last_path)
                    if on_checkpoint is not None:
                        on_checkpoint(last_path)
                else:
                    save("last", epoch, position, safetensors=False)
            append_log_line(output_dir, stats)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
        if is_main:
            print(f"epoch {epoch}: loss {loss:.5f} retain {retain:.5f} forget {forget:.5f} "
                  f"lr {stats['train_lr']:.3e}", flush=True)
    return history


__all__ = ["train_loop", "resolve_step_mode", "STEP_MODES"]
