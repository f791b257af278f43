"""``unlearn-fast unlearn`` / ``unlearn-fast baseline``: the reference trainer's job, end to end.

    unlearn-fast unlearn --model mae_micro --input_size 32 --data_path DIR --forget_classes a \
        --retain_classes b --resume pretrained.pth --save_every_steps 200
    unlearn-fast unlearn ... --resume RUN_DIR/checkpoint-last.pth       # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 4 -m unlearn_fast unlearn ...  # DDP (see train/distributed.py)

Everything that can be checked is checked before the run directory is created, so bad input leaves
nothing half-written. A failure after that and before the first checkpoint (a corrupt image found in
epoch 0, a full disk, a NaN loss, Ctrl-C, SIGTERM) removes the run directory again: a run directory without a
checkpoint is never left behind (except after a SIGKILL, which no process can handle); a failure after a
checkpoint names the newest one to --resume. Only rank 0 writes; it creates the run directory (named with a
timestamp, never shared with another run started in the same second) and sends its name to the other ranks.
SIGINT / SIGTERM end the run with exit code 130 / 143. An official checkpoint-N.pth (optimizer over the
whole model, pickled Namespace args) continues with --resume and --teacher (its optimizer is re-indexed).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import signal
import sys
import threading

import torch

from ..eval.periodic_eval import PeriodicEvaluator
from ..models import create_model, list_models
from ..objective import TRAINS_ENCODER_ONLY
from ..ops import NOISE_KINDS
from ..train.balanced_sampler import BalancedUnlearnSampler, ReferenceShuffleBatchSampler
from ..train.checkpoint import (CheckpointError, args_as_dict, load_checkpoint_file, load_model_state,
                                model_state_from, optimizer_group_names, remap_optimizer_state,
                                restore_accumulated_grads, resume_position)
from ..train.data_split import (FORGET_LABEL, default_class_split, parse_class_list, reference_coco_root,
                                select_unlearning_files)
from ..train.distributed import (DDPStudent, broadcast_object, check_same_on_all_ranks, cleanup_distributed, env_ranks,
                                 init_distributed, peer_failures_explained, rank_device)
from ..train.holdout_split import select_holdout_files
from ..train.image_datasets import (BadImageError, UnlearnImageDataset, load_eval_images, reference_train_transform,
                                    verify_images)
from ..train.lr_schedule import base_lr, effective_batch_size
from ..train.precision import student_dtype
from ..train.run_outputs import (create_run_dir, data_split_difference, data_split_record, read_data_split,
                                 run_dir_name, write_data_split, write_opt_yaml)
from ..train.step_fast import tokenizer_shared_exactly
from ..train.teacher_guides import front_ends_match
from ..train.token_agreement import token_disagreement
from ..train.trainer import resolve_step_mode, train_loop
from ..train.unlearn_setup import build_setup
from .flag_scope import RETIRED_OPT_INS, idle_flags


def resolve_device(spec: str) -> torch.device:
    return rank_device(spec, 0, 1)


def validate_args(args, baseline: bool) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)
    need(args.model in list_models(), f"unknown --model {args.model!r}; registered: {', '.join(list_models())}")
    need(not args.model.startswith("palette"), f"--model {args.model} is a Palette (diffusion) model: use "
         "'unlearn-fast palette-unlearn -c CONFIG ...' (or 'unlearn-fast unlearn --model palette -c CONFIG ...')")
    # NaN/inf would pass the range checks below (or crash the run-dir name) and only surface mid-run
    for flag in FLOAT_FLAGS:
        value = getattr(args, flag, None)
        need(value is None or math.isfinite(value), f"--{flag} must be a finite number, got {value}")
    need(_device_type(args.device) in ("auto", "cpu", "cuda"),
         f"--device {args.device!r} is not supported (use cuda, cuda:N, cpu or auto)")
    need(args.proxy_path is None or args.use_coco, "--proxy_path is read only with --use_coco (the COCO-style proxy "
         "folder); add --use_coco or drop --proxy_path")
    need(args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}")
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    need(args.accum_iter >= 1, f"--accum_iter must be >= 1, got {args.accum_iter}")
    need(0 <= args.start_epoch < args.epochs, f"--start_epoch must be in [0, epochs), got {args.start_epoch}")
    need(args.input_size >= 8, f"--input_size must be >= 8, got {args.input_size}")
    need(args.lr is None or args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.blr > 0, f"--blr must be > 0, got {args.blr}")
    need(args.min_lr >= 0, f"--min_lr must be >= 0, got {args.min_lr}")
    need(args.warmup_epochs >= 0, f"--warmup_epochs must be >= 0, got {args.warmup_epochs}")
    need(args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    need(args.forget_alpha >= 0 and args.retain_alpha >= 0, "--forget_alpha and --retain_alpha must be >= 0")
    need(args.grad_clip is None or args.grad_clip > 0, f"--grad_clip must be > 0, got {args.grad_clip}")
    need(args.num_image_per_class >= 1, f"--num_image_per_class must be >= 1, got {args.num_image_per_class}")
    need(args.retainset_ratio >= 0, f"--retainset_ratio must be >= 0, got {args.retainset_ratio}")
    need(args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}")
    # the reference seeds numpy with seed + rank, which takes [0, 2**32)
    need(0 <= args.seed < 2 ** 32, f"--seed must be in [0, 2**32), got {args.seed}")
    need(0.0 <= args.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.model.startswith("mage"):  # the truncated normal of the mask rate (REFERENCE §1.2 b)
        need(0.0 <= args.mask_ratio_min < args.mask_ratio_max <= 1.0,
             f"--mask_ratio_min / --mask_ratio_max must satisfy 0 <= min < max <= 1, got {args.mask_ratio_min}, "
             f"{args.mask_ratio_max}")
        need(args.mask_ratio_std > 0, f"--mask_ratio_std must be > 0, got {args.mask_ratio_std}")
    for old, off in RETIRED_OPT_INS.items():  # the old opt-in names the default; with its off switch it contradicts
        need(not (getattr(args, old, False) and getattr(args, off, False)),
             f"--{old} and --{off} contradict each other (--{old} is the default now); drop one")
    need(args.readback_every >= 1, f"--readback_every must be >= 1, got {args.readback_every}")
    need(args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
         f"--max_steps_per_epoch must be >= 1, got {args.max_steps_per_epoch}")
    if args.save_every_steps is not None:
        need(args.save_every_steps >= 1, f"--save_every_steps must be >= 1, got {args.save_every_steps}")
        need(args.save_every_steps % args.accum_iter == 0,
             f"--save_every_steps ({args.save_every_steps}) must be a multiple of --accum_iter ({args.accum_iter}): "
             "a checkpoint is taken right after an optimizer update")
    if not baseline:
        need(args.noise_type in NOISE_KINDS,
             f"unknown --noise_type {args.noise_type!r}; valid: {', '.join(NOISE_KINDS)}")
    if args.forget_per_batch is not None:
        need(0 <= args.forget_per_batch <= args.batch_size,
             f"--forget_per_batch must be in [0, batch_size={args.batch_size}], got {args.forget_per_batch}")
    if args.eval_every is not None:
        need(args.eval_every >= 1, f"--eval_every must be >= 1 (epochs), got {args.eval_every}")
    need(args.eval_images >= 1, f"--eval_images must be >= 1, got {args.eval_images}")
    for flag, path in (("--resume", args.resume), ("--teacher", args.teacher), ("--vqgan_ckpt", args.vqgan_ckpt)):
        need(not (path and os.path.isdir(path)), f"{flag} {path} is a directory; pass a checkpoint file")
    if args.resume:
        need(os.path.isfile(args.resume), f"--resume checkpoint not found: {args.resume}")
    if args.teacher:
        need(os.path.isfile(args.teacher), f"--teacher checkpoint not found: {args.teacher}")
    if args.vqgan_ckpt:
        need(os.path.isfile(args.vqgan_ckpt), f"--vqgan_ckpt not found: {args.vqgan_ckpt}")


FLOAT_FLAGS = ("lr", "blr", "min_lr", "warmup_epochs", "weight_decay", "forget_alpha", "retain_alpha", "grad_clip",
               "mask_ratio_min", "mask_ratio_max", "mask_ratio_mu", "mask_ratio_std", "retainset_ratio",
               "opendata_to_forget_ratio", "mask_ratio")


def _device_type(spec: str) -> str:
    if spec == "auto":
        return "auto"
    try:
        return torch.device(spec).type
    except (RuntimeError, ValueError, TypeError):
        return "invalid"


def model_kwargs(args) -> dict:
    kw = {"img_size": args.input_size}
    if args.model.startswith("mage"):
        kw.update(mask_ratio_min=args.mask_ratio_min, mask_ratio_max=args.mask_ratio_max,
                  mask_ratio_mu=args.mask_ratio_mu, mask_ratio_std=args.mask_ratio_std)
    elif args.model.startswith("mae"):
        kw["mask_ratio"] = args.mask_ratio
    return kw


def build_model(args):
    try:
        model = create_model(args.model, **model_kwargs(args))
    except ValueError as e:  # a size or ratio the architecture cannot take: name the flags that set it
        raise ValueError(f"--model {args.model} with --input_size {args.input_size}: {e}") from None
    if args.vqgan_ckpt:
        from ..models.vqgan import load_vqgan_checkpoint
        load_vqgan_checkpoint(model, args.vqgan_ckpt)
    return model


def load_model_from(args, path: str):
    """A model of the run's architecture with the weights of checkpoint ``path`` (strict)."""
    model = build_model(args)
    load_model_state(model, model_state_from(load_checkpoint_file(path), path), path)
    return model


