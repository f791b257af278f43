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
checkpoints; ``--data_path`` / ``--teacher`` override moved files. Writes ``RUN_DIR/forget_audit.json``
(atomically) and prints a short table; ``unlearn-fast report`` shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from types import SimpleNamespace
from typing import List, Optional

import torch

from ..eval.forget_audit import forget_audit_summary
from ..eval.periodic_eval import per_image_errors
from ..train.checkpoint import atomic_write_text, load_checkpoint_file, load_model_state, model_state_from
from ..train.data_split import FORGET_LABEL, seeded_shuffle
from ..train.holdout_split import select_holdout_files
from ..train.image_datasets import load_eval_images
from ..train.run_outputs import opt_yaml_objects
from ..train.seeding import derive_seed
from .help_format import DefaultsHelpFormatter, short_usage_errors
from .unlearn_command import build_model, class_lists, resolve_device, select_data

AUDIT_FILE = "forget_audit.json"


def read_run_args(run_dir: str) -> dict:
    """The last JSON object of ``RUN_DIR/opt.yaml`` (the file is appended once per start of the run)."""
    path = os.path.join(run_dir, "opt.yaml")
    if not os.path.isfile(path):
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
    if error is not None:
        raise ValueError(f"{path} is not readable ({error})")
    last = objects[-1] if objects else None
    if not isinstance(last, dict):
        raise ValueError(f"{path} holds no argument dictionary")
    return last


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
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", n))]
    if not found:
        raise ValueError(f"{run_dir} has no checkpoint-<epoch>.pth yet; pass --checkpoint")
    return os.path.join(run_dir, max(found)[1])


def load_audited_model(args, path: str, teacher: str):
    """The model of checkpoint ``path``. A file of the trained parameters only (``checkpoint-<e>.safetensors``,
    ``best.pth``) is laid over the teacher's weights: everything else was frozen during unlearning."""
    model = build_model(args)
    state = model_state_from(load_checkpoint_file(path), path)
    own = model.state_dict()
    if state and path != teacher and set(state) < set(own):  # a proper subset of the keys: trained params only
        full = dict(model_state_from(load_checkpoint_file(teacher), teacher))
        full.update(state)
        state = full
    load_model_state(model, state, path)
    return model


def _pick(paths: List[str], count: int, seed: int, what: str) -> List[str]:
    return seeded_shuffle(sorted(set(paths)), seed, "audit", what)[:count]


def run_audit(run_dir: str, checkpoint: Optional[str] = None, images: int = 64, device: str = "auto",
              data_path: Optional[str] = None, teacher: Optional[str] = None, announce: bool = False) -> dict:
    """Audit ``run_dir`` (see the module docstring); returns what it writes to ``forget_audit.json``.
    ``announce``: print what is compared before the work starts (the CLI)."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"not a run directory: {run_dir}")
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    saved = read_run_args(run_dir)
    needed = ("model", "input_size", "data_path", "seed", "num_image_per_class", "retainset_ratio")
    missing = [k for k in needed if k not in saved]
    if missing:
        raise ValueError(f"{run_dir}/opt.yaml lacks {', '.join(missing)}; was it written by unlearn-fast?")
    args = SimpleNamespace(**{"forget_classes": None, "retain_classes": None, "use_coco": False, "proxy_path": None,
                              "opendata_to_forget_ratio": None, "verify_images": False, "vqgan_ckpt": None,
                              "mask_ratio": 0.75, **saved})
    if data_path:
        args.data_path = data_path
    given = {"teacher": teacher, "checkpoint": checkpoint}  # the flags the user passed
    teacher = teacher or saved.get("teacher_checkpoint")
    if not teacher:
        raise ValueError(f"{run_dir}/opt.yaml records no teacher checkpoint (the run started from random "
                         "weights?); pass --teacher")
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    for what, path in (("teacher", teacher), ("checkpoint", checkpoint)):
        if os.path.isfile(path):
            continue
        if given[what]:
            raise ValueError(f"--{what} {path}: {what} file not found")
        where = f" (recorded in {run_dir}/opt.yaml; pass --teacher where it is now)" if what == "teacher" else ""
        raise ValueError(f"{what} file not found: {path}{where}")

    forget_classes, retain_classes = class_lists(args)
    items = select_data(args, (forget_classes, retain_classes))  # the run's training list, from its flags and seed
    train = {"forget": [p for p, lab in items if lab == FORGET_LABEL]}
    retain_dirs = {os.path.abspath(os.path.join(args.data_path, c)) for c in retain_classes}
    train["retain"] = [p for p, lab in items if lab != FORGET_LABEL
                       and os.path.dirname(os.path.abspath(p)) in retain_dirs]  # not the proxy
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

    dev = resolve_device(device)
    if announce:
        counts = ", ".join(f"{name} classes {len(seen)} trained + {len(unseen)} unseen"
                           for name, (seen, unseen) in sets.items() if seen and unseen)
        print(f"unlearn-fast audit: before = {teacher}, after = {checkpoint}; {counts} images, device {dev}",
              flush=True)
    models = {when: load_audited_model(args, path, teacher).to(dev).eval()
              for when, path in (("before", teacher), ("after", checkpoint))}
    errors = {w: {} for w in models}
    for name, (seen, unseen) in sets.items():
        if not seen or not unseen:
            continue  # the retain control needs both (proxy-only runs have no retain files)
        x = load_eval_images(seen + unseen, args.input_size)
        task = models["before"].sample_task(x, torch.Generator().manual_seed(derive_seed(args.seed, "audit", name)))
        for when, model in models.items():
            e = per_image_errors(model, x, task)
            errors[when][name] = {"forget_train": e[: len(seen)], "unseen": e[len(seen):]}
    result = {"forget": forget_audit_summary(errors["before"]["forget"], errors["after"]["forget"])}
    if "retain" in errors["before"]:
        result["retain_control"] = forget_audit_summary(errors["before"]["retain"], errors["after"]["retain"])
    else:
        result["retain_control_skipped"] = skipped
    result["config"] = {"run_dir": os.path.abspath(run_dir), "teacher": os.path.abspath(teacher),
                        "checkpoint": os.path.abspath(checkpoint), "model": args.model, "images_per_set": images,
                        "seed": args.seed, "error": "per-image task error under fixed masks (MAE: hidden-pixel "
                                                    "MSE; MAGE: hidden-token cross-entropy)",
                        "auc": "P(a training image has a lower error than an unseen one); 0.5 = no signal"}
    atomic_write_text(os.path.join(run_dir, AUDIT_FILE), json.dumps(result, indent=2) + "\n")
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
    a = p.parse_args(argv)
    result = run_audit(a.run_dir, a.checkpoint, a.images, a.device, a.data_path, a.teacher, announce=True)
    print(format_audit(result))
    print(f"unlearn-fast audit: wrote {os.path.join(a.run_dir, AUDIT_FILE)}")
    return 0


__all__ = ["run_audit", "audit_main", "read_run_args", "format_audit", "load_audited_model", "runs_inside", "AUDIT_FILE"]
