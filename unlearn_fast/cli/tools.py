"""``unlearn-fast generate | eval | tsne | report``: the reference's evaluation scripts as subcommands.

    unlearn-fast generate --task inpaint --ckpt_path out/run/checkpoint-5.pth --vqgan_ckpt pretrained/vqgan_jax_strongaug.ckpt
    unlearn-fast eval --dst out/run/checkpoint-5-inpaint/ --task inpaint --data_root ../dataset/imagenet1k/val/
    unlearn-fast eval --dst out/run/checkpoint-5-inpaint/ --task inpaint --clip     # clip_cosine_inpaint.csv
    unlearn-fast eval --dst out/16_Network/ --palette_class_list datasets/place365/flist/class.txt   # fid_is_eval.csv
    unlearn-fast eval --dst out/16_Network/ --palette_class_list class.txt --clip --data_root ../dataset/places365
    unlearn-fast tsne --ckpt_folder out/run/checkpoint-5-inpaint/ --crop_size 8
    unlearn-fast report out/run/
Weights are read from local files only (flags, environment variables or ./pretrained/); a missing file
is named with the flag that points to it. ``generate`` writes into ``<output>.partial/`` and renames it to
``<output>`` once every image is written: a stopped run leaves no folder that ``eval`` would take for complete
(``eval`` refuses the ``.partial`` one), and an ``<output>`` that already holds files is never written into. The
``.partial`` folder holds a record of what makes the images (the checkpoint's sha256, the flags, the test images):
the same command continues a stopped generate; another checkpoint or other flags are refused, never mixed in.
A stop (Ctrl-C, SIGTERM: exit 130 / 143) or a failed write is one line saying what was kept and how to go on.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from typing import List, Optional

import torch

from .help_format import DefaultsHelpFormatter, short_usage_errors
from .unfinished_output import (check_unfinished, count_images, error_with, file_sha256, finish_unfinished,
                                listing_sha256, open_unfinished, remove_stale_temporaries, stop_line, written_whole)


def _device(spec: str) -> torch.device:
    from .unlearn_command import resolve_device
    return resolve_device(spec)


def _test_items(data_root: str, forget, retain, per_class: int):
    """(path, split, wnid, name) for the reference test set: every val image of the forget and retain classes
    (``full_test.csv`` = 50 per class of the 200 ImageNet-R classes), sorted."""
    from ..train.data_split import list_images
    val = os.path.join(data_root, "val") if os.path.isdir(os.path.join(data_root, "val")) else data_root
    items = []
    for split, classes in (("forget", forget), ("retain", retain)):
        for wnid in classes:
            folder = os.path.join(val, wnid)
            if not os.path.isdir(folder):
                raise ValueError(f"test class folder not found: {folder}")
            files = list_images(folder)
            if not files:
                raise ValueError(f"test class folder has no images: {folder}")
            items += [(p, split, wnid, os.path.basename(p)) for p in files[:per_class]]
    return items


class _TestBatches:
    """Re-iterable ``(images [N, 3, S, S], splits, wnids, names)`` chunks of ``items``, decoded while iterated,
    so the 10k-image test set is never held in memory at once."""

    def __init__(self, items, input_size: int, batch_size: int, bar=None):
        from ..train.image_datasets import eval_transform
        self.items, self.batch_size, self.transform = items, batch_size, eval_transform(input_size)
        self.bar = bar  # a progress bar of len(items), advanced as each chunk is done

    def __iter__(self):
        from ..train.image_datasets import load_rgb_image
        for i in range(0, len(self.items), self.batch_size):
            chunk = self.items[i:i + self.batch_size]
            images = torch.stack([self.transform(load_rgb_image(path)) for path, *_ in chunk])
            yield images, [c[1] for c in chunk], [c[2] for c in chunk], [c[3] for c in chunk]
            if self.bar is not None:  # the consumer asks for the next chunk once this one is written
                self.bar.update(len(chunk))


def generate_record(a, items) -> dict:
    """What makes a generate's images, keyed by the flag that sets it: a rerun continues a stopped generate only
    when every entry is equal (the checkpoint by content, so one rewritten in place is another checkpoint)."""
    return {"command": "unlearn-fast generate", "--ckpt_path": file_sha256(a.ckpt_path),
            "--vqgan_ckpt": file_sha256(a.vqgan_ckpt) if a.vqgan_ckpt else None, "--model": a.model,
            "--input_size": a.input_size, "--task": a.task, "--seed": a.seed, "--channel_order": a.channel_order,
            "test images": [len(items), listing_sha256((f"{s}/{w}/{n}", p) for p, s, w, n in items)]}


def generate_staging_dir(out: str, record: Optional[dict] = None) -> str:
    """``<out>.partial``, the folder ``generate`` writes into, after checking that ``out`` holds no earlier run's
    files (an image folder that mixes two runs would be evaluated as one) and that an existing ``<out>.partial``
    is a stopped generate of the same ``record`` (which this run continues), never another's."""
    out = os.path.normpath(out)
    if out.endswith(".partial"):  # eval takes such a folder for an unfinished one
        raise ValueError(f"--output {out} ends in .partial, the mark of an unfinished output; pass another --output")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"the output {out} exists and is not a folder; pass another --output")
    if os.path.isdir(out) and os.listdir(out):
        held = sum(len(files) for _, _, files in os.walk(out))
        raise ValueError(f"{out} already holds {held} files (an earlier generate?); move or delete it, "
                         "or pass another --output, to generate again")
    staging = out + ".partial"
    if os.path.lexists(staging) and record is not None:
        check_unfinished(staging, record, "generate")
    return staging


