"""``unlearn-fast palette-unlearn`` / ``palette-test``: the reference ``unlearn.py`` and ``run.py -p test`` for
Palette (REFERENCE.md §3, §4.3, §5.5), with the same flags and JSON configs.

    unlearn-fast palette-unlearn -c config/inpainting_places2_unlearn.json -p train --fix_decoder 1 \\
        --forget_alpha 0.1 --ckpt 16_Network.pth --class_list datasets/place365/flist/class.txt
    unlearn-fast palette-unlearn -c config/inpainting_places2_unlearn.json --fix_decoder 1 \\
        --resume_state experiments/<run>/checkpoint/1 --class_list datasets/place365/flist/class.txt
    unlearn-fast palette-test -c config/inpainting_places2_unlearn_test.json \\
        --ckpt experiments/<run>/checkpoint/2_Network.pth --class_list datasets/place365/flist/class.txt

Resuming (second line; or the config's ``path.resume_state``, which the flag overrides) continues the run saved
in ``1_Network.pth``, ``1_Network_ema.pth`` and ``1.state`` with epoch 2 up to ``train.n_epoch``, in a new run
directory, with the same flags. The teacher is the original model stored in ``1_Network.pth``; ``--ckpt`` is not
needed (given, it must be that original model). A state that already finished ``train.n_epoch`` is an error
(nothing to do, exit code 2). See unlearn_fast.train.palette_trainer for what makes the resume exact.

A run writes what the reference writes: ``<base_dir>/<run name>/`` (train) or ``<ckpt without .pth>/`` (test) gets
config.json, train.log / test.log (the reference's logger format) and the config's path folders (code, tb_logger,
results, checkpoint); test images go to ``results/test/0/<mask_ratio:.2f>/`` ({GT_,Process_,Out_,Mask_}<name>),
which appears only once every image is written (``<mask_ratio>.partial/`` until then; a test that stops leaves it
so named, with its finished batches, and the same command continues it). No tensorboard events are written
(tb_logger/ stays empty).

The flags pick the approach (``--fix_decoder 1``: Ours; see unlearn_fast.train.palette_steps for the table).
Which config keys are read, and their defaults: unlearn_fast.cli.palette_config. Everything that can be
checked is checked before the run directory is created; a run that stops before its first checkpoint (a bad
image, a non-finite loss, Ctrl-C) removes its directory again.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import signal
import sys
from typing import List, Optional

import torch

from ..atomic_files import atomic_append_text
from ..models.palette import SCHEDULE_BUFFERS, Network, load_palette_checkpoint
from ..models.state_dict_io import read_checkpoint
from ..models.palette_sampler import palette_restore, write_restoration_images
from ..train.balanced_sampler import ReferenceShuffleBatchSampler
from ..train.palette_data import (PaletteInpaintDataset, read_class_list, select_places365_test,
                                  select_places365_train)
from ..train.palette_steps import PALETTE_PRECISIONS, WITH_TEACHER, approach_from_flags, build_palette_setup
from ..train.palette_trainer import (PALETTE_STEP_MODES, PaletteRunLog, check_palette_resume_fits,
                                     load_resumed_network, log_run_start, make_run_folders, palette_resume_start,
                                     palette_run_dir_name, palette_train_loop, read_palette_resume,
                                     restore_palette_training, write_config_json)
from ..train.distributed import env_ranks
from ..train.image_datasets import BadImageError, verify_images
from ..train.progress import progress_bar
from ..train.run_outputs import create_run_dir
from ..train.seeding import step_generator
from .help_format import short_usage_errors
from .tools import one_line_bad_images
from .palette_config import load_palette_config, resolve_palette_job
from .unlearn_args import ReferenceAbbrevParser
from .unfinished_output import (check_unfinished, error_with, finish_unfinished, listing_sha256, open_unfinished,
                                remove_stale_temporaries, stop_line)
from .unlearn_command import stop_signals, loader_batches, resolve_device

REFERENCE_CLASS_LIST = os.path.join("datasets", "place365", "flist", "class.txt")


def build_palette_parser(prog: Optional[str] = None, default_phase: str = "train") -> argparse.ArgumentParser:
    p = ReferenceAbbrevParser(prog=prog, description="Palette unlearning / test (the reference unlearn.py flags)")
    g = p.add_argument_group("reference flags (unlearn.py)")
    g.add_argument("-c", "--config", type=str, default=None, help="JSON file for configuration (// comments allowed)")
    g.add_argument("-p", "--phase", type=str, choices=["train", "test"], default=default_phase,
                   help="train: unlearn; test: sample the test set with --ckpt")
    g.add_argument("-b", "--batch", type=int, default=None, help="batch size (overrides the config's dataloader)")
    g.add_argument("-gpu", "--gpu_ids", type=str, default=None, help="accepted and ignored: one process; use --device")
    g.add_argument("-d", "--debug", action="store_true", help="name the run debug_<name>; the config's debug keys "
                                                               "replace its train keys")
    g.add_argument("-P", "--port", default="21012", type=str, help="accepted and ignored (no DDP)")
    g.add_argument("--fix_decoder", default=0, type=int, help="1: train the encoder only against a frozen teacher")
    g.add_argument("--forget_alpha", default=0.1, type=float, help="weight of the forget term")
    g.add_argument("--max_loss", default=0, type=int, help="1: MAX LOSS baseline (forget term weighted -alpha)")
    g.add_argument("--learn_noise", default=0, type=int,
                   help="1: NOISY LABEL baseline; with --fix_decoder 1: RANDOM ENCODER")
    g.add_argument("--learn_others", default=0, type=int, help="1: RETAIN LABEL baseline")
    g.add_argument("--ckpt", type=str, default=None,
                   help="train: the pretrained {epoch}_Network.pth to unlearn (optional with --resume_state); "
                        "test: the checkpoint to sample")
    for action in g._group_actions:  # unlearn.py's flags win its abbreviations (--d: --debug, --ma: --max_loss)
        action.reference_flag = True
    g.add_argument("--resume_state", type=str, default=None, metavar="PATH_PREFIX",
                   help="continue an unlearning run from PATH_PREFIX_Network.pth, PATH_PREFIX_Network_ema.pth and "
                        "PATH_PREFIX.state (e.g. experiments/<run>/checkpoint/3: epochs 4..n_epoch); overrides the "
                        "config's path.resume_state ('none' ignores that key). Use the flags the run was saved with")
    f = p.add_argument_group("unlearn_fast flags")
    f.add_argument("--data_root", type=str, default=None, help="Places-365 root with train_256/ and val_256/ "
                                                                "(default: the config's data_root)")
    f.add_argument("--class_list", type=str, default=None,
                   help=f"the class list (default: {REFERENCE_CLASS_LIST} from the working directory, as the "
                        "reference, else <data_root>/flist/class.txt)")
    f.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    f.add_argument("--seed", type=int, default=None,
                   help="seed for every draw (default: the config's seed if >= 0, else 0)")
    f.add_argument("--output_dir", type=str, default=None, help="where run directories go (default: path.base_dir)")
    f.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap steps per epoch (quick checks)")
    f.add_argument("--no_progress", action="store_true", help="no progress bar")
    f.add_argument("--step", default="fast", choices=PALETTE_STEP_MODES,
                   help="fast: fused loss, no per-step host sync, foreach EMA; reference: the official step's costs")
    f.add_argument("--precision", default="fp32", choices=PALETTE_PRECISIONS,
                   help="fp32: as the reference; bf16: both UNets under bf16 autocast (opt-in, faster on GPUs)")
    f.add_argument("--readback_every", type=int, default=20, help="read losses back to the host every N steps")
    f.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    f.add_argument("--steps", type=int, default=None,
                   help="test: stop the sampler after this many steps (timing/smoke only: not finished samples)")
    f.add_argument("--max_images", type=int, default=None, help="test: sample only the first N test images")
    return p


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def find_class_list(explicit: Optional[str], data_root: str) -> str:
    if explicit:
        _need(os.path.isfile(explicit), f"--class_list not found: {explicit}")
        return explicit
    tried = [REFERENCE_CLASS_LIST, os.path.join(data_root, "flist", "class.txt")]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise ValueError(f"no class list found (tried {', '.join(tried)}); pass --class_list "
                     "(the reference's datasets/place365/flist/class.txt)")


def check_data_root(root: str, flag: Optional[str], phase: str) -> None:
    """A data_root that is not a folder: one error naming where it came from (--data_root or the config key)."""
    where = "--data_root" if flag else f"datasets.{phase}.which_dataset.args.data_root"
    _need(os.path.isdir(root), f"{where} {root!r} does not exist or is not a folder (the Places-365 root with "
                               f"train_256/ and val_256/)")


def _check_common(args, need_ckpt: bool = True) -> None:
    _need(args.ckpt is not None or not need_ckpt, "--ckpt is required (the Palette {epoch}_Network.pth to start from)")
    _need(args.ckpt is None or os.path.isfile(args.ckpt), f"--ckpt not found: {args.ckpt}")
    _need(args.batch is None or args.batch >= 1, f"-b/--batch must be >= 1, got {args.batch}")
    _need(args.num_workers is None or args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}")
    if args.gpu_ids is not None:
        print("unlearn_fast: -gpu is ignored (one process); choose the GPU with --device cuda:N")


def _build_network(job, phase: str) -> Network:
    factor = 2 ** (len(job.unet.get("channel_mults", [1, 2, 4, 8])) - 1)
    _need(job.image_size[0] % factor == 0 and job.image_size[1] % factor == 0,
          f"image_size {list(job.image_size)} must be a multiple of {factor} for this UNet")
    try:
        return Network(job.unet, job.beta_schedule, phase=phase, module_name=job.module_name, init_weights=False)
    except (TypeError, ValueError) as e:  # an unknown UNet argument, heads that do not divide the channels, ...
        raise ValueError(f"model.which_networks[0].args (unet / beta_schedule / module_name): {e}") from None


def debug_subset(job, items: list) -> list:
    """Debug mode (-d): the first ``debug.debug_split`` items, as the reference's debug split."""
    n = job.debug_subset_size(len(items))
    if n < len(items):
        print(f"unlearn_fast: debug mode: using the first {n} of {len(items)} images (debug.debug_split "
              f"{job.debug_split})")
    return items[:n]


