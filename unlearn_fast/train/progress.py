"""The progress bar of long loops: tqdm when it is installed and wanted, otherwise None (the loop runs bare)."""
from __future__ import annotations


def progress_bar(total: int, enabled: bool, desc: str):
    """A ``tqdm`` bar of ``total`` steps, or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


__all__ = ["progress_bar"]
