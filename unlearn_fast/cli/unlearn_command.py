"""``unlearn-fast unlearn`` / ``unlearn-fast baseline``: the reference trainer's job, end to end.

Everything that can be checked is checked before the run directory is created, so bad input leaves
nothing half-written.
"""
from __future__ import annotations

import os

import torch

from ..models import create_model, list_models
from ..ops import NOISE_KINDS
from ..train.balanced_sampler import BalancedUnlearnSampler, ReferenceShuffleBatchSampler
from ..train.checkpoint import CheckpointError, args_as_dict, load_checkpoint_file, load_model_state, model_state_from
from ..train.data_split import (default_class_split, parse_class_list, reference_coco_root,
                                select_unlearning_files)
from ..train.image_datasets import UnlearnImageDataset, reference_train_transform, verify_images
from ..train.lr_schedule import base_lr, effective_batch_size
from ..train.run_outputs import check_output_dir, run_dir_name, write_opt_yaml
from ..train.trainer import resolve_step_mode, train_loop
from ..train.unlearn_setup import build_setup


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device (use cuda, cuda:N, cpu or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is visible here (use --device cpu or auto)")
    return dev


def validate_args(args, baseline: bool) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)
    need(args.model in list_models(), f"unknown --model {args.model!r}; registered: {', '.join(list_models())}")
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
    need(0.0 <= args.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    need(args.readback_every >= 1, f"--readback_every must be >= 1, got {args.readback_every}")
    if not baseline:
        need(args.noise_type in NOISE_KINDS,
             f"unknown --noise_type {args.noise_type!r}; valid: {', '.join(NOISE_KINDS)}")
    if args.forget_per_batch is not None:
        need(0 <= args.forget_per_batch <= args.batch_size,
             f"--forget_per_batch must be in [0, batch_size={args.batch_size}], got {args.forget_per_batch}")
    if args.resume:
        need(os.path.isfile(args.resume), f"--resume checkpoint not found: {args.resume}")
    if args.teacher:
        need(os.path.isfile(args.teacher), f"--teacher checkpoint not found: {args.teacher}")
    if args.vqgan_ckpt:
        need(os.path.isfile(args.vqgan_ckpt), f"--vqgan_ckpt not found: {args.vqgan_ckpt}")


def model_kwargs(args) -> dict:
    kw = {"img_size": args.input_size}
    if args.model.startswith("mage"):
        kw.update(mask_ratio_min=args.mask_ratio_min, mask_ratio_max=args.mask_ratio_max,
                  mask_ratio_mu=args.mask_ratio_mu, mask_ratio_std=args.mask_ratio_std)
    elif args.model.startswith("mae"):
        kw["mask_ratio"] = args.mask_ratio
    return kw


def build_model(args):
    model = create_model(args.model, **model_kwargs(args))
    if args.vqgan_ckpt:
        from ..models.vqgan import load_vqgan_checkpoint
        load_vqgan_checkpoint(model, args.vqgan_ckpt)
    return model


def load_training_state(args, model):
    """Load ``--resume``. Returns (resume_ckpt or None, teacher_source path or None)."""
    if not args.resume:
        print("unlearn_fast: no --resume given: unlearning a randomly initialised model (useful only for tests)")
        return None, args.teacher
    ckpt = load_checkpoint_file(args.resume)
    load_model_state(model, model_state_from(ckpt, args.resume), args.resume)
    is_unlearning_run = "optimizer" in ckpt and "epoch" in ckpt
    if not is_unlearning_run:
        return None, args.teacher or args.resume
    saved = ckpt.get("args") or {}
    teacher = args.teacher or (saved.get("teacher_checkpoint") if isinstance(saved, dict) else None)
    if not teacher:
        raise CheckpointError(f"{args.resume} continues an unlearning run but does not record the original "
                              "model; pass it with --teacher (the teacher is never the partly unlearned model)")
    if not os.path.isfile(teacher):
        raise CheckpointError(f"the teacher checkpoint recorded in {args.resume} is missing: {teacher} "
                              "(pass --teacher)")
    return ckpt, teacher


def select_data(args):
    if args.forget_classes or args.retain_classes:
        if not (args.forget_classes and args.retain_classes):
            raise ValueError("give both --forget_classes and --retain_classes")
        forget, retain = parse_class_list(args.forget_classes), parse_class_list(args.retain_classes)
    else:
        forget, retain = default_class_split(args.data_path)
    proxy_root = None
    if args.use_coco:
        proxy_root = args.proxy_path or reference_coco_root(args.data_path)
    items = select_unlearning_files(args.data_path, forget, retain, args.num_image_per_class, args.retainset_ratio,
                                    args.opendata_to_forget_ratio, proxy_root, args.seed)
    if args.verify_images:
        verify_images(items)
    return items


def run_unlearn(args, baseline: bool = False) -> str:
    """Run the job; returns the run directory."""
    validate_args(args, baseline)
    device = resolve_device(args.device)
    items = select_data(args)
    labels = torch.tensor([lab for _, lab in items])
    dataset = UnlearnImageDataset(items, reference_train_transform(args.input_size, args.use_coco), seed=args.seed)
    world = max(args.world_size, 1)
    if args.forget_per_batch is not None:
        sampler = BalancedUnlearnSampler(labels, args.batch_size, args.forget_per_batch, seed=args.seed)
    else:
        sampler = ReferenceShuffleBatchSampler(len(items), args.batch_size, seed=args.seed)
    steps = sampler.steps_per_epoch
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)

    model = build_model(args)
    resume_ckpt, teacher_source = load_training_state(args, model)
    teacher = None
    if teacher_source and resume_ckpt is not None:
        teacher = build_model(args)
        load_model_state(teacher, model_state_from(load_checkpoint_file(teacher_source), teacher_source),
                         teacher_source)
    elif args.teacher:
        teacher = build_model(args)
        load_model_state(teacher, model_state_from(load_checkpoint_file(args.teacher), args.teacher), args.teacher)

    eff = effective_batch_size(args.batch_size, args.accum_iter, world)
    lr = base_lr(args.lr, args.blr, eff)
    loss_type = getattr(args, "loss_type", None)
    mode = resolve_step_mode(args.step, device, loss_type, args.accum_iter, args.forget_per_batch is not None)
    setup = build_setup(model, device, lr=lr, weight_decay=args.weight_decay, precision=args.precision,
                        retain_alpha=args.retain_alpha, forget_alpha=args.forget_alpha,
                        noise_type=getattr(args, "noise_type", "normal"), grad_clip=args.grad_clip,
                        accum_iter=args.accum_iter, seed=args.seed, loss_type=loss_type,
                        baseline_weighting=getattr(args, "baseline_weighting", "reference"),
                        share_tokenizer=args.share_tokenizer, fast=mode != "reference",
                        capturable=mode == "graphed", teacher=teacher)
    start_epoch = args.start_epoch
    if resume_ckpt is not None:
        setup.optimizer.load_state_dict(resume_ckpt["optimizer"])
        if "scaler" in resume_ckpt and resume_ckpt["scaler"]:
            setup.scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"]) + 1
        if start_epoch >= args.epochs:
            raise ValueError(f"{args.resume} already finished epoch {resume_ckpt['epoch']} of --epochs {args.epochs}")

    run_dir = os.path.join(args.output_dir, run_dir_name(args, baseline))
    check_output_dir(run_dir)
    args.log_dir = run_dir  # the reference overwrites log_dir with the run directory
    args_dict = args_as_dict(args)
    args_dict.update(teacher_checkpoint=os.path.abspath(teacher_source) if teacher_source else None,
                     lr_resolved=lr, eff_batch_size=eff, step_mode=mode, device_resolved=str(device))
    write_opt_yaml(run_dir, args_dict)
    print(f"unlearn_fast: {len(items)} images ({int((labels < 100).sum())} forget), {steps} steps/epoch, "
          f"lr {lr:.3g} (eff. batch {eff}), step '{mode}', precision '{args.precision}', device {device}")
    print(f"unlearn_fast: writing to {run_dir}")

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=args.pin_mem and device.type == "cuda",
                                         persistent_workers=False)

    def epoch_batches(epoch):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        return iter(loader)

    image_shape = (3, args.input_size, args.input_size)
    train_loop(setup, epoch_batches, steps, epochs=args.epochs, lr=lr, min_lr=args.min_lr,
               warmup_epochs=args.warmup_epochs, start_epoch=start_epoch, output_dir=run_dir, args_dict=args_dict,
               step_mode=mode, readback_every=args.readback_every, progress=not args.no_progress,
               forget_per_batch=args.forget_per_batch, batch_size=args.batch_size, image_shape=image_shape)
    return run_dir


__all__ = ["run_unlearn", "validate_args", "resolve_device"]