def check_training_items(job, items: list) -> None:
    """One clear error for a batch larger than the data; warnings for a run that cannot do what it seems to."""
    n_forget = sum(1 for _, lab in items if lab < 0)
    _need(job.batch_size <= len(items), f"batch size {job.batch_size} (-b or dataloader.args.batch_size) is larger "
                                        f"than the data: {len(items)} training images (every batch must be full)")
    if n_forget == len(items):
        print("unlearn_fast: warning: no retain images (are the retain class folders empty?): only the forget "
              "term is trained")
    elif n_forget == 0:
        print("unlearn_fast: warning: no forget images in this run (debug.debug_split keeps the first images, "
              "which are retain): only the retain term is trained")
    every = job.save_checkpoint_epoch
    if every > job.n_epoch:
        print(f"unlearn_fast: warning: train.save_checkpoint_epoch {every} > train.n_epoch {job.n_epoch}: no "
              "checkpoint will be written")
    elif job.n_epoch % every:
        print(f"unlearn_fast: warning: train.n_epoch {job.n_epoch} is not a multiple of "
              f"train.save_checkpoint_epoch {every}: the epochs after {job.n_epoch - job.n_epoch % every} are "
              "not saved")


def run_palette_unlearn(args) -> str:
    """Unlearn; returns the run directory. ``-p test`` runs :func:`run_palette_test` instead (as unlearn.py)."""
    if args.phase == "test":
        return run_palette_test(args)
    approach = approach_from_flags(args.fix_decoder, args.max_loss, args.learn_noise, args.learn_others)
    cfg = load_palette_config(args.config)
    job = resolve_palette_job(cfg, "train", source=args.config, batch=args.batch, data_root=args.data_root,
                              num_workers=args.num_workers, seed=args.seed, debug=args.debug)
    resume_prefix = resume_prefix_of(args, job)
    _check_common(args, need_ckpt=resume_prefix is None)
    _need(args.max_steps_per_epoch is None or args.max_steps_per_epoch >= 1,
          f"--max_steps_per_epoch must be >= 1, got {args.max_steps_per_epoch}")
    _need(args.readback_every >= 1, f"--readback_every must be >= 1, got {args.readback_every}")
    device = resolve_device(args.device)
    check_data_root(job.data_root, args.data_root, "train")
    classes = read_class_list(find_class_list(args.class_list, job.data_root))
    items = select_places365_train(job.data_root, classes, job.number_img_per_class, job.seed,
                                   open_proxy=job.dataset == "OpenForgetInpaintDataset")
    items = debug_subset(job, items)
    check_training_items(job, items)
    dataset = PaletteInpaintDataset(items, job.image_size, seed=job.seed, mask_mode="hybrid")
    sampler = ReferenceShuffleBatchSampler(len(items), job.batch_size, seed=job.seed)
    steps = min(sampler.steps_per_epoch, args.max_steps_per_epoch or sampler.steps_per_epoch)

    network = _build_network(job, "train")
    resume, teacher_state, start_epoch = None, None, 1
    if resume_prefix is None:
        load_network_file(network, args.ckpt)
    else:
        resume = read_palette_resume(resume_prefix, with_ema=job.ema_decay is not None)
        start_epoch = palette_resume_start(resume, job.n_epoch, job.seed, steps)
        check_palette_resume_fits(resume, approach)
        load_resumed_network(network, resume)
        teacher_state = resume.teacher if approach in WITH_TEACHER else None
        if args.ckpt and teacher_state is not None:
            check_ckpt_is_teacher(args.ckpt, resume)
        elif args.ckpt:
            print(f"unlearn_fast: --ckpt {args.ckpt} is not used: '{approach}' has no teacher and the weights come "
                  f"from {resume.network_path}")
    setup = build_palette_setup(network, device, approach, args.forget_alpha, lr=job.lr,
                                weight_decay=job.weight_decay, ema_decay=job.ema_decay, seed=job.seed,
                                fast=args.step == "fast", precision=args.precision, teacher_state=teacher_state,
                                **job.adam_options)
    if resume is not None:
        restore_palette_training(setup, resume)

    base = args.output_dir or job.base_dir
    run_dir = None
    with stop_signals():  # SIGINT / SIGTERM raise here, so the cleanup below runs (exit 130 / 143)
        try:
            # a new folder of the reference's name; a run started in the same second takes the next second's
            run_dir = create_run_dir(base, lambda: palette_run_dir_name(
                job.opt_name, args.learn_others, args.fix_decoder, args.forget_alpha, args.max_loss,
                args.learn_noise))
            _train_in_run_dir(args, job, cfg, run_dir, approach, device, items, dataset, sampler, steps, setup,
                              resume, start_epoch)
        except BaseException:
            if run_dir is not None and not _has_checkpoint(os.path.join(run_dir, job.checkpoint_subdir)):
                shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained was saved: leave nothing behind
                print(f"unlearn_fast: removed {run_dir} (the run stopped before its first checkpoint)", flush=True)
            raise
    return run_dir


