"""Where the fast path's A/B flags act, so that a flag which cannot act on a run is named, not silently ignored.

Each flag changes how the fast or graphed step computes (never what): some act only on one model family
(MAGE's tokenizer and attention, MAE's patch embedding), some only on a GPU. Given where a run is, the ones that
would do nothing are listed with what they need, and so are the ones a precision mode makes moot.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .unlearn_args import build_parser

# flag (argparse dest) -> (model families it acts on, None = any; needs a CUDA device)
FLAG_SCOPES = {
    "share_tokenizer": (("mage",), False),
    "serial_teacher": (None, True),
    "unfused_tokenizer_norms": (("mage",), True),
    "explicit_attention": (("mage",), True),
    "nchw_tokenizer": (("mage",), True),
    "unfused_block_norms": (("mae", "mage"), True),
    "full_patch_embed": (("mae",), False),
    "fold_clip": (None, True),
    "half_student_weights": (None, False),
}
# opt-in flags whose forms became the defaults (H100, 2026-11-27) -> the flag that now turns them off
RETIRED_OPT_INS = {"channels_last_tokenizer": "nchw_tokenizer", "fused_block_norms": "unfused_block_norms"}
# baselines whose loss is the reference's token cross-entropy: retain_alpha and the (1+s) weighting play no part
TOKEN_LOSS_BASELINES = ("max_full_model_loss", "full_model_noise")
# task-transform flags read by one family only: a value changed from its default on another family is named
FAMILY_VALUE_FLAGS = {"mask_ratio": "mae", "mask_ratio_min": "mage", "mask_ratio_max": "mage",
                      "mask_ratio_mu": "mage", "mask_ratio_std": "mage"}


def _needs(families: Optional[Sequence[str]], cuda: bool) -> str:
    parts = []
    if families:
        parts.append(" / ".join(f.upper() for f in families) + " models")
    if cuda:
        parts.append("a CUDA device")
    parts.append("the fast or graphed step")
    return ", ".join(parts)


def _moot_at_precision(flag: str, precision: str, device_type: str) -> Optional[str]:
    """Why ``flag`` cannot act at ``precision`` (the same run would compute the same way without it), or None."""
    if flag == "share_tokenizer" and precision in ("bf16", "fp32"):
        return f"with --precision {precision} the teacher reuses the student's tokens anyway"
    if flag == "explicit_attention" and precision == "fp32":
        return "with --precision fp32 the attention is the written-out form anyway"
    if flag == "fold_clip" and precision == "reference" and device_type == "cuda":
        return ("with --precision reference on a GPU the update scales the loss, and GradScaler's own grad_scale "
                "takes the place the clip would fold into")
    if flag == "half_student_weights" and precision == "fp32":
        return "with --precision fp32 the student does not run in bf16 (its bf16 weight copies need --precision bf16)"
    if flag == "half_student_weights" and precision == "reference" and device_type == "cuda":
        # (on the CPU the reference precision's student runs in bf16 without loss scaling: the copies act)
        return ("with --precision reference on a GPU the student runs in fp16 with loss scaling (its bf16 weight "
                "copies need --precision bf16)")
    if (flag == "full_patch_embed" and precision == "fp32" and device_type == "cuda"
            and torch.backends.cudnn.allow_tf32 != torch.backends.cuda.matmul.allow_tf32):
        return ("with --precision fp32 on a GPU the patches are embedded with the conv anyway (its TF32 setting "
                "differs from the matrix product's)")
    return None


def _moot_in_job(flag: str, args, precision: str, step_mode: str) -> Optional[str]:
    """Why ``flag`` cannot act given the processes and the other update flag (the update forms exclude each
    other), or None. ``args.world_size``: the processes of the run (the CLI sets it before asking; default 1)."""
    world = int(getattr(args, "world_size", 1) or 1)
    if flag == "half_student_weights" and world > 1:
        return f"it acts on one process, this run has {world}: their gradients are reduced in fp32"
    if flag == "fold_clip" and world > 1 and step_mode == "graphed":
        return ("with several processes the CUDA-graph step clips and updates around its gradient all-reduce, "
                "without the fold")
    if flag == "fold_clip" and getattr(args, "half_student_weights", False) and world == 1 and precision == "bf16":
        return "--half_student_weights' update applies the clip itself"  # fast_update.py: that form goes first
    return None


def idle_flags(args, family: str, device_type: str, step_mode: str) -> List[str]:
    """One line per A/B flag that is set but cannot act on this run (``step_mode``: reference | fast | graphed;
    the precision is ``args.precision``, default reference; the processes ``args.world_size``, default 1)."""
    precision = getattr(args, "precision", "reference")
    lines = []
    for flag, (families, cuda) in FLAG_SCOPES.items():
        if not getattr(args, flag, False):
            continue
        if (families and family not in families) or (cuda and device_type != "cuda") or step_mode == "reference":
            lines.append(f"--{flag} has no effect on this run (it acts on {_needs(families, cuda)})")
            continue
        why = _moot_at_precision(flag, precision, device_type) or _moot_in_job(flag, args, precision, step_mode)
        if why:
            lines.append(f"--{flag} has no effect on this run ({why})")
    loss_type = getattr(args, "loss_type", None)
    if loss_type in TOKEN_LOSS_BASELINES:  # the reference's own math: neither flag appears in it
        if getattr(args, "retain_alpha", 1.0) != 1.0:
            lines.append(f"--retain_alpha has no effect on this run (--loss_type {loss_type} weights only its forget "
                         "term, as the reference)")
        if getattr(args, "baseline_weighting", "reference") != "reference":
            lines.append(f"--baseline_weighting {args.baseline_weighting} has no effect on this run (--loss_type "
                         f"{loss_type} has no (1+s) weighting to correct)")
    for old, off in RETIRED_OPT_INS.items():
        if getattr(args, old, False):
            lines.append(f"--{old} is the default now (--{off} turns it off)")
    defaults = build_parser().parse_args([])
    for flag, owner in FAMILY_VALUE_FLAGS.items():
        if family != owner and getattr(args, flag, getattr(defaults, flag)) != getattr(defaults, flag):
            lines.append(f"--{flag} has no effect on this run (it sets the {owner.upper()} task's masking, not "
                         f"this {family.upper() or 'other'} model's)")
    return lines


__all__ = ["FLAG_SCOPES", "FAMILY_VALUE_FLAGS", "RETIRED_OPT_INS", "idle_flags"]
