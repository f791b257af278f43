"""The Palette epoch loop and its outputs, in the reference layout (REFERENCE.md §3.4).

    <base_dir>/<run name>/config.json
                         /train.log                      "yy-mm-dd HH:MM:SS.mmm - INFO: train/mse_loss: 0.0123\t"
                         /code/, /tb_logger/, /results/  the config's other path folders (left empty here)
                         /checkpoint/{epoch}_Network.pth  buffers + denoise_fn.* (+ teacher_denoise_fn.*)
                         /checkpoint/{epoch}_Network_ema.pth   denoise_fn.* only
                         /checkpoint/{epoch}.state        {'epoch', 'iter', 'schedulers': [], 'optimizers': [Adam]}

The test phase (``palette-test``, the reference's ``run.py -p test``) uses ``<ckpt without .pth>/`` as its run
directory: config.json, test.log (appended), the same path folders, and the images in
``results/test/0/<mask_ratio:.2f>/``.

Epochs are numbered 1..n_epoch as the reference numbers them, but exactly ``n_epoch`` run: the reference's
``while epoch <= n_epoch`` runs one more (§11). No per-epoch validation sampling (the reference samples its
2 held-out images with all 2000 steps after every epoch, §7 item 14); use ``palette-test`` on a checkpoint.

Resume (``palette-unlearn --resume_state RUN/checkpoint/3``, or the config's ``path.resume_state``): the three
files of epoch 3 give the student (``denoise_fn.*`` and the schedule buffers), the teacher (the file's
``teacher_denoise_fn.*``: the ORIGINAL model, never a copy of the resumed student, §11), the EMA, the Adam state,
the epoch and ``iter``; training continues with epoch 4 up to ``n_epoch`` in a new run directory, as the
reference's resume does. No generator state is needed: every draw is keyed by (seed, rank, global step) or
(seed, epoch, index), so a resumed run is bit-identical to an uninterrupted one given the same seed and steps
per epoch. unlearn_fast's ``.state`` adds one key to the official four, ``'unlearn_fast'`` (format version,
seed, approach, steps per epoch, global step), used to check that the resume fits; an official ``.state``
without it loads too, with one warning. Only epoch ends are save points (the official layout has no
mid-epoch file). Each problem (a missing or truncated file, an optimizer state of other flags, nothing left
to train) is one CheckpointError/ValueError naming the file, raised before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..atomic_files import atomic_save, atomic_write_text
from ..models.palette import Network, as_palette_batch, load_palette_checkpoint
from .checkpoint import CheckpointError, load_checkpoint_file
from .palette_steps import WITH_TEACHER, PaletteSetup, approach_flags, palette_fast_step, palette_reference_step
from .progress import progress_bar
from .step_reference import NonFiniteLossError

PALETTE_STEP_MODES = ("fast", "reference")
PALETTE_STATE_FORMAT = 1  # version of the 'unlearn_fast' key of {epoch}.state
OFFICIAL_STATE_KEYS = ("epoch", "iter", "schedulers", "optimizers")
TEACHER_PREFIX = "teacher_denoise_fn."
_OPTIMIZER_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")  # this run's choice, not the file's


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
        # UTF-8 whatever the locale; a run folder whose name is not UTF-8 is logged as its own bytes
        with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(f"{stamp} - INFO: {message}\n")

    def value(self, key: str, value) -> None:
        self.info("{:5s}: {}\t".format(str(key), value))


def write_config_json(run_dir: str, config: dict) -> None:
    """``config.json`` as core/praser.py writes it (indent 4, key order kept); atomic, since a test run
    rewrites the one beside its checkpoint."""
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(config, indent=4, sort_keys=False, default=str))


def make_run_folders(run_dir: str, folders: Dict[str, str]) -> None:
    """The config's path folders (code, tb_logger, results, checkpoint, ...) inside ``run_dir``, as the reference
    makes them for every run, train or test; a ValueError names one that cannot be made."""
    for key, sub in folders.items():
        path = os.path.join(run_dir, sub)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create {path!r} (the config's path.{key}): {e.strerror or e}") from None


def log_run_start(log: "PaletteRunLog", run_dir: str, phase: str, n_images: int,
                  resume: Optional["PaletteResume"] = None) -> None:
    """The first lines the reference logs in every run (with 0 validation images: none are held out here); a
    resumed run also names the files it loaded, in the words of core/base_model.py (``Beign`` included)."""
    log.info(f"Create the log file in directory {run_dir}.\n")
    log.info(f"Dataset for {phase} have {n_images} samples.")
    if phase == "train":
        log.info("Dataset for val have 0 samples.")
    if resume is not None:
        for label, path in (("Network", resume.network_path), ("Network_ema", resume.ema_path)):
            if path is not None:
                log.info(f"Beign loading pretrained model [{label}] ...")
                log.info(f"Loading pretrained model from [{path}] ...")
        log.info("Beign loading training states")
        log.info(f"Loading training state for [{resume.state_path}] ...")
    log.info(f"Begin model {phase}.")


def save_palette_epoch(checkpoint_dir: str, epoch: int, iters: int, setup: PaletteSetup,
                       position: Optional[dict] = None) -> List[str]:
    """The three files of one epoch, each written atomically; the ``.state`` last, so a complete ``.state``
    means its two weight files are complete. ``position``: also store the ``'unlearn_fast'`` key (see the
    module docstring). Returns their paths."""
    net_path = os.path.join(checkpoint_dir, f"{epoch}_Network.pth")
    atomic_save({k: v.detach().cpu() for k, v in setup.network.state_dict().items()}, net_path)
    paths = [net_path]
    if setup.ema is not None:
        paths.append(os.path.join(checkpoint_dir, f"{epoch}_Network_ema.pth"))
        atomic_save(setup.ema.state_dict(), paths[-1])
    paths.append(os.path.join(checkpoint_dir, f"{epoch}.state"))
    state = {"epoch": int(epoch), "iter": int(iters), "schedulers": [], "optimizers": [setup.optimizer.state_dict()]}
    if position is not None:
        state["unlearn_fast"] = dict(position, format=PALETTE_STATE_FORMAT, approach=setup.approach,
                                     seed=int(setup.seed))
    atomic_save(state, paths[-1])
    return paths


# ---- resume ------------------------------------------------------------------------------------------
def palette_resume_paths(prefix: str) -> Tuple[str, str, str, str]:
    """``(prefix, prefix_Network.pth, prefix_Network_ema.pth, prefix.state)``; the path of one of the three
    files is accepted as the prefix too."""
    prefix = os.fspath(prefix)
    for suffix in ("_Network_ema.pth", "_Network.pth", ".state"):
        if prefix.endswith(suffix):
            prefix = prefix[:-len(suffix)]
            break
    return prefix, prefix + "_Network.pth", prefix + "_Network_ema.pth", prefix + ".state"


@dataclass
class PaletteResume:
    """The three files of one epoch, read and checked for form (not yet for fit: see
    :func:`check_palette_resume_fits` and :func:`restore_palette_training`)."""
    prefix: str
    network_path: str
    ema_path: Optional[str]                 # None when the run has no EMA
    state_path: str
    network: Dict[str, torch.Tensor]        # schedule buffers + denoise_fn.* (teacher keys removed)
    teacher: Dict[str, torch.Tensor]        # the file's teacher_denoise_fn.*, prefix removed; {} if none
    ema: Optional[Dict[str, torch.Tensor]]  # denoise_fn.*
    epoch: int                              # the last finished epoch
    iters: int                              # images seen so far (the reference's 'iter')
    optimizer: dict                         # the Adam state dict
    position: dict                          # the 'unlearn_fast' key; {} for an official .state

    @property
    def start_epoch(self) -> int:
        return self.epoch + 1


def _tensor_state(path: str) -> Dict[str, torch.Tensor]:
    state = load_checkpoint_file(path)  # CheckpointError naming the file: truncated, empty, not torch
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a plain state dict of tensors (a Palette Network file)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _count(value, key: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{path}: '{key}' must be an integer >= 0, got {value!r}")
    return int(value)


def read_palette_resume(prefix: str, with_ema: bool = True) -> PaletteResume:
    """Read ``{prefix}_Network.pth``, ``{prefix}_Network_ema.pth`` (if ``with_ema``) and ``{prefix}.state``.
    Every file is checked to exist before any is read, so one message lists all the missing ones."""
    prefix, net_path, ema_path, state_path = palette_resume_paths(prefix)
    wanted = [net_path] + ([ema_path] if with_ema else []) + [state_path]
    missing = [p for p in wanted if not os.path.isfile(p)]
    if missing:
        why = " (this run has an EMA: the config's ema_scheduler)" if ema_path in missing else ""
        raise CheckpointError(f"cannot resume from {prefix!r}: missing {', '.join(missing)}{why}; a resume state "
                              f"is the three files {', '.join(os.path.basename(p) for p in wanted)}")
    state = load_checkpoint_file(state_path)
    absent = [k for k in OFFICIAL_STATE_KEYS if k != "schedulers" and k not in state]
    if absent:
        raise CheckpointError(f"{state_path}: not a Palette .state file (no {', '.join(absent)}; expected the keys "
                              f"{', '.join(OFFICIAL_STATE_KEYS)})")
    opts = state["optimizers"]
    if (not isinstance(opts, (list, tuple)) or len(opts) != 1 or not isinstance(opts[0], dict)
            or not {"state", "param_groups"} <= set(opts[0])):
        raise CheckpointError(f"{state_path}: 'optimizers' must be a list holding one Adam state dict (the "
                              f"reference's netG optimizer), got {type(opts).__name__} of "
                              f"{len(opts) if isinstance(opts, (list, tuple)) else '?'}")
    position = state.get("unlearn_fast") or {}
    if not isinstance(position, dict):
        raise CheckpointError(f"{state_path}: the 'unlearn_fast' key must be a dict, got {type(position).__name__}")
    fmt = position.get("format", 0)
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise CheckpointError(f"{state_path}: the 'unlearn_fast' format must be an integer, got {fmt!r}")
    if fmt > PALETTE_STATE_FORMAT:
        raise CheckpointError(f"{state_path} was written by a newer unlearn_fast (state format {position['format']}, "
                              f"this one reads up to {PALETTE_STATE_FORMAT})")
    epoch = _count(state["epoch"], "epoch", state_path)
    named = os.path.basename(prefix)
    if named.isdigit() and int(named) != epoch:  # the files of one save are named by its epoch
        raise CheckpointError(f"{state_path} holds epoch {epoch}, but its name says epoch {int(named)}: files of "
                              f"different saves mixed? Resume from the three files of one epoch "
                              f"({epoch}_Network.pth, {epoch}_Network_ema.pth, {epoch}.state)")
    weights = _tensor_state(net_path)
    teacher = {k[len(TEACHER_PREFIX):]: v for k, v in weights.items() if k.startswith(TEACHER_PREFIX)}
    network = {k: v for k, v in weights.items() if not k.startswith(TEACHER_PREFIX)}
    return PaletteResume(prefix, net_path, ema_path if with_ema else None, state_path, network, teacher,
                         _tensor_state(ema_path) if with_ema else None,
                         epoch, _count(state["iter"], "iter", state_path), opts[0], dict(position))


def check_palette_resume_fits(resume: PaletteResume, approach: str) -> None:
    """The resumed run must be the same approach: the teacher weights are in the file iff the approach has a
    teacher (the reference attaches one iff --fix_decoder or --learn_others), and an unlearn_fast .state names
    its approach."""
    saved = resume.position.get("approach")
    if saved is not None and saved != approach:
        raise CheckpointError(f"{resume.state_path} was saved by a '{saved}' run ({approach_flags(saved)}); this run "
                              f"is '{approach}' ({approach_flags(approach)}): resume with the flags it was saved with")
    if approach in WITH_TEACHER and not resume.teacher:
        raise CheckpointError(f"{resume.network_path} holds no {TEACHER_PREFIX}* weights, so it was saved by a run "
                              f"without a teacher (other --fix_decoder/--learn_others flags?); '{approach}' needs the "
                              "original model as its teacher")
    if approach not in WITH_TEACHER and resume.teacher:
        raise CheckpointError(f"{resume.network_path} holds {TEACHER_PREFIX}* weights, so it was saved by a run with "
                              f"a teacher (--fix_decoder 1 or --learn_others 1); this run is '{approach}' "
                              f"({approach_flags(approach)}), which has none")


def load_resumed_network(network: Network, resume: PaletteResume) -> None:
    """The student and the schedule buffers of ``{prefix}_Network.pth`` into ``network`` (before
    ``build_palette_setup``, which gets ``teacher_state=resume.teacher``)."""
    try:
        load_palette_checkpoint(network, resume.network, ignore_teacher_keys=True)
    except ValueError as e:
        raise CheckpointError(f"{resume.network_path}: {e}") from None


def _check_optimizer_fits(setup: PaletteSetup, saved: dict, path: str) -> None:
    """Adam keeps moments only for parameters that received a gradient: the ones the approach trains. A state
    saved with other flags covers another set (encoder only vs the whole UNet)."""
    groups = saved["param_groups"]
    ids = [i for g in groups for i in g.get("params", [])]
    params = [p for g in setup.optimizer.param_groups for p in g["params"]]
    flags = f"'{setup.approach}' ({approach_flags(setup.approach)})"
    if len(groups) != len(setup.optimizer.param_groups) or len(ids) != len(params):
        raise CheckpointError(f"the optimizer state in {path} covers {len(ids)} parameters in {len(groups)} group(s); "
                              f"this run optimises {len(params)} in {len(setup.optimizer.param_groups)}: saved with "
                              "another UNet config?")
    names = [n for n, p in setup.network.denoise_fn.named_parameters() if p.requires_grad]
    name_of = {i: f"denoise_fn.{n}" for i, n in zip(ids, names)}  # as the keys of {epoch}_Network.pth
    param_of = dict(zip(ids, params))
    trained = set(setup.trained_names)
    expected = {i for i, n in zip(ids, names) if n in trained}
    have = set(saved["state"])
    if have and have != expected:
        extra = sorted(name_of.get(i, str(i)) for i in have - expected)
        lacking = sorted(name_of[i] for i in expected - have)
        detail = "; ".join(f"{len(xs)} {what} (e.g. {xs[0]})" for what, xs in
                           (("outside them", extra), ("of them missing", lacking)) if xs)
        raise CheckpointError(f"the optimizer state in {path} does not match the parameters this run trains: "
                              f"{flags} trains {len(expected)} tensors, the file has Adam moments for {len(have)}: "
                              f"{detail}. Was it saved with other --fix_decoder/--learn_others flags?")
    for i in have:
        for key, value in saved["state"][i].items():
            if key != "step" and torch.is_tensor(value) and value.shape != param_of[i].shape:
                raise CheckpointError(f"the optimizer state in {path}: '{key}' of {name_of[i]} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(param_of[i].shape)}: saved with "
                                      "another UNet config?")


def restore_palette_training(setup: PaletteSetup, resume: PaletteResume) -> None:
    """The resumed EMA and Adam state into ``setup`` (built on the resumed network). The optimizer keeps this
    run's implementation (fused / foreach / single-tensor) and takes the file's hyperparameters, as the
    reference's ``optimizer.load_state_dict`` does."""
    opt = setup.optimizer
    _check_optimizer_fits(setup, resume.optimizer, resume.state_path)  # before anything is changed
    if setup.ema is not None:
        if resume.ema is None:
            raise CheckpointError(f"this run has an EMA but the resume state {resume.prefix!r} was read without it")
        try:
            setup.ema.load_state_dict(resume.ema, resume.ema_path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    impl = [{k: g[k] for k in _OPTIMIZER_IMPL_KEYS if k in g} for g in opt.param_groups]
    lr_before = [g["lr"] for g in opt.param_groups]
    try:
        opt.load_state_dict(resume.optimizer)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the optimizer state in {resume.state_path} does not fit this run: {e}") from None
    for group, keep in zip(opt.param_groups, impl):
        group.update(keep)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:  # fused/capturable Adam keeps 'step' on the parameter's device, the others on CPU
            st = opt.state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(p.device if on_device else "cpu")
    changed = [(b, g["lr"]) for b, g in zip(lr_before, opt.param_groups) if float(b) != float(g["lr"])]
    if changed:
        print(f"unlearn_fast: the learning rate stored in {resume.state_path} ({changed[0][1]:g}) replaces the "
              f"config's ({changed[0][0]:g}), as the reference's resume does")


def palette_resume_start(resume: PaletteResume, n_epoch: int, seed: int, steps_per_epoch: int) -> int:
    """The first epoch to run, after checking there is one; one warning where the continuation cannot be
    exact (an official .state, or another seed or number of steps per epoch)."""
    if resume.epoch >= n_epoch:
        raise ValueError(f"{resume.state_path} already finished epoch {resume.epoch} of train.n_epoch {n_epoch}: "
                         "nothing to do (raise train.n_epoch to train further)")
    pos = resume.position
    if not pos:
        print(f"unlearn_fast: warning: {resume.state_path} is an official .state: the random state of the run "
              f"was not saved; resuming best effort from epoch {resume.start_epoch} with seed {seed} and "
              f"{steps_per_epoch} steps per epoch (identical to an uninterrupted run only if it used the same)")
        return resume.start_epoch
    diffs = [f"{what} {pos[key]} -> {now}" for what, key, now in
             (("seed", "seed", seed), ("steps per epoch", "steps_per_epoch", steps_per_epoch))
             if pos.get(key) is not None and int(pos[key]) != int(now)]
    if diffs:
        print(f"unlearn_fast: warning: resuming {resume.state_path} with {', '.join(diffs)}: data order, masks and "
              "noise differ from the interrupted run")
    return resume.start_epoch


def palette_train_loop(setup: PaletteSetup, epoch_batches: Callable[[int], Iterable], steps_per_epoch: int, *,
                       n_epoch: int, run_dir: Optional[str] = None, checkpoint_subdir: str = "checkpoint",
                       step_mode: str = "fast", readback_every: int = 20, progress: bool = True,
                       log_iter: float = 1e4, save_checkpoint_epoch: int = 1, start_epoch: int = 1,
                       start_iters: int = 0, save_position: bool = False, ema_start: float = 0,
                       ema_iter: int = 1) -> List[dict]:
    """Run epochs ``start_epoch``..``n_epoch`` (1-based). ``epoch_batches(epoch)`` yields ``(sample dict, labels)``
    with the reference's keys (gt_image, cond_image, mask) and labels +1 retain / −1 forget. Returns one stats
    dict per epoch run. A resumed run passes ``start_epoch = resume.start_epoch`` and ``start_iters =
    resume.iters``; step numbers (which key every draw) continue as ``(epoch − 1)·steps_per_epoch + i``.
    ``save_position``: each ``.state`` also gets the ``'unlearn_fast'`` key (the command line always sets it).
    As the reference's ``unlearn_step``, with ``iters`` the images seen after a step: a ``train/mse_loss`` line
    (the epoch's running mean) when ``iters % log_iter == 0``, and an EMA update when ``iters > ema_start`` and
    ``iters % ema_iter == 0`` (the config's ema_scheduler; 1 and 1 update after every step of a batch > 1)."""
    if step_mode not in PALETTE_STEP_MODES:
        raise ValueError(f"unknown step mode {step_mode!r}; valid: {', '.join(PALETTE_STEP_MODES)}")
    if steps_per_epoch < 1 or n_epoch < 1 or readback_every < 1 or save_checkpoint_epoch < 1:
        raise ValueError(f"need steps_per_epoch, n_epoch, readback_every, save_checkpoint_epoch >= 1; got "
                         f"{steps_per_epoch}, {n_epoch}, {readback_every}, {save_checkpoint_epoch}")
    if not ema_iter >= 1 or not ema_start >= 0:
        raise ValueError(f"need ema_iter >= 1 and ema_start >= 0; got {ema_iter}, {ema_start}")
    if not 1 <= start_epoch <= n_epoch or start_iters < 0:
        raise ValueError(f"start_epoch must be in [1, n_epoch={n_epoch}] and start_iters >= 0; got {start_epoch}, "
                         f"{start_iters}")
    log = PaletteRunLog(os.path.join(run_dir, "train.log") if run_dir else None)
    ckpt_dir = None
    if run_dir:
        ckpt_dir = os.path.join(run_dir, checkpoint_subdir)
        os.makedirs(ckpt_dir, exist_ok=True)
    history, iters = [], int(start_iters)
    for epoch in range(start_epoch, n_epoch + 1):
        bar = progress_bar(steps_per_epoch, progress, f"epoch {epoch}/{n_epoch}")
        sums = torch.zeros(3, dtype=torch.float64)  # loss, retain, forget over the epoch
        pending = torch.zeros(3, device=setup.device, dtype=torch.float64)  # summed as the reference's .item()s
        n_pending = n_steps = images = 0
        t0 = time.perf_counter()

        def read_back(last_step: int, log_line: bool = False) -> None:  # the only host sync of the fast path
            nonlocal n_pending
            vals = pending.to("cpu", torch.float64, copy=True)  # a copy: zero_() below must not clear it
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
            if log_line:
                log.value("train/mse_loss", sums[0].item() / n_steps)  # the epoch's running mean

        step = (epoch - 1) * steps_per_epoch
        for it, (sample, labels) in enumerate(epoch_batches(epoch)):
            if it >= steps_per_epoch:
                break
            step = (epoch - 1) * steps_per_epoch + it
            batch = as_palette_batch(sample)
            is_forget = torch.as_tensor(labels) < 0  # s = -1 (CPU)
            seen = iters + batch.gt.shape[0]  # the reference's self.iter after this step
            update_ema = seen > ema_start and seen % ema_iter == 0
            if step_mode == "reference":
                out = palette_reference_step(setup, batch, is_forget, step, update_ema)
            else:
                out = palette_fast_step(setup, batch, is_forget, step, update_ema)
            pending += torch.stack(list(out))
            n_pending += 1
            n_steps += 1
            iters = seen
            images += batch.gt.shape[0]
            log_line = iters % log_iter == 0  # the reference logs at exact multiples of log_iter images
            if n_pending >= readback_every or log_line:
                read_back(step, log_line)
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
            position = dict(steps_per_epoch=steps_per_epoch, global_step=epoch * steps_per_epoch,
                            next_epoch=epoch + 1) if save_position else None
            save_palette_epoch(ckpt_dir, epoch, iters, setup, position)
        print(f"epoch {epoch}: train/mse_loss {stats['train/mse_loss']:.6g} (retain {stats['train/retain_loss']:.6g}, "
              f"forget {stats['train/forget_loss']:.6g}), {iters} images so far", flush=True)
    log.info("Number of Epochs has reached the limit, End.")
    return history


__all__ = ["palette_train_loop", "palette_run_dir_name", "save_palette_epoch", "write_config_json", "make_run_folders",
           "log_run_start",
           "PaletteRunLog", "PALETTE_STEP_MODES", "PALETTE_STATE_FORMAT", "OFFICIAL_STATE_KEYS", "PaletteResume",
           "palette_resume_paths", "read_palette_resume", "check_palette_resume_fits", "load_resumed_network",
           "restore_palette_training", "palette_resume_start"]
