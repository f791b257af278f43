"""Where the fast path's A/B flags act, so that a flag which cannot act on a run is named, not silently ignored.

Each flag changes how the fast or graphed step computes (never what): some act only on one model family
(MAGE's tokenizer and attention, MAE's patch embedding), some only on a GPU. Given where a run is, the ones that
would do nothing are listed with what they need.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

# flag (argparse dest) -> (model families it acts on, None = any; needs a CUDA device)
FLAG_SCOPES = {
    "share_tokenizer": (("mage",), False),
    "serial_teacher": (None, True),
    "unfused_tokenizer_norms": (("mage",), True),
    "explicit_attention": (("mage",), True),
    "channels_last_tokenizer": (("mage",), True),
    "fused_block_norms": (("mae", "mage"), True),
    "full_patch_embed": (("mae",), False),
}


def _needs(families: Optional[Sequence[str]], cuda: bool) -> str:
    parts = []
    if families:
        parts.append(" / ".join(f.upper() for f in families) + " models")
    if cuda:
        parts.append("a CUDA device")
    parts.append("the fast or graphed step")
    return ", ".join(parts)


def idle_flags(args, family: str, device_type: str, step_mode: str) -> List[str]:
    """One line per A/B flag that is set but cannot act on this run (``step_mode``: reference | fast | graphed)."""
    lines = []
    for flag, (families, cuda) in FLAG_SCOPES.items():
        if not getattr(args, flag, False):
            continue
        if (families and family not in families) or (cuda and device_type != "cuda") or step_mode == "reference":
            lines.append(f"--{flag} has no effect on this run (it acts on {_needs(families, cuda)})")
    return lines


__all__ = ["FLAG_SCOPES", "idle_flags"]