# where the reference looks when --resume is missing (it downloads there; nothing is downloaded here)
REFERENCE_PRETRAINED = {False: "pretrained/mage-vitb-1600.pth", True: "mage-vitb-1600.pth"}


def apply_reference_resume_default(args, baseline: bool) -> None:
    """No --resume: like the reference, unlearn the released MAGE ViT-B checkpoint at its default path (relative
    to the working directory) when it is there; otherwise a randomly initialised model (tests only)."""
    default = REFERENCE_PRETRAINED[baseline]
    if not args.resume and args.model == "mage_vit_base_patch16" and os.path.isfile(default):
        print(f"unlearn_fast: no --resume given: using {default} (the reference's default checkpoint)")
        args.resume = default


def load_training_state(args, model):
    """Load ``--resume``. Returns (resume_ckpt or None, teacher_source path or None)."""
    if not args.resume:
        print("unlearn_fast: no --resume given: unlearning a randomly initialised model (useful only for tests)")
        return None, args.teacher
    ckpt = load_checkpoint_file(args.resume)
    state, own = model_state_from(ckpt, args.resume), model.state_dict()
    if state and set(state) < set(own) and all(tuple(v.shape) == tuple(own[k].shape) for k, v in state.items()):
        # a run's checkpoint-<e>.safetensors or best.pth: right architecture, the trained parameters alone
        raise CheckpointError(f"{args.resume} holds only {len(state)} of the model's {len(own)} tensors (the trained "
                              "parameters a run writes as .safetensors / best.pth), not a whole model: --resume "
                              "takes a run's checkpoint-<epoch>.pth to continue it, or the original model's checkpoint")
    load_model_state(model, state, args.resume)
    is_unlearning_run = "optimizer" in ckpt and "epoch" in ckpt
    if "unlearn_fast" in ckpt and not is_unlearning_run:
        # one of our checkpoints that lost an entry: as a 'pretrained' file it would restart at epoch 0 with the
        # partly unlearned model as the teacher
        missing = " and ".join(repr(k) for k in ("optimizer", "epoch") if k not in ckpt)
        raise CheckpointError(f"{args.resume} is a checkpoint of an unlearning run without its {missing} entry, so "
                              "the run cannot continue from it (damaged?). Resume from another checkpoint of the "
                              "run, or save {'model': ckpt['model']} to start a new unlearning run from its weights")
    if not is_unlearning_run:
        return None, args.teacher or args.resume
    resume_position(ckpt, args.resume)  # a damaged position fails here, before any state is restored
    saved = ckpt.get("args") or {}
    if isinstance(saved, dict) and "unlearn_fast" in ckpt:  # our own run: the objective must be the same
        was, now = saved.get("loss_type"), getattr(args, "loss_type", None)
        if was != now:
            name = {None: "the unlearning objective ('unlearn')"}
            raise CheckpointError(f"{args.resume} was trained with {name.get(was, f'--loss_type {was}')}, this run "
                                  f"uses {name.get(now, f'--loss_type {now}')}; resume it with the same command")
    teacher = args.teacher or (saved.get("teacher_checkpoint") if isinstance(saved, dict) else None)
    if not teacher:
        raise CheckpointError(f"{args.resume} continues an unlearning run but does not record the original "
                              "model; pass it with --teacher (the teacher is never the partly unlearned model)")
    if not os.path.isfile(teacher):
        raise CheckpointError(f"the teacher checkpoint recorded in {args.resume} is missing: {teacher} "
                              "(pass --teacher)")
    return ckpt, teacher