def one_line_bad_images(e: Exception, command: str) -> str:
    """verify_images' report (a count, then one line per file) as one line."""
    head, *files = str(e).splitlines()
    more = f" (and {len(files) - 1} more)" if len(files) > 1 else ""
    return f"{head.rstrip(':')}, e.g. {files[0] if files else '?'}{more}; fix or remove them, then run {command} again"


def generate_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn-fast generate", formatter_class=DefaultsHelpFormatter,
                                description="MAGE inpaint/outpaint of the test set (reference testpaint.py), batched. "
                                            "The images go to <output>.partial/ until every one is written; a "
                                            "stopped generate is continued by the same command")
    p.add_argument("--task", required=True, choices=("inpaint", "outpaint"))
    p.add_argument("--ckpt_path", required=True, help="checkpoint-{epoch}.pth (or a pretrained MAGE checkpoint)")
    p.add_argument("--model", default="mage_vit_base_patch16", help="the architecture of --ckpt_path")
    p.add_argument("--vqgan_ckpt", default=None, help="VQGAN tokenizer checkpoint, if the model checkpoint lacks it")
    p.add_argument("--dataset", default="img", choices=("img",), help="as the reference (ImageNet)")
    p.add_argument("--data_root", default="../dataset/imagenet1k/",
                   help="the test images: <data_root>/val/<class>/* (or <data_root>/<class>/*)")
    p.add_argument("--input_size", type=int, default=256, help="image size in pixels (the model's)")
    p.add_argument("--forget_classes", default=None, help="comma-separated (default: the reference split)")
    p.add_argument("--retain_classes", default=None, help="comma-separated (default: the reference split)")
    p.add_argument("--per_class", type=int, default=50, help="test images per class (reference: all 50)")
    p.add_argument("--batch_size", type=int, default=16, help="images generated at once")
    p.add_argument("--channel_order", default="bgr", choices=("bgr", "rgb"),
                   help="bgr reproduces the reference's R/B-swapped files (RGB arrays written through cv2)")
    p.add_argument("--output", default=None, help="default: <ckpt without .pth>-<task> (as the reference); "
                                                   "refused if it already holds files")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed, reset for every image")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:N, or auto")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = short_usage_errors(p).parse_args(argv)
    from ..models import create_model
    from ..models.mage_generate import paint_file_name, paint_settings, run_paint
    from ..train.checkpoint import load_checkpoint_file, load_model_state, model_state_from
    from ..train.data_split import parse_class_list, reference_class_split
    from ..train.image_datasets import BadImageError, verify_images
    from ..train.progress import progress_bar
    from .unlearn_command import stop_signals
    if not os.path.isfile(a.ckpt_path):
        raise ValueError(f"--ckpt_path not found: {a.ckpt_path}")
    if a.vqgan_ckpt and not os.path.isfile(a.vqgan_ckpt):
        raise ValueError(f"--vqgan_ckpt not found: {a.vqgan_ckpt}")
    for flag, value in (("--per_class", a.per_class), ("--batch_size", a.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if a.forget_classes or a.retain_classes:
        forget, retain = parse_class_list(a.forget_classes or ""), parse_class_list(a.retain_classes or "")
    else:
        forget, retain = reference_class_split()
    out = os.path.normpath(a.output or os.path.splitext(a.ckpt_path)[0] + f"-{a.task}")
    generate_staging_dir(out)  # a filled output fails before the test images are read
    items = _test_items(a.data_root, forget, retain, a.per_class)
    try:
        verify_images([path for path, *_ in items])  # a bad file fails now, not after hours of writing images
    except BadImageError as e:
        raise BadImageError(one_line_bad_images(e, "generate")) from None
    record = generate_record(a, items)
    staging = generate_staging_dir(out, record)  # a stopped generate of this job is continued; another's refused
    dev = _device(a.device)
    model = create_model(a.model, img_size=a.input_size)
    if a.vqgan_ckpt:
        from ..models.vqgan import load_vqgan_checkpoint
        load_vqgan_checkpoint(model, a.vqgan_ckpt)
    load_model_state(model, model_state_from(load_checkpoint_file(a.ckpt_path), a.ckpt_path), a.ckpt_path)
    model.to(dev).eval()
    settings = paint_settings(a.task)
    total = len(items) * len(settings)
    continuing = os.path.isdir(staging)
    with stop_signals():  # SIGTERM too raises here (a batch job's kill), so what was written is reported
        lock = open_unfinished(staging, record, "generate")
        try:
            remove_stale_temporaries(staging)
            todo = [item for item in items if not all(written_whole(os.path.join(
                staging, item[1], item[2], paint_file_name(mode, ratio, item[3]))) for mode, ratio in settings)]
            had = count_images(staging)
            if continuing:
                print(f"unlearn-fast generate: continuing the stopped generate in {staging}: {had} of {total} "
                      f"images are there, {len(todo)} of {len(items)} test images to go", flush=True)
            print(f"unlearn-fast generate: {len(items)} test images x {len(settings)} {a.task} settings = {total} "
                  f"images, batch {a.batch_size}, device {dev} -> {out}", flush=True)
            bar = progress_bar(len(items), not a.no_progress, f"generate {a.task}")
            if bar is not None and len(todo) < len(items):
                bar.update(len(items) - len(todo))
                bar.refresh()  # shown now, not at the next redraw
            try:
                run_paint(model, _TestBatches(todo, a.input_size, a.batch_size, bar), staging, a.task, seed=a.seed,
                          channel_order=a.channel_order)
            finally:
                if bar is not None:
                    bar.close()
        except BaseException as e:
            os.close(lock)
            written = count_images(staging)
            if not written:  # nothing to keep: a rerun needs no cleaning up
                shutil.rmtree(staging, ignore_errors=True)
                raise
            kept = f"{written} of {total} images are kept in {staging}; run the same command again to continue"
            if isinstance(e, KeyboardInterrupt):
                return stop_line("generate", e, kept)
            if isinstance(e, (OSError, ValueError)):  # a full disk, a test image gone or broken since the start
                raise error_with(e, kept) from None
            print(f"unlearn-fast generate stopped ({type(e).__name__}): {kept}", file=sys.stderr, flush=True)
            raise
        finish_unfinished(staging, out, lock)
    print(f"unlearn-fast generate: wrote {total} images under {out}"
          + (f" ({total - had} by this run)" if continuing else ""))
    return 0


def eval_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn-fast eval", formatter_class=DefaultsHelpFormatter,
                                description="FID/IS (eval.py) or CLIP cosine (clip_embed.py) of a generated folder; "
                                            "the results are printed and appended to the reference's CSV in --csv_dir")
    p.add_argument("-d", "--dst", required=True, help="generated folder: <ckpt>-<task>/ for MAGE; for Palette the "
                                                 "<ckpt without .pth>/ folder or its results/test/0/<mask_ratio>/")
    p.add_argument("--task", default="inpaint", choices=("inpaint", "outpaint"), help="MAGE: what --dst holds")
    p.add_argument("--data_root", default=None,
                   help="MAGE: the original (uncropped) val images, <data_root>/<wnid>/<name> (default "
                        "../dataset/imagenet1k/val/); Palette --clip: the Places-365 root with val_256/ (default "
                        "../dataset/places365)")
    p.add_argument("--clip", action="store_true", help="CLIP cosine instead of FID/IS")
    p.add_argument("--palette_class_list", default=None, help="Places-365 class.txt: evaluate a Palette folder")
    p.add_argument("--mask_ratio", type=float, default=0.5, help="Palette: the results/test/0/<mask_ratio>/ folder")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits (reference 10; each split "
                                                          "needs at least one image)")
    p.add_argument("--name_pattern", default="ILSVRC2012_*.JPEG",
                   help="MAGE: original file names to evaluate (the reference glob; '*' for other data)")
    p.add_argument("--cleanfid_inception", default=None, help="clean-fid inception-2015-12-05.pt")
    p.add_argument("--inception_weights", default=None, help="torchvision inception_v3 state dict (IS)")
    p.add_argument("--clip_weights", default=None, help="open_clip ViT-H-14 laion2b weights")
    p.add_argument("--places365_weights", default=None, help="resnet50_places365.pth.tar (Palette IS)")
    p.add_argument("--csv_dir", default=".", help="where the reference CSVs are appended")
    p.add_argument("--batch_size", type=int, default=32, help="images per feature-extractor batch")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding the images")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:N, or auto")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = short_usage_errors(p).parse_args(argv)
    from ..eval import csv_rows, layout, pipeline
    from .unlearn_command import stop_signals
    dev = _device(a.device)
    if not os.path.isdir(a.dst):
        raise ValueError(f"--dst is not a folder: {a.dst}")
    if a.data_root is None:  # the reference scripts' defaults
        a.data_root = "../dataset/places365" if a.palette_class_list else "../dataset/imagenet1k/val/"
    if a.splits < 1:
        raise ValueError(f"--splits must be >= 1, got {a.splits}")
    if a.palette_class_list and not os.path.isfile(a.palette_class_list):
        raise ValueError(f"--palette_class_list not found: {a.palette_class_list}")
    task = None if a.palette_class_list else a.task
    csv_name = csv_rows.clip_cosine_csv_name(task) if a.clip else csv_rows.fid_is_csv_name(task)
    csv_path = os.path.join(a.csv_dir, csv_name)
    appended, expected = [], 1 if a.palette_class_list else len(
        (layout.clip_modes if a.clip else layout.eval_modes)(a.task))
    shared = dict(csv_dir=a.csv_dir, device=dev, batch_size=a.batch_size, progress=not a.no_progress,
                  on_row=appended.append)
    try:
        with stop_signals():  # SIGTERM too raises here, so the rows appended so far are reported
            if a.palette_class_list and a.clip:
                rows = pipeline.run_palette_clip_eval(a.dst, a.palette_class_list, a.data_root, mask_ratio=a.mask_ratio,
                                                      clip_weights=a.clip_weights, **shared)
            elif a.palette_class_list:
                rows = pipeline.run_palette_eval(a.dst, a.palette_class_list, mask_ratio=a.mask_ratio,
                                                 cleanfid_weights=a.cleanfid_inception,
                                                 places365_weights=a.places365_weights,
                                                 inception_weights=a.inception_weights, num_workers=a.num_workers,
                                                 splits=a.splits, **shared)
            elif a.clip:
                rows = pipeline.run_clip_eval(a.dst, a.task, a.data_root, clip_weights=a.clip_weights,
                                              name_pattern=a.name_pattern, **shared)
            else:
                rows = pipeline.run_eval(a.dst, a.task, a.data_root, cleanfid_weights=a.cleanfid_inception,
                                         inception_weights=a.inception_weights, num_workers=a.num_workers,
                                         splits=a.splits, name_pattern=a.name_pattern, **shared)
    except (KeyboardInterrupt, OSError, ValueError) as e:
        if not appended and not isinstance(e, KeyboardInterrupt):
            raise  # nothing appended: the error alone says it
        names = ", ".join(os.path.basename(os.path.normpath(str(r["name"]))) or str(r["name"]) for r in appended)
        kept = (f"{len(appended)} of {expected} rows were appended to {csv_path}" + (f" ({names})" if names else "")
                + "; a rerun evaluates every setting again and appends its rows anew")
        if isinstance(e, KeyboardInterrupt):
            return stop_line("eval", e, kept)
        raise (OSError if isinstance(e, OSError) else ValueError)(f"{e}; {kept}") from None
    rows = rows if isinstance(rows, list) else [rows]
    print(format_eval_rows(rows, a.dst))
    print(f"unlearn-fast eval: appended {len(rows)} row(s) to {csv_path}")
    return 0


