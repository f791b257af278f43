"""The run directory and its text files, named and formatted as the official trainer's (REFERENCE.md §1.7)."""
from __future__ import annotations

import json
import os
import time

from .checkpoint import atomic_append_text


def run_dir_name(args, baseline: bool = False) -> str:
    """``class_img1k_{coco_|}_numimg_…`` exactly as the reference composes it (double underscore included)."""
    coco = "coco_" if getattr(args, "use_coco", False) else ""
    open_r = getattr(args, "opendata_to_forget_ratio", None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    head = (f"class_img1k_{coco}_numimg_{args.num_image_per_class}_{open_r}_{int(100 * args.mask_ratio_mu)}"
            f"_ra_{int(args.retain_alpha)}_fa_{int(100 * args.forget_alpha)}_l2wd_{args.weight_decay}"
            f"_dr_ratio_{args.retainset_ratio}_open_{open_r}")
    if baseline:
        return f"{head}_baseline_{args.loss_type}{stamp}"
    return f"{head}_{args.noise_type}_{stamp}"


def check_output_dir(path: str) -> None:
    """Fail early, with a clear message, on an output folder that cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {path!r}: {e.strerror}") from None
    probe = os.path.join(path, ".write-test")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)  # also catches a full disk
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise ValueError(f"output directory {path!r} is not writable: {e.strerror}") from None
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def write_opt_yaml(output_dir: str, args_dict: dict) -> None:
    """``opt.yaml``: a JSON dump of the arguments (indent 4), appended (as the reference does), atomically."""
    atomic_append_text(os.path.join(output_dir, "opt.yaml"),
                       json.dumps(args_dict, indent=4, sort_keys=False, default=str) + "\n")


def append_log_line(output_dir: str, stats: dict) -> None:
    """One JSON line per epoch in ``log.txt``, appended atomically."""
    atomic_append_text(os.path.join(output_dir, "log.txt"), json.dumps(stats) + "\n")