def _has_checkpoint(checkpoint_dir: str) -> bool:
    return os.path.isdir(checkpoint_dir) and any(n.endswith(".state") for n in os.listdir(checkpoint_dir))


def _train_in_run_dir(args, job, cfg, run_dir, approach, device, items, dataset, sampler, steps, setup, resume,
                      start_epoch) -> None:
    """config.json, then the epochs (everything up to here was checked before the run directory existed)."""
    n_forget = sum(1 for _, lab in items if lab < 0)
    written = dict(config_with_batch(cfg, args.batch, gpu_ids=args.gpu_ids), name=job.opt_name, phase="train",
                   distributed=False)
    written["unlearn_fast"] = dict(
        approach=approach, fix_decoder=args.fix_decoder, forget_alpha=args.forget_alpha, max_loss=args.max_loss,
        learn_noise=args.learn_noise, learn_others=args.learn_others,
        ckpt=os.path.abspath(args.ckpt) if args.ckpt else None,
        resume_state=os.path.abspath(resume.prefix) if resume else None, start_epoch=start_epoch,
        seed=job.seed, device=str(device), step=args.step, precision=args.precision, batch_size=job.batch_size,
        n_epoch=job.n_epoch,
        steps_per_epoch=steps, images=len(items), forget_images=n_forget, data_root=job.data_root)
    write_config_json(run_dir, written)
    make_run_folders(run_dir, job.folders)
    log_run_start(PaletteRunLog(os.path.join(run_dir, "train.log")), run_dir, "train", len(items), resume)
    print(f"unlearn_fast: Palette '{approach}', {len(items)} images ({n_forget} forget), {steps} steps/epoch x "
          f"{job.n_epoch} epochs, batch {job.batch_size}, step '{args.step}', {args.precision}, device {device}")
    print(f"unlearn_fast: writing to {run_dir}")
    if resume is not None:
        print(f"unlearn_fast: resuming {resume.prefix} at epoch {start_epoch} ({resume.iters} images seen)")

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=job.num_workers,
                                         pin_memory=device.type == "cuda")

    def epoch_batches(epoch):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        return loader_batches(loader)  # a worker's bad image: one line naming the file

    palette_train_loop(setup, epoch_batches, steps, n_epoch=job.n_epoch, run_dir=run_dir,
                       checkpoint_subdir=job.checkpoint_subdir, step_mode=args.step,
                       readback_every=args.readback_every, progress=not args.no_progress, log_iter=job.log_iter,
                       save_checkpoint_epoch=job.save_checkpoint_epoch, start_epoch=start_epoch,
                       start_iters=resume.iters if resume else 0, save_position=True, ema_start=job.ema_start,
                       ema_iter=job.ema_iter)