def format_eval_rows(rows: List[dict], dst: str) -> str:
    """The rows ``eval`` appended, as a small table: FID / IS (mean ± std) or the CLIP cosine, retain and forget
    (for unlearning: retain close to the original model, forget far from it)."""
    def name_of(row):
        name = str(row.get("name", ""))
        return os.path.relpath(name, dst) if name.startswith(os.path.join(dst, "")) else os.path.basename(
            os.path.normpath(name)) or name
    names = [name_of(r) for r in rows]
    width = max([len("setting")] + [len(n) for n in names])
    if all(isinstance(r.get("retain"), dict) for r in rows):  # FID / IS
        lines = [f"{'setting':<{width}}  {'FID retain':>10}  {'IS retain':>15}  {'FID forget':>10}  {'IS forget':>15}"]
        for name, r in zip(names, rows):
            cells = []
            for split in ("retain", "forget"):
                m = r[split]
                cells += [f"{m['fid']:>10.3f}", f"{m['is_mean']:>7.3f} ± {m['is_std']:<5.3f}"]
            lines.append(f"{name:<{width}}  " + "  ".join(cells))
        return "\n".join(lines)
    lines = [f"{'setting':<{width}}  {'CLIP retain':>11}  {'CLIP forget':>11}"]
    for name, r in zip(names, rows):
        lines.append(f"{name:<{width}}  {float(r['retain']):>11.4f}  {float(r['forget']):>11.4f}")
    return "\n".join(lines)


