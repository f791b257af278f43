"""``unlearn-fast audit RUN_DIR``: the forget audit of an unlearning run, before and after.

    unlearn-fast audit output_dir/class_img1k__numimg_120_..._normal_20261127-101500
    unlearn-fast audit RUN_DIR --checkpoint RUN_DIR/checkpoint-3.pth --images 256 --device cuda

A membership-style test (:mod:`unlearn_fast.eval.forget_audit`): per-image task error of the model on
forget-class images it was unlearned on ("forget_train": the run's own training files of the forget classes)
against forget-class images it never saw ("unseen": the other files of the same class folders). The AUC is
P(a training image has the lower error); 0.5 = no membership signal. It is measured on the original model
(the run's teacher checkpoint, "before") and on the unlearned one (default: the run's last
``checkpoint-{epoch}.pth``, "after"), with the same images and the same fixed task draws (seeded). The retain
classes give the same numbers as a control (unlearning should leave them alone). Errors: MAE, the inpainting
MSE of the hidden pixels; MAGE, the cross-entropy of the hidden tokens (as ``--eval_every``).

Everything comes from the run directory: ``opt.yaml`` (the run's flags, data split and teacher path) and its
checkpoints; ``--data_path`` / ``--teacher`` override moved files. The training files are rebuilt from the flags and
the data folder, then checked against the run's ``data_split.json`` (count and sha256 of each split's paths): a data
folder that gives other files (images added or removed since the run) is refused, as its "forget_train" and "unseen"
groups would be wrong; a run without that file (made before runs wrote it) is audited unchecked, said on stderr.
Writes ``RUN_DIR/forget_audit.json`` (atomically) and prints a short table; ``unlearn-fast report`` shows it. Images
are read ``AUDIT_CHUNK`` at a time (a progress bar on stderr; ``--no_progress``), so any ``--images`` fits in memory.
A ``--checkpoint`` whose recorded flags choose other training images (another run's) is refused, as is one of another
architecture.
Everything is checked before the work; a run directory that cannot be written still gets the table printed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from types import SimpleNamespace
from typing import List, Optional

import torch

from ..atomic_files import OutputWriteError, atomic_write_text
from ..eval.forget_audit import forget_audit_summary
from ..eval.periodic_eval import EVAL_CHUNK, per_image_errors
from ..train.checkpoint import CheckpointError, load_checkpoint_file, load_model_state, model_state_from
from ..train.data_split import seeded_shuffle
from ..train.holdout_split import select_holdout_files
from ..train.image_datasets import load_eval_images
from ..train.progress import progress_bar
from ..train.run_outputs import (DATA_SPLIT_FILE, data_split_difference, data_split_record, opt_yaml_objects,
                                 read_data_split)
from ..train.seeding import derive_seed
from .help_format import DefaultsHelpFormatter, short_usage_errors
from .unlearn_command import (build_model, class_lists, resolve_device, select_data, stop_signals,
                              training_splits)

AUDIT_FILE = "forget_audit.json"
AUDIT_CHUNK = EVAL_CHUNK  # images read and scored at a time: host memory stays bounded for any --images
SMALL_GROUP = 10  # below this many images in a group, the AUC is coarse (steps of 1 / (n_train * n_unseen))
# opt.yaml's flags that decide which images a run trained on: a --checkpoint whose recorded args differ is
# another run's (its data_path / output_dir may differ after a move: they do not decide the split)
RUN_IDENTITY_KEYS = ("model", "input_size", "forget_classes", "retain_classes", "num_image_per_class",
                     "retainset_ratio", "seed", "use_coco", "opendata_to_forget_ratio")


def check_run_dir(run_dir: str) -> None:
    if os.path.isfile(run_dir):
        raise ValueError(f"not a run directory: {run_dir} is a file; pass the folder holding opt.yaml and "
                         "checkpoint-<e>.pth that an unlearn / baseline run printed ('writing to ...')")
    if not os.path.isdir(run_dir):
        raise ValueError(f"not a run directory: {run_dir} does not exist")


def read_run_args(run_dir: str) -> dict:
    """The last JSON object of ``RUN_DIR/opt.yaml`` (the file is appended once per start of the run)."""
    path = os.path.join(run_dir, "opt.yaml")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(run_dir, "config.json")):
            raise ValueError(f"{run_dir} is a Palette run (config.json, no opt.yaml): the audit measures MAE / "
                             "MAGE unlearning runs (unlearn-fast unlearn / baseline)")
        inside = runs_inside(run_dir)
        if inside:  # the --output_dir the run was given: its run directory is one level down
            raise ValueError(f"{run_dir} is not an unlearning run directory (no opt.yaml) but holds {len(inside)}: "
                             f"pass one, e.g. the newest: unlearn-fast audit {inside[-1]}")
        raise ValueError(f"{run_dir} is not an unlearning run directory (no opt.yaml)")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not readable (not UTF-8 text: {e})") from None
    objects, error = opt_yaml_objects(text)
    if error is not None and not objects:  # YAML of another tool, or a file that is no JSON at all
        raise ValueError(f"{path} is not readable: not an unlearn-fast opt.yaml (no JSON: {error}); pass the run "
                         "directory an unlearn / baseline run printed")
    if error is not None:
        raise ValueError(f"{path} is not readable ({error})")
    last = objects[-1] if objects else None
    if not isinstance(last, dict):
        raise ValueError(f"{path} holds no argument dictionary")
    return last


def _check_run_values(saved: dict, path: str) -> None:
    """The opt.yaml values the audit uses, checked before any work (an edited or foreign file would otherwise
    fail deep inside, or speak of flags the audit does not have)."""
    from ..models import list_models
    model = saved["model"]
    if not isinstance(model, str) or model not in list_models():
        raise ValueError(f"{path} names model {model!r}, not one of unlearn-fast's MAE / MAGE models; was the file "
                         "edited, or written by another tool?")
    if model.startswith("palette"):
        raise ValueError(f"{path} names the Palette model {model!r}: the audit measures MAE / MAGE runs")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    for key, ok, what in (("input_size", lambda v: is_int(v) and v >= 8, "an image size >= 8"),
                          ("seed", is_int, "an integer"),
                          ("num_image_per_class", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
                          ("retainset_ratio", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and v > 0, "a number > 0")):
        if not ok(saved[key]):
            raise ValueError(f"{path}: {key} {saved[key]!r} is not {what}; was the file edited, or written by "
                             "another tool?")


def _audit_device(spec: str) -> torch.device:
    """``--device`` resolved before any work; the audit runs on the CPU or a CUDA GPU only."""
    try:
        kind = "auto" if spec == "auto" else torch.device(spec).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {spec!r} is not supported (use cuda, cuda:N, cpu or auto)")
    return resolve_device(spec)


def runs_inside(folder: str) -> List[str]:
    """The run directories (folders holding an opt.yaml) directly inside ``folder``, oldest first (by the
    opt.yaml's modification time; run names end in their start time)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n, "opt.yaml"))]
    return sorted(found, key=lambda d: (os.path.getmtime(os.path.join(d, "opt.yaml")), d))


def latest_checkpoint(run_dir: str) -> str:
    names = os.listdir(run_dir)
    found = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", n))]
    if not found:
        # what a run stopped in its first epoch may have left (--save_every_steps, --eval_every, the .safetensors)
        others = sorted(n for n in names if n == "checkpoint-last.pth" or n == "best.pth"
                        or re.fullmatch(r"checkpoint-\d+\.safetensors", n))
        hint = (f"; it holds {', '.join(others)}: pass --checkpoint {os.path.join(run_dir, others[0])}" if others
                else " (the run has not finished an epoch); pass --checkpoint FILE")
        raise ValueError(f"{run_dir} has no checkpoint-<epoch>.pth yet{hint}")
    return os.path.join(run_dir, max(found)[1])


def _not_this_run(flag: str, path: str, ckpt: dict, saved: dict) -> Optional[str]:
    """Why ``--checkpoint`` is another run's (its recorded flags choose other training images), or None."""
    recorded = ckpt.get("args")
    recorded = vars(recorded) if isinstance(recorded, argparse.Namespace) else recorded
    if not isinstance(recorded, dict):
        return None  # the trained parameters alone (.safetensors, best.pth): nothing to compare
    differ = [k for k in RUN_IDENTITY_KEYS if k in recorded and k in saved and recorded[k] != saved[k]]
    if not differ:
        return None
    k = differ[0]
    where = recorded.get("output_dir")
    return (f"{flag} {path} was written by another run{f' ({where})' if where else ''}: its {k} is "
            f"{recorded[k]!r}, this run's {saved[k]!r} (opt.yaml), so it trained on other images; "
            + (f"audit that run: unlearn-fast audit {where}" if where else "pass a checkpoint of this run"))


def _checkpoint_does_not_fit(flag: str, path: str, args, error: Exception) -> CheckpointError:
    """load_model_state's message, which lists every mismatched key and speaks of unlearn flags, as one short
    line: what the file is, what this run's model is."""
    text = str(error)
    if " does not fit model " not in text:
        return error
    names = re.search(r"the file fits --model (.+?) \(", text)
    size = re.search(r"position tables are for (\d+)-pixel images", text)
    what = (f"it holds a {names.group(1)} model" if names else f"it is for {size.group(1)}-pixel images" if size
            else "it holds another architecture")
    return CheckpointError(f"{flag} {path} does not fit this run's model {args.model} at {args.input_size} px "
                           f"(opt.yaml): {what}; pass a checkpoint of this run")


def load_audited_model(args, path: str, teacher: str, flag: str = "--checkpoint", saved: Optional[dict] = None):
    """The model of checkpoint ``path``. A file of the trained parameters only (``checkpoint-<e>.safetensors``,
    ``best.pth``) is laid over the teacher's weights: everything else was frozen during unlearning. ``saved``
    (opt.yaml's flags): refuse a checkpoint another run wrote."""
    model = build_model(args)
    ckpt = load_checkpoint_file(path)
    if saved is not None:
        why = _not_this_run(flag, path, ckpt, saved)
        if why:
            raise ValueError(why)
    state = model_state_from(ckpt, path)
    own = model.state_dict()
    if state and path != teacher and set(state) < set(own):  # a proper subset of the keys: trained params only
        full = dict(model_state_from(load_checkpoint_file(teacher), teacher))
        full.update(state)
        state = full
    try:
        load_model_state(model, state, path)
    except CheckpointError as e:
        raise _checkpoint_does_not_fit(flag, path, args, e) from None
    return model


def _pick(paths: List[str], count: int, seed: int, what: str) -> List[str]:
    return seeded_shuffle(sorted(set(paths)), seed, "audit", what)[:count]


def _set_errors(models: dict, paths: List[str], input_size: int, seed: int, name: str, bar) -> dict:
    """{when: errors [n]} of each model on ``paths`` under one fixed task draw, read ``AUDIT_CHUNK`` images at a
    time. The draw is made for all n rows at once from their count (MAE / MAGE draws depend on nothing else), so
    the numbers do not depend on the chunk size."""
    n = len(paths)
    shape_only = torch.zeros(1, 3, input_size, input_size).expand(n, -1, -1, -1)  # [n, 3, S, S], no memory
    task = models["before"].sample_task(shape_only, torch.Generator().manual_seed(derive_seed(seed, "audit", name)))
    errors = {when: [] for when in models}
    for lo in range(0, n, AUDIT_CHUNK):
        rows = torch.arange(lo, min(lo + AUDIT_CHUNK, n))
        x = load_eval_images(paths[lo:lo + AUDIT_CHUNK], input_size)
        chunk_task = task.select(rows)
        for when, model in models.items():
            errors[when].append(per_image_errors(model, x, chunk_task))
        if bar is not None:
            bar.update(len(rows))
    return {when: torch.cat(e) for when, e in errors.items()}


def check_training_files(run_dir: str, data_path: str, train: dict) -> bool:
    """Whether the run recorded its training files (``data_split.json``); a ValueError when the files rebuilt from
    its flags (``train``: {"forget": paths, "retain": paths}) under ``data_path`` are not those."""
    recorded = read_data_split(run_dir)
    if recorded is None:
        return False
    diff = data_split_difference(recorded, data_split_record(data_path, train))
    if diff:
        split, n_was, n_now = diff
        raise ValueError(f"the {split} split's training files under {data_path} are not those the run recorded in "
                         f"its {DATA_SPLIT_FILE}: {n_was} files recorded, {n_now} now"
                         + (" (other files)" if n_was == n_now else "") + "; restore the folder as it was at the "
                         "run, or pass --data_path pointing at the run's data")
    return True


def measure_audit(run_dir: str, checkpoint: Optional[str] = None, images: int = 64, device: str = "auto",
                  data_path: Optional[str] = None, teacher: Optional[str] = None, announce: bool = False,
                  progress: bool = False) -> dict:
    """The audit of ``run_dir`` (see the module docstring), without writing it. ``announce``: print what is
    compared before the work starts (the CLI); ``progress``: a progress bar over the images on stderr."""
    check_run_dir(run_dir)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    dev = _audit_device(device)
    saved = read_run_args(run_dir)
    opt_path = os.path.join(run_dir, "opt.yaml")
    needed = ("model", "input_size", "data_path", "seed", "num_image_per_class", "retainset_ratio")
    missing = [k for k in needed if k not in saved]
    if missing:
        raise ValueError(f"{opt_path} lacks {', '.join(missing)}; was it written by unlearn-fast?")
    _check_run_values(saved, opt_path)
    # vqgan_ckpt: None, as every checkpoint of a run holds the vqgan.* weights (strictly loaded below); the file
    # opt.yaml names may have moved
    args = SimpleNamespace(**{"forget_classes": None, "retain_classes": None, "use_coco": False, "proxy_path": None,
                              "opendata_to_forget_ratio": None, "verify_images": False, "mask_ratio": 0.75,
                              **saved, "vqgan_ckpt": None})
    if data_path:
        if not os.path.isdir(data_path):
            raise ValueError(f"--data_path {data_path} does not exist or is not a folder")
        args.data_path = data_path
    elif not isinstance(args.data_path, str) or not os.path.isdir(args.data_path):
        raise ValueError(f"the run's data folder {args.data_path} (recorded in {opt_path}) does not exist or is "
                         "not a folder: pass --data_path where it is now")
    given = {"teacher": teacher, "checkpoint": checkpoint}  # the flags the user passed
    teacher = teacher or saved.get("teacher_checkpoint")
    if not teacher:
        raise ValueError(f"{opt_path} records no teacher checkpoint (the run started from random "
                         "weights?); pass --teacher")
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    for what, path in (("teacher", teacher), ("checkpoint", checkpoint)):
        if os.path.isfile(path):
            continue
        if given[what] and os.path.isdir(path):
            raise ValueError(f"--{what} {path} is a folder, not a checkpoint file")
        if given[what]:
            raise ValueError(f"--{what} {path}: {what} file not found")
        where = f" (recorded in {opt_path}; pass --teacher where it is now)" if what == "teacher" else ""
        raise ValueError(f"{what} file not found: {path}{where}")

    forget_classes, retain_classes = class_lists(args)
    items = select_data(args, (forget_classes, retain_classes))  # the run's training list, from its flags and seed
    train = training_splits(items, args.data_path, retain_classes)
    checked = check_training_files(run_dir, args.data_path, train)
    held = select_holdout_files(args.data_path, forget_classes, retain_classes, exclude=[p for p, _ in items],
                                per_set=images, seed=args.seed, need=())
    if not held.forget:  # the audit cannot free any: the run's own flags decided what it trained on
        raise ValueError(f"cannot audit {run_dir}: the run trained on every image of its forget classes under "
                         f"{args.data_path}, so none is left unseen to compare with (an unlearning run with a "
                         "lower --num_image_per_class keeps some)")
    sets = {"forget": (_pick(train["forget"], images, args.seed, "forget"), held.forget),
            "retain": (_pick(train["retain"], images, args.seed, "retain"), held.retain)}
    skipped = None
    if not (sets["retain"][0] and sets["retain"][1]):
        skipped = ("the run trained on no retain-class image (proxy only)" if not sets["retain"][0] else
                   "the run trained on every image of its retain classes")
    sets = {name: pair for name, pair in sets.items() if pair[0] and pair[1]}  # the retain control needs both

    # a --checkpoint the user named may be another run's (the teacher, a pretraining's, has other flags)
    named = {what: f"--{what}" if given[what] else f"the run's {what}" for what in given}  # how errors name it
    models = {"before": load_audited_model(args, teacher, teacher, named["teacher"]).to(dev).eval(),
              "after": load_audited_model(args, checkpoint, teacher, named["checkpoint"],
                                          saved if given["checkpoint"] else None).to(dev).eval()}
    if not checked:  # said once, when the work starts (an error found before it stays the one line)
        print(f"unlearn-fast audit: notice: {run_dir} has no {DATA_SPLIT_FILE} (a run made before runs recorded "
              "their training files): the trained group is rebuilt from opt.yaml's flags and the data folder as it "
              "is now, and cannot be checked", file=sys.stderr, flush=True)
    if announce:
        counts = ", ".join(f"{name} classes {len(seen)} trained + {len(unseen)} unseen"
                           for name, (seen, unseen) in sets.items())
        fewer = any(len(group) < images for pair in sets.values() for group in pair)
        print(f"unlearn-fast audit: before = {teacher}, after = {checkpoint}; {counts} images"
              + (f" (fewer than --images {images}: all there are)" if fewer else "") + f", device {dev}", flush=True)
        for name, (seen, unseen) in sets.items():
            if min(len(seen), len(unseen)) < SMALL_GROUP:
                finer = ("a larger --images gives finer numbers" if min(len(seen), len(unseen)) == images else
                         "a run that leaves more images unseen (a lower --num_image_per_class) gives finer numbers")
                print(f"unlearn-fast audit: notice: the {name} classes give {len(seen)} trained and {len(unseen)} "
                      f"unseen image(s): the AUC moves in steps of 1/{len(seen) * len(unseen)} (coarse); {finer}",
                      flush=True)
    bar = progress_bar(sum(len(s) + len(u) for s, u in sets.values()), progress, "audit (images)")
    errors = {w: {} for w in models}
    try:
        for name, (seen, unseen) in sets.items():
            per_model = _set_errors(models, seen + unseen, args.input_size, args.seed, name, bar)
            for when, e in per_model.items():
                errors[when][name] = {"forget_train": e[: len(seen)], "unseen": e[len(seen):]}
    finally:
        if bar is not None:
            bar.close()
    result = {"forget": forget_audit_summary(errors["before"]["forget"], errors["after"]["forget"])}
    if "retain" in errors["before"]:
        result["retain_control"] = forget_audit_summary(errors["before"]["retain"], errors["after"]["retain"])
    else:
        result["retain_control_skipped"] = skipped
    result["config"] = {"run_dir": os.path.abspath(run_dir), "teacher": os.path.abspath(teacher),
                        "checkpoint": os.path.abspath(checkpoint), "model": args.model, "images_per_set": images,
                        "seed": args.seed, "trained_files_checked": checked,  # against data_split.json
                        "error": "per-image task error under fixed masks (MAE: hidden-pixel MSE; MAGE: hidden-token "
                                 "cross-entropy)",
                        "auc": "P(a training image has a lower error than an unseen one); 0.5 = no signal"}
    return result


def write_audit(run_dir: str, result: dict) -> str:
    """``RUN_DIR/forget_audit.json``, written atomically (an earlier audit stays whole if this write fails)."""
    path = os.path.join(run_dir, AUDIT_FILE)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def run_audit(run_dir: str, checkpoint: Optional[str] = None, images: int = 64, device: str = "auto",
              data_path: Optional[str] = None, teacher: Optional[str] = None, announce: bool = False,
              progress: bool = False) -> dict:
    """Audit ``run_dir`` (see the module docstring) and write ``forget_audit.json``; returns what it writes."""
    result = measure_audit(run_dir, checkpoint, images, device, data_path, teacher, announce, progress)
    write_audit(run_dir, result)
    return result


def format_audit(result: dict) -> str:
    rows = [f"{'set':<16}{'AUC before':>12}{'AUC after':>12}{'n train':>9}{'n unseen':>10}"]
    for key, label in (("forget", "forget classes"), ("retain_control", "retain classes")):
        if key in result:
            b, a = result[key]["before"], result[key]["after"]
            rows.append(f"{label:<16}{b['auc']:>12.3f}{a['auc']:>12.3f}{b['n_forget_train']:>9}{b['n_unseen']:>10}")
    if result.get("retain_control_skipped"):
        rows.append(f"(no retain-class control: {result['retain_control_skipped']})")
    return "\n".join(rows)


def audit_main(argv: List[str]) -> int:
    p = short_usage_errors(argparse.ArgumentParser(
        prog="unlearn-fast audit", formatter_class=DefaultsHelpFormatter,
        description="forget audit (membership AUC) of a run, before and after unlearning; writes "
                    "RUN_DIR/forget_audit.json (replacing an earlier audit's)"))
    p.add_argument("run_dir", help="the run directory an unlearn / baseline run printed ('writing to ...'), inside "
                                   "its --output_dir: the folder with opt.yaml and checkpoint-<e>.pth")
    p.add_argument("--checkpoint", default=None, help="the unlearned model (default: the last checkpoint-<e>.pth); "
                   "a file of the trained parameters only (.safetensors, best.pth) is laid over the teacher")
    p.add_argument("--teacher", default=None, help="the original model (default: the run's teacher checkpoint)")
    p.add_argument("--images", type=int, default=64, help="images per group (seen / unseen) and per set")
    p.add_argument("--data_path", default=None, help="the run's data folder, if it moved")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:N, or auto")
    p.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    a = p.parse_args(argv)
    # Ctrl-C / SIGTERM: one line from the CLI; nothing is written before the numbers exist, and a stopped write
    # removes its temporary file (an earlier forget_audit.json stays whole)
    with stop_signals():
        result = measure_audit(a.run_dir, a.checkpoint, a.images, a.device, a.data_path, a.teacher, announce=True,
                               progress=not a.no_progress)
        print(format_audit(result), flush=True)  # first: a run directory that cannot be written loses no numbers
        try:
            path = write_audit(a.run_dir, result)
        except OutputWriteError as e:
            print(f"unlearn-fast: error: {e}; the numbers above are not saved (make {a.run_dir} writable and "
                  "rerun)", file=sys.stderr)
            return 2
    print(f"unlearn-fast audit: wrote {path}")
    return 0


__all__ = ["run_audit", "measure_audit", "write_audit", "audit_main", "read_run_args", "format_audit",
           "load_audited_model", "runs_inside", "AUDIT_FILE"]