# execution options of the fresh optimizer (fused / capturable for the CUDA-graph step, foreach on GPU), not
# training state: a checkpoint saved on another device or by the official trainer must not overwrite them
_OPTIMIZER_RUNTIME_KEYS = ("foreach", "fused", "capturable", "differentiable")


def restore_optimizer(setup, ckpt: dict, path: str, whole_model_groups=None) -> None:
    """Optimizer and scaler states of an unlearning checkpoint (the lr keeps the type the fresh optimizer
    uses: a device tensor for the CUDA-graph step, a float otherwise; it is set every step anyway).
    ``whole_model_groups``: names per AdamW group of every trainable parameter of the model before the
    encoder-only freeze, the layout of an official checkpoint's optimizer (see ``remap_optimizer_state``)."""
    was = [{k: g[k] for k in ("lr", *_OPTIMIZER_RUNTIME_KEYS) if k in g} for g in setup.optimizer.param_groups]
    saved = ckpt["optimizer"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"the optimizer entry of {path} is a {type(saved).__name__}, not a state dict")
    own_groups = optimizer_group_names(setup.student.named_parameters())
    if whole_model_groups is not None and [len(g) for g in whole_model_groups] != [len(g) for g in own_groups]:
        saved = remap_optimizer_state(saved, whole_model_groups, own_groups) or saved
    try:
        setup.optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the optimizer state in {path} does not fit this run ({e}); was it saved with "
                              "another --model or loss type?") from None
    for group, before in zip(setup.optimizer.param_groups, was):
        for key in _OPTIMIZER_RUNTIME_KEYS:
            if key in before:
                group[key] = before[key]
        if torch.is_tensor(before["lr"]):
            before["lr"].fill_(float(group["lr"]))
            group["lr"] = before["lr"]
        else:
            group["lr"] = float(group["lr"])
    if ckpt.get("scaler"):
        try:
            setup.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"the scaler state in {path} is not a GradScaler state ({e})") from None
    restore_accumulated_grads(setup.student, ckpt)


