"""The progress bar of long loops: tqdm when it is installed and wanted, otherwise None (the loop runs bare)."""
from __future__ import annotations

import sys

# stderr redirected to a file (nohup, a batch job's log): tqdm's every-0.1 s redraws would fill the log with
# carriage-return lines; one redraw per this many seconds still shows the job is alive
LOG_FILE_MININTERVAL_S = 30.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, enabled: bool, desc: str):
    """A ``tqdm`` bar of ``total`` steps on stderr, or None when disabled or tqdm is missing. Off a terminal
    it redraws at most every ``LOG_FILE_MININTERVAL_S`` seconds."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    interval = 0.1 if _is_terminal(sys.stderr) else LOG_FILE_MININTERVAL_S
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, mininterval=interval, file=sys.stderr)


__all__ = ["progress_bar", "LOG_FILE_MININTERVAL_S"]