def config_with_batch(cfg: dict, batch: Optional[int], phase: str = "train", gpu_ids: Optional[str] = None) -> dict:
    """The config as the reference's parser saves it: ``-b`` replaces datasets.<phase>.dataloader.args.batch_size
    (unchanged where that path is not a chain of JSON objects) and ``-gpu 0,1`` replaces gpu_ids with [0, 1]
    (unchanged where it is not a list of integers, on which the reference fails); a copy where either is given."""
    if batch is None and gpu_ids is None:
        return cfg
    out = copy.deepcopy(cfg)
    ids = [s.strip() for s in (gpu_ids or "").split(",")]
    if gpu_ids is not None and all(s.lstrip("-").isdigit() for s in ids):
        out["gpu_ids"] = [int(s) for s in ids]
    if batch is None:
        return out
    node = out
    for key in ("datasets", phase, "dataloader", "args"):
        node = node.setdefault(key, {}) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node["batch_size"] = int(batch)
    return out


def resume_prefix_of(args, job) -> Optional[str]:
    """--resume_state, else the config's path.resume_state; 'none' (or '') on the command line ignores the key."""
    if args.resume_state is not None:
        return None if args.resume_state.strip().lower() in ("", "none", "null") else args.resume_state
    return job.resume_state


def check_ckpt_is_teacher(ckpt: str, resume) -> None:
    """--ckpt given with a resume: it must be the original model, i.e. the teacher stored in the resume state."""
    state = read_palette_state(ckpt)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    weights = {k[len("denoise_fn."):]: v for k, v in state.items() if k.startswith("denoise_fn.")}
    same = weights.keys() == resume.teacher.keys() and all(
        v.shape == resume.teacher[k].shape and torch.equal(v, resume.teacher[k]) for k, v in weights.items())
    _need(same, f"--ckpt {ckpt} is not the teacher stored in {resume.network_path} (the original model of the run "
                "being resumed): drop --ckpt to keep the stored teacher")