def resume_point(args, ckpt: dict, steps: int):
    """(start_epoch, start_step_in_epoch, epoch_progress) of a resumed unlearning run."""
    pos = resume_position(ckpt, args.resume)
    start_epoch, start_step = pos["start_epoch"], pos["start_step_in_epoch"]
    if start_step:
        saved = pos.get("steps_per_epoch")
        if saved is not None and int(saved) != steps:
            raise ValueError(f"{args.resume} was saved mid-epoch at step {start_step} of {saved} per epoch, but this "
                             f"run has {steps} steps per epoch: --batch_size x processes, --max_steps_per_epoch "
                             "and the data flags must be those of the interrupted run")
        if pos.get("seed") is not None and int(pos["seed"]) != args.seed:
            print(f"unlearn_fast: warning: {args.resume} was trained with --seed {pos['seed']}, continuing with "
                  f"--seed {args.seed} (data, masks and noise differ from the interrupted run)")
    changed = _changed_trajectory_flags(ckpt, args)
    if changed:
        print(f"unlearn_fast: warning: {args.resume} was trained with " + ", ".join(changed) + "; the continued run "
              "is not the one the interrupted run would have made")
    if start_epoch >= args.epochs:
        raise ValueError(f"{args.resume} already finished epoch {start_epoch - 1} of --epochs {args.epochs}")
    if args.start_epoch not in (0, start_epoch):  # as the reference's load_model, the checkpoint's position wins
        print(f"unlearn_fast: notice: --start_epoch {args.start_epoch} is overridden by {args.resume}: the run "
              f"continues at epoch {start_epoch}" + (f" step {start_step}" if start_step else ""))
    progress = ({k: pos[k] for k in ("epoch_sums", "epoch_steps", "epoch_lr_sum")}
                if start_step and "epoch_sums" in pos else None)
    return start_epoch, start_step, progress


# flags that change the numbers of the steps still to come (the seed has its own warning, mid-epoch)
_TRAJECTORY_FLAGS = ("precision", "batch_size", "accum_iter", "forget_per_batch", "max_steps_per_epoch", "epochs",
                     "warmup_epochs", "blr", "min_lr", "weight_decay", "grad_clip", "forget_alpha", "retain_alpha",
                     "noise_type", "input_size", "mask_ratio", "mask_ratio_min", "mask_ratio_max", "mask_ratio_mu",
                     "mask_ratio_std", "forget_classes", "retain_classes", "num_image_per_class", "retainset_ratio",
                     "opendata_to_forget_ratio", "use_coco")


def _changed_trajectory_flags(ckpt: dict, args) -> list:
    """``--flag SAVED (now NEW)`` for each trajectory flag of one of our checkpoints that this run changes."""
    saved = ckpt.get("args")
    if "unlearn_fast" not in ckpt or not isinstance(saved, dict):
        return []
    changed = [f"--{k} {saved[k]} (now {getattr(args, k)})" for k in _TRAJECTORY_FLAGS
               if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]
    if getattr(args, "lr", None) is not None and saved.get("lr") != args.lr:  # saved: the lr the run used
        changed.append(f"--lr {saved.get('lr')} (now {args.lr})")
    if saved.get("world_size") is not None and saved["world_size"] != getattr(args, "world_size", None):
        # the effective batch (and the lr from --blr) scale with the number of processes
        changed.append(f"{saved['world_size']} processes (now {args.world_size})")
    return changed


