"""Unfinished output: the staging folder a long writer (``generate``, ``palette-test``) fills, with a record and a
lock, so that a stopped run is continued by the same command and never mixed with another's.

    lock = open_unfinished(staging, record, "generate")   # creates <output>.partial with its record, locks it
    remove_stale_temporaries(staging)                       # what a kill cut short; written_whole() files are kept
    ...                                                     # write the images (atomically)
    finish_unfinished(staging, final, lock)                 # drops the record, renames to the final name

The folder is ``<output>.partial`` until every image is written (``eval`` refuses it); its hidden record
(``UNFINISHED_RECORD``) holds what makes the images (a checkpoint's sha256, the flags, the test images), and a
rerun whose record differs is refused (:func:`check_unfinished`), never mixed in. A lock (``flock`` on the folder)
refuses a second writer. A stop (Ctrl-C, SIGTERM) or a failed write is one line saying what was kept and how to go
on (:func:`stop_line`, :func:`error_with`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from typing import Optional

from ..atomic_files import atomic_write_text
from ..eval.layout import UNFINISHED_RECORD


def file_sha256(path: str) -> str:
    """The sha256 of a file's content (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_sha256(entries) -> str:
    """One digest of the test images (``(name, path)`` pairs): their names and sizes, in order."""
    return hashlib.sha256("".join(f"{name}\t{os.path.getsize(path)}\n" for name, path in entries).encode()
                          ).hexdigest()


def read_unfinished_record(staging: str) -> Optional[dict]:
    """The record of the stopped run in ``staging``; None when it is missing or unreadable."""
    try:
        with open(os.path.join(staging, UNFINISHED_RECORD), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_difference(old: dict, new: dict) -> Optional[str]:
    """How ``new`` differs from the stopped run's ``old`` record, in words; None when equal."""
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if key == "command":
            return f"another command ({old.get(key)})"
        if key == "test images":
            return "other test images (other data flags, or files that changed since)"
        if key.startswith("--") and isinstance(value, str) and len(value) == 64:  # a file's sha256
            return f"another {key} (its content differs)"
        return f"another {key} ({old.get(key)} then, {value} now)"
    return None


def check_unfinished(staging: str, record: dict, command: str) -> None:
    """``staging`` (which exists) must be a stopped ``command`` with this ``record``: then this run continues it;
    anything else is refused, never mixed in."""
    start_over = f"delete {staging} to start over"
    old = read_unfinished_record(staging)
    if old is None:
        raise ValueError(f"{staging} exists but holds no record of the {command} that wrote it (an older "
                         f"unlearn-fast, or one starting now); {start_over}")
    differs = record_difference(old, record)
    if differs is not None:
        raise ValueError(f"{staging} holds the images of a stopped {command}, and this one differs: {differs}; "
                         f"rerun the stopped command to continue it, or {start_over}")


def open_unfinished(staging: str, record: dict, command: str) -> int:
    """Create ``staging`` with its ``record`` (unless a stopped run's is there), then lock the folder for this run:
    a second run of the same job finds it locked and stops. Signals wait meanwhile, so the folder never exists
    without its record. Returns the folder's descriptor (closing it releases the lock)."""
    with signals_held():
        if not os.path.isdir(staging):
            os.makedirs(os.path.dirname(os.path.abspath(staging)), exist_ok=True)
            try:
                os.mkdir(staging)  # exclusive: another run of the same job stops here or at the lock
            except FileExistsError:
                raise ValueError(f"{staging} appeared while this {command} started: another {command} is running "
                                 "into it; wait for it to finish") from None
            try:
                atomic_write_text(os.path.join(staging, UNFINISHED_RECORD), json.dumps(record, indent=1) + "\n")
            except BaseException:  # a full disk: no folder left that a rerun would refuse
                os.rmdir(staging)
                raise
        fd = os.open(staging, os.O_RDONLY)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            os.close(fd)
            raise ValueError(f"another {command} is running into {staging} now; wait for it to finish, or stop it and "
                             "run this command again to continue its images") from None
    return fd


def finish_unfinished(staging: str, final: str, lock_fd: int, bookkeeping=()) -> None:
    """Every image is written: ``staging`` takes its final name, without its record and the ``bookkeeping`` files
    (signals wait: no half step)."""
    with signals_held():
        for name in (*bookkeeping, UNFINISHED_RECORD):
            os.unlink(os.path.join(staging, name))
        os.close(lock_fd)
        if os.path.isdir(final):  # an empty folder (checked before): the complete one takes its place
            os.rmdir(final)
        os.replace(staging, final)


@contextlib.contextmanager
def signals_held():
    """SIGINT / SIGTERM wait until the block is done (where blocking signals exists)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def written_whole(path: str) -> bool:
    """An image a stopped generate finished: renamed into place whole (0 bytes: a crash before the disk had it)."""
    return os.path.isfile(path) and os.path.getsize(path) > 0


def remove_stale_temporaries(staging: str) -> None:
    """The hidden temporary file of an image whose write a kill cut short."""
    for folder, _, files in os.walk(staging):
        for f in files:
            if f.startswith(".") and ".tmp-" in f:
                os.unlink(os.path.join(folder, f))


def count_images(folder: str) -> int:
    """Files under ``folder`` that a later eval would see (not the hidden record or temporary files)."""
    return sum(1 for _, _, files in os.walk(folder) for f in files if not f.startswith("."))


def stop_line(command: str, e: KeyboardInterrupt, kept: str) -> int:
    """Print the one line of a run stopped by Ctrl-C / SIGTERM (what is kept, how to go on); the exit code."""
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"unlearn-fast {command}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}; {kept}",
          file=sys.stderr, flush=True)
    return 128 + signum


def error_with(e: BaseException, kept: str) -> BaseException:
    """An OSError / ValueError (a full disk, an image gone) as one line that ends with what is kept."""
    if isinstance(e, OSError):
        return OSError(f"{e}; {kept} once that is fixed")
    return ValueError(f"{e}; {kept}")


__all__ = ["file_sha256", "listing_sha256", "read_unfinished_record", "record_difference", "check_unfinished",
           "open_unfinished", "finish_unfinished", "signals_held", "written_whole", "remove_stale_temporaries",
           "count_images", "stop_line", "error_with"]