def read_palette_state(path: str) -> dict:
    """The plain state dict of a ``{epoch}_Network.pth``; a ValueError naming the file if it cannot be read."""
    state = read_checkpoint(path)  # CheckpointError (a ValueError) naming the file: truncated, unsafe pickle, ...
    _need(isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values()),
          f"{path}: expected a plain state dict of tensors (an official {{epoch}}_Network.pth)")
    return state


def load_network_file(network: Network, path: str, test: bool = False) -> None:
    """Load ``path`` into ``network`` as unlearn.py (train) / run.py -p test (test) do; errors name the file."""
    state = read_palette_state(path)
    has_schedule = any(k.split("module.", 1)[-1] in SCHEDULE_BUFFERS for k in state)
    if test and not has_schedule:
        print(f"unlearn_fast: {path} holds no noise schedule (an _ema.pth file?); sampling with the config's "
              "test beta_schedule")
    _need(has_schedule or test, f"--ckpt {path} holds no noise-schedule buffers ({', '.join(SCHEDULE_BUFFERS)}): "
                                "unlearning starts from a {epoch}_Network.pth (an _ema.pth file holds denoise_fn.* "
                                "only)")
    try:  # teacher keys in the file are dropped: unlearn.py attaches a fresh teacher after loading
        load_palette_checkpoint(network, state, ignore_teacher_keys=True, require_schedule=has_schedule or not test)
    except ValueError as e:
        raise ValueError(f"--ckpt {path}: {str(e).replace('state dict', 'the file', 1)}") from None
    _need(network.num_timesteps >= 2, f"--ckpt {path}: the noise schedule (gammas) has {network.num_timesteps} "
                                      "step(s); diffusion needs at least 2")