def _worker_error_cleaned(exc: Exception):
    """A DataLoader worker's exception arrives with the worker's whole traceback in its message; keep the
    exception's own last line (e.g. "cannot read image PATH: ...") so the CLI prints one clear error."""
    text = str(exc)
    if "Original Traceback" not in text or not isinstance(exc, BadImageError):
        return None
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return BadImageError(re.sub(r"^[\w.]*BadImageError: ", "", last.strip()))


class RunStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run; ``signum`` says which (the exit code is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stop_signal = []  # the signal received during this run, if any (see stop_signals)


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise RunStopped in the main thread, so the run's cleanup runs (the default SIGTERM
    kills the process on the spot, leaving a run directory without a checkpoint). The signal is also
    remembered: CPython drops an exception raised while it runs an at-fork callback (a DataLoader starting
    its workers), and ``loader_batches`` re-raises it at the next batch."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a DataLoader worker forked during the run (Ctrl-C signals the whole group):
            # the main process stops the run and its workers; raised here, RunStopped would print the worker's
            # traceback when it lands during the worker's start-up
            if signum == signal.SIGTERM:
                raise SystemExit(0)
            return
        _stop_signal.append(signum)
        raise RunStopped(signum)

    def quiet_when_stopping(unraisable):
        # once stopping, the dropped RunStopped and the teardown noise of a half-built DataLoader iterator
        # would print tracebacks; the stop itself is reported once by the CLI
        if not _stop_signal:
            hook_was(unraisable)
    _stop_signal.clear()
    hook_was, sys.unraisablehook = sys.unraisablehook, quiet_when_stopping
    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)
        sys.unraisablehook = hook_was
        _stop_signal.clear()


def loader_batches(loader):
    """Iterate the loader; a worker's BadImageError is re-raised with the worker's traceback stripped."""
    iterator = iter(loader)
    while True:
        if _stop_signal:
            raise RunStopped(_stop_signal[0])
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except BadImageError as e:
            cleaned = _worker_error_cleaned(e)
            if cleaned is None:
                raise
            raise cleaned from None
        if _stop_signal:
            raise RunStopped(_stop_signal[0])
        yield batch


def prepare_run_dir(args, baseline: bool, ctx, args_dict: dict, data_split=None):
    """Rank 0 creates the run directory (its name holds a timestamp; a folder of that name that exists, e.g.
    another run's started in the same second, is never shared: see ``create_run_dir``), checks that it can
    write there and writes opt.yaml and ``data_split`` (data_split.json, when given); every rank gets the same
    (path, created by this run, --output_dir created by this run), or the same error."""
    outcome = None
    if ctx.is_main:
        run_dir = None
        try:
            made_output_dir = not os.path.exists(args.output_dir)
            run_dir = create_run_dir(args.output_dir, lambda: run_dir_name(args, baseline))
            # as the reference, whose args.output_dir and log_dir are the run directory when it dumps them
            args_dict["log_dir"] = args_dict["output_dir"] = run_dir
            write_opt_yaml(run_dir, args_dict)
            if data_split is not None:
                write_data_split(run_dir, data_split)
            outcome = ("ok", run_dir, True, made_output_dir)
        except BaseException as e:  # a bad folder (ValueError), or a signal while creating it
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            if not isinstance(e, ValueError):
                raise
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome, ctx)
    if outcome[0] == "error":
        raise ValueError(outcome[1])
    return outcome[1], outcome[2], outcome[3]


def _has_checkpoint(run_dir: str) -> bool:
    return os.path.isdir(run_dir) and any(n.startswith("checkpoint-") and n.endswith(".pth")
                                          for n in os.listdir(run_dir))


def class_lists(args):
    """(forget classes, retain classes) from the flags, or the reference split of --data_path."""
    if args.forget_classes or args.retain_classes:
        if not (args.forget_classes and args.retain_classes):
            raise ValueError("give both --forget_classes and --retain_classes")
        return parse_class_list(args.forget_classes), parse_class_list(args.retain_classes)
    return default_class_split(args.data_path)


def select_data(args, classes=None):
    """The training list of the flags; ``classes``: ``class_lists(args)`` when the caller has it already."""
    forget, retain = class_lists(args) if classes is None else classes
    proxy_root = None
    if args.use_coco:
        proxy_root = args.proxy_path or reference_coco_root(args.data_path)
        if not args.opendata_to_forget_ratio:  # as the reference (None -> 0.0): no proxy, said so here
            print("unlearn_fast: notice: --use_coco without --opendata_to_forget_ratio takes no proxy images "
                  "(it still narrows the crop scale to (0.2, 0.5), as the reference's --use_coco)", flush=True)
    items = select_unlearning_files(args.data_path, forget, retain, args.num_image_per_class, args.retainset_ratio,
                                    args.opendata_to_forget_ratio, proxy_root, args.seed)
    if args.verify_images:
        verify_images(items)
    return items