def tsne_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn-fast tsne", description="T-SNE of CLIP embeddings (tsne_visual.py)",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt_folder", required=True, help="a generated folder that 'eval --clip' embedded")
    p.add_argument("--original_folder", default=None,
                   help="where {forget,retain}_clip_norm_5k.* of the originals are (default: <ckpt_folder>/original_*, "
                        "then ./pretrained/ as tsne_visual.py)")
    p.add_argument("--crop_size", type=int, default=8)
    p.add_argument("--stride", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    # tsne_visual.py's other flags, accepted so that its command lines run: --ratio is read nowhere there, --cuda
    # picks its tensor device (here the t-SNE runs in float64 on the CPU: 200 points take about a second)
    p.add_argument("--ratio", type=int, default=65, help="unused (as tsne_visual.py)")
    p.add_argument("--cuda", type=int, default=1, help="unused: the t-SNE runs on the CPU")
    a = short_usage_errors(p).parse_args(argv)
    from ..eval.tsne import run_tsne
    png, pdf = run_tsne(a.ckpt_folder, original_folder=a.original_folder, crop_size=a.crop_size, stride=a.stride,
                        seed=a.seed)
    print(f"unlearn-fast tsne: wrote {png} and {pdf}")
    return 0


# what makes a folder reportable: an unlearning run's flags / log, the demo's metrics, a Palette run's config / log
REPORTED_FILES = ("opt.yaml", "log.txt", "metrics.json", "config.json", "train.log")


def report_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="unlearn-fast report", description="one self-contained HTML page for a run: "
                                "its flags, log curves, --eval_every table, audit table and PNGs")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default: <run_dir>/report.html")
    a = short_usage_errors(p).parse_args(argv)
    from ..eval.report import write_report
    if not os.path.isdir(a.run_dir):
        what = "is a file" if os.path.exists(a.run_dir) else "does not exist"
        raise ValueError(f"{a.run_dir} {what}: pass the run directory an unlearn or palette run printed")
    if not any(os.path.isfile(os.path.join(a.run_dir, f)) for f in REPORTED_FILES):
        from .audit_command import runs_inside
        inside = runs_inside(a.run_dir)
        hint = (f"; it holds {len(inside)} run(s), e.g. the newest: unlearn-fast report {shlex.quote(inside[-1])}"
                if inside else "")
        raise ValueError(f"{a.run_dir} is not a run directory (none of {', '.join(REPORTED_FILES)}): nothing to "
                         f"report{hint}")
    if a.out is not None and os.path.isdir(a.out):
        raise ValueError(f"--out is a folder, not an .html file: {a.out}")
    path = write_report(a.run_dir, a.out)
    print(f"unlearn-fast report: wrote {path}")
    return 0