def palette_test_root(ckpt: str) -> str:
    """The test run's folder: ``<ckpt without .pth>`` (the reference's ``ckpt.replace('.pth', '')``, applied
    to the file name's ending only)."""
    return ckpt[:-len(".pth")] if ckpt.endswith(".pth") else ckpt


def check_test_result_dir(result_dir: str, record: Optional[dict] = None) -> str:
    """The folder the images are sampled into (``<result_dir>.partial``, renamed to ``result_dir`` once every
    image is written), after checking that ``result_dir`` holds no earlier test's images and that an existing
    ``.partial`` is a stopped palette-test of the same ``record`` (which this run continues), never another's."""
    staging = result_dir + ".partial"
    _need(not (os.path.isdir(result_dir) and os.listdir(result_dir)) and not os.path.isfile(result_dir),
          f"{result_dir} already holds the results of an earlier palette-test of this checkpoint; move or delete it "
          "to sample again")
    if os.path.lexists(staging) and record is not None:
        check_unfinished(staging, record, "palette-test")
    return staging


def palette_test_record(job, network, n_steps: int, device, items) -> dict:
    """What makes a palette-test's images, keyed by what sets it: a rerun continues a stopped test only when every
    entry is equal. The network by content (the loaded weights and noise schedule: another checkpoint, or the
    same file rewritten by a later epoch, differs); the noise of batch i is drawn from (seed, i), so the batch
    size must stay, and a CUDA generator draws other numbers than the CPU's."""
    weights = hashlib.sha256()
    for key, tensor in network.state_dict().items():
        weights.update(key.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return {"command": "unlearn-fast palette-test", "--ckpt": weights.hexdigest(), "seed": job.seed,
            "batch size": job.batch_size, "image size": list(job.image_size), "mask ratio": job.mask_ratio,
            "sample_num": job.sample_num, "--steps": n_steps, "device": torch.device(device).type,
            "test images": [len(items), listing_sha256((os.path.basename(p), p) for p, _ in items)]}


def run_palette_test(args) -> str:
    """Sample the test set with ``--ckpt``; returns ``<ckpt without .pth>/results/test/0/<mask_ratio>``.

    Writes what ``run.py -p test`` writes in ``<ckpt without .pth>/``: config.json, test.log (appended: the
    reference's opening lines, then ``test/mae``, ``epoch``, ``iters``), the config's path folders (code,
    tb_logger, results, checkpoint) and the images. The images are sampled into ``<mask_ratio>.partial/`` and
    the folder takes its final name only when all are written: a test that stops (Ctrl-C, SIGTERM, an error)
    leaves no folder that looks complete, and the same command continues it from its first unfinished batch
    (the images and test/mae are those of an uninterrupted test). Raises ``RunStopped`` (a KeyboardInterrupt)
    after saying what was kept when a signal stops it."""
    cfg = load_palette_config(args.config)
    job = resolve_palette_job(cfg, "test", source=args.config, batch=args.batch, data_root=args.data_root,
                              num_workers=args.num_workers, seed=args.seed, debug=args.debug)
    _check_common(args)
    _need(args.max_images is None or args.max_images >= 1, f"--max_images must be >= 1, got {args.max_images}")
    device = resolve_device(args.device)
    check_data_root(job.data_root, args.data_root, "test")
    classes = read_class_list(find_class_list(args.class_list, job.data_root))
    items = debug_subset(job, select_places365_test(job.data_root, classes, job.number_img_per_class))
    items = items[:args.max_images]
    try:
        verify_images(items)  # a bad file fails now, not after hours of sampling the batches before it
    except BadImageError as e:
        raise BadImageError(one_line_bad_images(e, "palette-test")) from None
    network = _build_network(job, "test")
    load_network_file(network, args.ckpt, test=True)
    _need(job.sample_num < network.num_timesteps,
          f"sample_num {job.sample_num} must be smaller than the number of timesteps {network.num_timesteps}")
    _need(args.steps is None or 1 <= args.steps <= network.num_timesteps,
          f"--steps must be in [1, {network.num_timesteps}], got {args.steps}")
    n_steps = args.steps or network.num_timesteps
    record = palette_test_record(job, network, n_steps, device, items)  # hashed on the host, before the move
    network.to(device).eval()
    dataset = PaletteInpaintDataset(items, job.image_size, seed=job.seed, mask_mode="center",
                                    mask_ratio=job.mask_ratio)
    root = palette_test_root(args.ckpt)
    result_dir = os.path.join(root, job.folders["results"], "test", "0", f"{job.mask_ratio:.2f}")
    staging = check_test_result_dir(result_dir, record)
    continuing = os.path.isdir(staging)
    _need(not os.path.isfile(root), f"cannot create the result folder {result_dir} (<--ckpt without .pth>/results/"
                                    f"...): {root} is a file")
    make_run_folders(root, job.folders)  # a ValueError naming the folder, e.g. on a read-only disk
    try:
        lock = open_unfinished(staging, record, "palette-test")
    except OSError as e:
        raise ValueError(f"cannot create the result folder {staging}: {e.strerror or e}") from None
    batches = [list(range(i, min(i + job.batch_size, len(items)))) for i in range(0, len(items), job.batch_size)]
    done = read_done_batches(staging)
    todo = [b for b in range(len(batches)) if b not in done]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[batches[b] for b in todo],
                                         num_workers=job.num_workers, pin_memory=device.type == "cuda")
    written = dict(config_with_batch(cfg, args.batch, "test", args.gpu_ids), name=job.opt_name, phase="test",
                   distributed=False)
    written["unlearn_fast"] = dict(ckpt=os.path.abspath(args.ckpt), seed=job.seed, device=str(device),
                                   batch_size=job.batch_size, sample_num=job.sample_num, steps=n_steps,
                                   timesteps=network.num_timesteps, images=len(items), data_root=job.data_root,
                                   max_images=args.max_images, result_dir=os.path.abspath(result_dir))
    log = PaletteRunLog(os.path.join(root, "test.log"))
    n_done = sum(done[b][0] for b in done)
    with stop_signals():  # SIGINT / SIGTERM raise here, so the batches sampled so far are reported (exit 130 / 143)
        try:
            write_config_json(root, written)
            log_run_start(log, root, "test", len(items))
            if n_steps < network.num_timesteps:
                log.info(f"--steps {n_steps}: the sampler stops after {n_steps} of {network.num_timesteps} steps "
                         "(timing/smoke only: the images are not finished samples)")
            if continuing:
                line = (f"continuing the stopped palette-test in {staging}: {n_done} of {len(items)} images are "
                        f"there, {len(todo)} of {len(batches)} batches to go")
                log.info(line)
                print(f"unlearn_fast: {line}", flush=True)
            print(f"unlearn_fast: sampling {len(items)} test images, batch {job.batch_size}, {n_steps} steps, "
                  f"device {device} -> {result_dir}", flush=True)
            remove_stale_temporaries(staging)
            _sample_test_set(args, job, network, device, loader, staging, todo, len(items), n_done)
        except BaseException as e:
            os.close(lock)
            n_kept = sum(n for n, _ in read_done_batches(staging).values())
            if not n_kept:  # nothing to keep: a rerun needs no cleaning up
                shutil.rmtree(staging, ignore_errors=True)
                raise
            kept = (f"{n_kept} of {len(items)} images are kept in {staging}; run the same command again to "
                    "continue")
            why = (f"stopped ({type(e).__name__})" if not isinstance(e, KeyboardInterrupt) else "was terminated"
                   if getattr(e, "signum", None) == signal.SIGTERM else "was interrupted")
            log.info(f"palette-test {why}: {kept}")
            if isinstance(e, KeyboardInterrupt):
                e.said_exit_code = stop_line("palette-test", e, kept)  # palette_test_main returns it: one line
                raise
            if isinstance(e, (OSError, ValueError)):  # a full disk, a test image gone since the start
                raise error_with(e, kept) from None
            print(f"unlearn_fast: palette-test {why}: {kept}", file=sys.stderr, flush=True)
            raise
        done = read_done_batches(staging)
        finish_unfinished(staging, result_dir, lock, (PALETTE_TEST_BATCHES,))  # all written: the final name
    mae = sum(m for _, m in done.values()) / max(len(done), 1)
    n_images = sum(n for n, _ in done.values())
    log.value("test/mae", mae)
    log.value("epoch", 0)
    log.value("iters", n_images)
    print(f"unlearn_fast: test/mae {mae:.5f}; {n_images} images in {result_dir}")
    return result_dir