def training_splits(items, data_path: str, retain_classes) -> dict:
    """{"forget": paths, "retain": paths} of a training list: the forget rows, and the retain rows from the retain
    class folders (not the proxy's)."""
    retain_dirs = {os.path.abspath(os.path.join(data_path, c)) for c in retain_classes}
    return {"forget": [p for p, lab in items if lab == FORGET_LABEL],
            "retain": [p for p, lab in items if lab != FORGET_LABEL
                       and os.path.dirname(os.path.abspath(p)) in retain_dirs]}


def carried_data_split(args, resume_ckpt, record: dict) -> dict:
    """The data_split.json of a run: ``record`` (this run's files), except that a run continuing one of ours keeps
    the interrupted run's record when the files differ (its model trained on those first), with a one-line
    warning, as for changed data flags."""
    if resume_ckpt is None or "unlearn_fast" not in resume_ckpt:
        return record
    try:
        was = read_data_split(os.path.dirname(os.path.abspath(args.resume)))
    except ValueError:  # a damaged record beside the checkpoint: this run's own is the best one left
        return record
    diff = was and data_split_difference(was, record)
    if not diff:
        return record
    split, n_was, n_now = diff
    print(f"unlearn_fast: warning: {args.resume} was trained on other {split} training files ({n_was} files "
          f"recorded in its run's data_split.json, {n_now} under --data_path now"
          + (", other files" if n_was == n_now else "") + "); the continued run is not the one the interrupted "
          "run would have made, and its data_split.json keeps the interrupted run's record")
    return was


def run_unlearn(args, baseline: bool = False) -> str:
    """Run the job (one process, or one rank of a torchrun job); returns the run directory."""
    apply_reference_resume_default(args, baseline)
    validate_args(args, baseline)
    for flag in ("forget_classes", "retain_classes"):  # a class-list file as a path that works from any folder:
        spec = getattr(args, flag)                      # the audit reads the names again from the run's opt.yaml
        if spec and os.path.isfile(spec):
            setattr(args, flag, os.path.abspath(spec))
    rank, world, local_rank = env_ranks(args.dist_on_itp)
    device = rank_device(args.device, local_rank, world)
    ctx = init_distributed(device, dist_url=args.dist_url, dist_on_itp=args.dist_on_itp)
    try:
        with stop_signals(), peer_failures_explained(ctx):
            check_same_on_all_ranks(vars(args), ctx)  # torchrun gives every rank one command; a manual launch may not
            return _run_unlearn(args, baseline, ctx, device)
    finally:
        cleanup_distributed(ctx)


def _run_unlearn(args, baseline: bool, ctx, device) -> str:
    classes = class_lists(args)
    items = select_data(args, classes)
    if len(items) < args.batch_size * ctx.world_size:
        raise ValueError(f"a batch larger than the data: --batch_size {args.batch_size} x {ctx.world_size} "
                         f"process(es) needs at least {args.batch_size * ctx.world_size} training images, the data "
                         f"flags select {len(items)} (incomplete batches are dropped, as the reference's drop_last): "
                         "lower --batch_size")
    labels = torch.tensor([lab for _, lab in items])
    held = None
    if args.eval_every is not None and ctx.is_main:  # read now: a bad held-out file fails before any writing
        held = select_holdout_files(args.data_path, *classes, exclude=[p for p, _ in items],
                                    per_set=args.eval_images, seed=args.seed)
        held = (load_eval_images(held.forget + held.retain, args.input_size),
                torch.arange(len(held.forget) + len(held.retain)) < len(held.forget))
    dataset = UnlearnImageDataset(items, reference_train_transform(args.input_size, args.use_coco), seed=args.seed)
    world, rank = ctx.world_size, ctx.rank
    args.world_size = world  # as the reference: the launcher's world size wins
    if args.forget_per_batch is not None:
        sampler = BalancedUnlearnSampler(labels, args.batch_size, args.forget_per_batch, seed=args.seed, rank=rank,
                                         world_size=world)
    else:
        sampler = ReferenceShuffleBatchSampler(len(items), args.batch_size, seed=args.seed, rank=rank,
                                               world_size=world)
    steps = sampler.steps_per_epoch
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the reference (§1.4): the VQGAN's convolutions pick fast algorithms
    model = build_model(args)
    whole_model_groups = optimizer_group_names(model.named_parameters())  # before the encoder-only freeze
    with _silenced(not ctx.is_main):  # only rank 0 prints notices
        resume_ckpt, teacher_source = load_training_state(args, model)
    teacher = None
    if teacher_source and resume_ckpt is not None:
        teacher = load_model_from(args, teacher_source)
    elif args.teacher:
        teacher = load_model_from(args, args.teacher)

    eff = effective_batch_size(args.batch_size, args.accum_iter, world)
    lr = base_lr(args.lr, args.blr, eff)
    loss_type = getattr(args, "loss_type", None)
    with _silenced(not ctx.is_main):  # only rank 0 prints notices
        mode = resolve_step_mode(args.step, device, loss_type, args.accum_iter, args.forget_per_batch is not None,
                                 world_size=world)
        idle = idle_flags(args, getattr(model, "family", ""), device.type, mode)
        for line in idle:
            print(f"unlearn_fast: {line}")
        # an update form named idle is not handed to the setup, which would say so again at the first step
        acting = {f: getattr(args, f, False) and not any(line.startswith(f"--{f} ") for line in idle)
                  for f in ("fold_clip", "half_student_weights")}
        if loss_type is None and args.forget_alpha == 0:
            print("unlearn_fast: --forget_alpha 0.0 (the reference's default): the forget term has no weight, so "
                  "nothing is forgotten; the paper's runs use e.g. --forget_alpha 0.2")
        if 0 < args.epochs <= args.warmup_epochs:  # the schedule never leaves its linear ramp
            print(f"unlearn_fast: --warmup_epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning rate "
                  f"only ramps up and ends near {args.epochs / args.warmup_epochs:.0%} of lr {lr:.3g} (the reference's "
                  "schedule; lower --warmup_epochs to reach the peak)")
    setup = build_setup(model, device, lr=lr, weight_decay=args.weight_decay, precision=args.precision,
                        retain_alpha=args.retain_alpha, forget_alpha=args.forget_alpha,
                        noise_type=getattr(args, "noise_type", "normal"), grad_clip=args.grad_clip,
                        accum_iter=args.accum_iter, seed=args.seed, rank=rank, loss_type=loss_type,
                        baseline_weighting=getattr(args, "baseline_weighting", "reference"),
                        share_tokenizer=args.share_tokenizer,
                        overlap_teacher=not getattr(args, "serial_teacher", False),
                        fuse_tokenizer_norms=not getattr(args, "unfused_tokenizer_norms", False),
                        sdpa_attention=not getattr(args, "explicit_attention", False),
                        visible_patch_embed=not getattr(args, "full_patch_embed", False),
                        tokenizer_channels_last=not getattr(args, "nchw_tokenizer", False),
                        fuse_block_norms=not getattr(args, "unfused_block_norms", False),
                        fold_clip=acting["fold_clip"], half_student_weights=acting["half_student_weights"],
                        fast=mode != "reference",
                        capturable=mode == "graphed", teacher=teacher)
    if args.share_tokenizer and ctx.is_main and mode != "reference" and not tokenizer_shared_exactly(setup) \
            and getattr(model, "family", "") == "mage" and front_ends_match(setup.student, setup.teacher):
        report_token_disagreement(setup, dataset, args.batch_size)  # (a teacher with another VQGAN shares nothing)
    start_epoch, start_step, epoch_progress = args.start_epoch, 0, None
    if resume_ckpt is not None:
        restore_optimizer(setup, resume_ckpt, args.resume, whole_model_groups)
        with _silenced(not ctx.is_main):
            start_epoch, start_step, epoch_progress = resume_point(args, resume_ckpt, steps)
    if ctx.enabled:
        # whole-model baselines may leave trainable parameters unused in a step (e.g. MAGE's cls_token)
        whole_model = loss_type is not None and not TRAINS_ENCODER_ONLY[loss_type]
        setup.student = DDPStudent(model, ctx, args.seed, find_unused_parameters=whole_model)

    args_dict = args_as_dict(args)
    # lr: the reference sets args.lr = blr * eff_batch / 256 before it dumps args
    # start_epoch: where this run starts (the reference's load_model sets it from a resumed checkpoint);
    # distributed: the key the reference's init_distributed_mode adds
    args_dict.update(teacher_checkpoint=os.path.abspath(teacher_source) if teacher_source else None,
                     lr=lr, lr_resolved=lr, eff_batch_size=eff, step_mode=mode, device_resolved=str(device),
                     world_size=world, start_epoch=start_epoch, distributed=ctx.enabled)
    data_split = None
    if ctx.is_main:  # which files this run trains on (only rank 0 writes): the audit checks the data folder against it
        data_split = carried_data_split(args, resume_ckpt, data_split_record(
            args.data_path, training_splits(items, args.data_path, classes[1])))
    run_dir, created, made_output_dir = prepare_run_dir(args, baseline, ctx, args_dict, data_split)
    saved = []  # checkpoint files of this run, oldest first
    try:  # from here on a failure or a signal removes a run directory that holds no checkpoint yet
        args.log_dir = run_dir  # the reference overwrites log_dir with the run directory
        if ctx.is_main:
            where = f" at epoch {start_epoch} step {start_step}" if resume_ckpt is not None else ""
            print(f"unlearn_fast: {len(items)} images ({int((labels < 100).sum())} forget), {steps} steps/epoch, "
                  f"lr {lr:.3g} (eff. batch {eff}), step '{mode}', precision '{args.precision}', device {device}"
                  + (f", {world} processes" if world > 1 else ""))
            print(f"unlearn_fast: writing to {run_dir}{where}")

        workers = min(args.num_workers, os.cpu_count() or 1)  # more than the cores only adds start-up and a warning
        if ctx.is_main and workers < args.num_workers:
            print(f"unlearn_fast: --num_workers {args.num_workers} > {workers} CPU cores: using {workers} workers "
                  "(the batches do not depend on the count)")
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                             pin_memory=args.pin_mem and device.type == "cuda",
                                             persistent_workers=False)

        def epoch_batches(epoch):
            sampler.set_epoch(epoch, start_step=start_step if epoch == start_epoch else 0)
            dataset.set_epoch(epoch)
            return loader_batches(loader)

        image_shape = (3, args.input_size, args.input_size)
        evaluator = None
        if held is not None:
            evaluator = PeriodicEvaluator(model, held[0], held[1], mask_seed=args.seed, every=args.eval_every,
                                          criterion=args.eval_criterion, output_dir=run_dir, epochs=args.epochs,
                                          reference_model=setup.teacher, announce=True)
            print(f"unlearn_fast: evaluating every {args.eval_every} epoch(s) on {int(held[1].sum())} forget + "
                  f"{int((~held[1]).sum())} retain held-out images -> {run_dir}/eval_log.txt, best.pth")
        train_loop(setup, epoch_batches, steps, epochs=args.epochs, lr=lr, min_lr=args.min_lr,
                   warmup_epochs=args.warmup_epochs, start_epoch=start_epoch, start_step_in_epoch=start_step,
                   output_dir=run_dir, args_dict=args_dict, step_mode=mode, readback_every=args.readback_every,
                   progress=not args.no_progress and ctx.is_main, forget_per_batch=args.forget_per_batch,
                   batch_size=args.batch_size, image_shape=image_shape, save_every_steps=args.save_every_steps,
                   epoch_progress=epoch_progress, dist=ctx, on_epoch_end=evaluator, on_checkpoint=saved.append,
                   optimizer_layout=whole_model_groups)
    except BaseException:
        if ctx.is_main and created and not _has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained was saved: leave nothing behind
            if made_output_dir and os.path.isdir(args.output_dir) and not os.listdir(args.output_dir):
                os.rmdir(args.output_dir)  # the --output_dir this run made, now empty
            print(f"unlearn_fast: removed {run_dir} (the run stopped before its first checkpoint)", flush=True)
        if ctx.is_main:
            _print_how_to_continue(saved[-1] if saved else (args.resume if resume_ckpt is not None else None))
        raise
    return run_dir