PALETTE_TEST_BATCHES = ".unlearn_fast_batches.jsonl"  # in the .partial folder: one line per finished batch


def read_done_batches(staging: str) -> dict:
    """{batch index: (images, mean |gt - output|)} of the batches a palette-test finished in ``staging``."""
    done = {}
    try:
        with open(os.path.join(staging, PALETTE_TEST_BATCHES), encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                    done[int(entry["batch"])] = (int(entry["images"]), float(entry["mae"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return done


def _sample_test_set(args, job, network, device, loader, out_dir: str, todo, n_items: int, n_done: int) -> None:
    """Sample the batches ``todo`` (indices into the test set's batches) into ``out_dir``; each finished batch is
    recorded with its mean |gt - output| (the reference's test/mae is ``nn.L1Loss`` per batch, averaged over the
    batches), after its images, so a rerun skips exactly the batches whose images are all written."""
    bar = progress_bar(n_items, not args.no_progress, "palette-test")
    if bar is not None and n_done:
        bar.update(n_done)
        bar.refresh()  # shown now, not at the next redraw
    try:
        for i, (sample, _labels) in zip(todo, loader_batches(loader)):
            gt, mask, y_cond = (sample[k].to(device) for k in ("gt_image", "mask", "cond_image"))
            g = step_generator(job.seed, 0, i, "noise", device)
            output, visuals = palette_restore(network, y_cond, gt, mask, sample_num=job.sample_num, generator=g,
                                              steps=args.steps)
            mae = torch.nn.functional.l1_loss(output.float(), gt.float()).item()
            write_restoration_images(out_dir, list(sample["path"]), gt.cpu(), visuals.cpu(), mask.cpu())
            atomic_append_text(os.path.join(out_dir, PALETTE_TEST_BATCHES),
                               json.dumps({"batch": i, "images": gt.shape[0], "mae": mae}) + "\n")
            if bar is not None:
                bar.update(gt.shape[0])
    finally:
        if bar is not None:
            bar.close()


def _one_process(command: str) -> None:
    # N torchrun copies would each train alone into their own run folder: refuse instead
    _need(env_ranks()[1] == 1, f"{command} runs in one process (no DDP); start it with "
                               "python / unlearn-fast, not torchrun (WORLD_SIZE > 1 is set)")


def palette_unlearn_main(argv: Optional[List[str]] = None) -> int:
    args = short_usage_errors(build_palette_parser("unlearn-fast palette-unlearn")).parse_args(argv)
    _one_process("palette-unlearn")
    run_palette_unlearn(args)
    return 0


def palette_test_main(argv: Optional[List[str]] = None) -> int:
    parser = short_usage_errors(build_palette_parser("unlearn-fast palette-test", default_phase="test"))
    args = parser.parse_args(argv)
    _need(args.phase == "test", "palette-test samples the test set; use palette-unlearn -p train to unlearn")
    _one_process("palette-test")
    try:
        run_palette_test(args)
    except KeyboardInterrupt as e:
        if getattr(e, "said_exit_code", None) is None:
            raise
        return e.said_exit_code  # 130 / 143; what was kept is said
    return 0


__all__ = ["build_palette_parser", "run_palette_unlearn", "run_palette_test", "palette_unlearn_main",
           "palette_test_main", "find_class_list", "read_palette_state", "load_network_file", "resume_prefix_of",
           "check_ckpt_is_teacher", "check_data_root", "debug_subset", "check_training_items", "config_with_batch",
           "palette_test_root", "check_test_result_dir"]