def _print_how_to_continue(checkpoint) -> None:
    """After a run stopped early: the checkpoint to continue from (stderr, beside the CLI's error line)."""
    if checkpoint:
        print(f"unlearn_fast: to continue, run the same command with --resume {checkpoint}", file=sys.stderr,
              flush=True)


def report_token_disagreement(setup, dataset, batch_size: int) -> float:
    """``--share_tokenizer`` at unequal precision: the share of code ids that sharing changes, measured on the
    first training images (at most one batch, 16) with this run's weights, printed before training."""
    n = min(len(dataset), batch_size, 16)
    images = torch.stack([dataset[i][0] for i in range(n)])
    rate = token_disagreement(setup, images)
    dtype = str(student_dtype(setup.precision, setup.device)).replace("torch.", "")
    print(f"unlearn_fast: --share_tokenizer: {100 * rate:.2f} % of the code ids of {n} training images differ "
          f"between the student's {dtype} and the teacher's fp32 tokenisation; the teacher's retain-row guides "
          "use the student's")
    return rate


def _silenced(yes: bool):
    return contextlib.redirect_stdout(io.StringIO()) if yes else contextlib.nullcontext()


__all__ = ["run_unlearn", "stop_signals", "validate_args", "resolve_device", "class_lists", "select_data",
           "training_splits", "build_model", "load_model_from"]
