"""Result rows in the reference CSV formats, appended atomically.

The reference writes each row with ``print('\\t'.join(str(a) for a in metric), file=open(name, 'a+'))``:
tab-separated, no header, one "\\n"-terminated line appended per call. Numbers are ``str()`` of numpy
float64 scalars, which prints the same digits as ``str(float(x))`` (shortest round-trip repr), so every
number here is written as ``str(float(x))`` (float32 inputs are widened first, then printed in full).

| file                      | row                                                                            |
|---------------------------|--------------------------------------------------------------------------------|
| fid_is_eval_{task}.csv    | os.path.join(dst, "<mode>_<k/16>_") FID_r ISr_mean ISr_std FID_f ISf_mean ISf_std |
| clip_cosine_{task}.csv    | os.path.join(F, "<mode>_<k>_") cos_retain cos_forget  (k = 4 or 8, an integer)   |
| fid_is_eval.csv (Palette) | dst FID_r ISr_mean ISr_std FID_f ISf_mean ISf_std                               |
| clip_cosine.csv (Palette) | D cos_retain cos_forget                                                         |

Note the CLIP row names the prefix with the integer k (``center_4_``), not k/16: that is what
``clip_embed.py`` writes (its name is the embedding file's name minus ``forget_clip_norm_5k.txt``).

Appending is atomic: the old content plus the new rows go to a temporary file in the same folder, which
then replaces the CSV with ``os.replace``, so a crash never leaves a half-written row. A CSV that is a symbolic
link gets the rows in its target (the link stays), as with the reference's ``open(name, 'a+')``. Evals that append
to one CSV at once take turns (an ``flock`` on it), so no row is lost, as with ``'a+'``.
"""
from __future__ import annotations

import contextlib
import os
from numbers import Real
from typing import Iterable, Sequence

from ..atomic_files import atomic_append_text
from .layout import generated_prefix

__all__ = [
    "format_value", "format_row", "fid_is_row", "clip_cosine_row", "fid_is_csv_name", "clip_cosine_csv_name",
    "fid_is_row_name", "clip_row_name", "append_rows_atomic", "read_rows",
]


def format_value(value) -> str:
    """A cell as the reference prints it: strings as they are, numbers as ``str(float(x))``."""
    if isinstance(value, str):
        if "\t" in value or "\n" in value:
            raise ValueError(f"a CSV cell may not contain a tab or newline: {value!r}")
        return value
    if isinstance(value, bool):
        raise TypeError("a metric cell must be a number or a string, got a bool")
    if isinstance(value, Real) or hasattr(value, "__float__"):
        return str(float(value))
    raise TypeError(f"a metric cell must be a number or a string, got {type(value).__name__}")


def format_row(values: Sequence) -> str:
    """Tab-joined cells with a trailing newline, byte-identical to the reference ``print``."""
    return "\t".join(format_value(v) for v in values) + "\n"


def fid_is_row(name: str, fid_retain, is_retain: tuple, fid_forget, is_forget: tuple) -> str:
    """``name FID_r ISr_mean ISr_std FID_f ISf_mean ISf_std``; ``is_*`` are (mean, std) pairs."""
    return format_row([name, fid_retain, is_retain[0], is_retain[1], fid_forget, is_forget[0], is_forget[1]])


def clip_cosine_row(name: str, cos_retain, cos_forget) -> str:
    """``name cos_retain cos_forget``."""
    return format_row([name, cos_retain, cos_forget])


def fid_is_csv_name(task: str | None) -> str:
    """``fid_is_eval_{task}.csv`` (MAGE) or ``fid_is_eval.csv`` (Palette, task None)."""
    return "fid_is_eval.csv" if task is None else f"fid_is_eval_{task}.csv"


def clip_cosine_csv_name(task: str | None) -> str:
    """``clip_cosine_{task}.csv`` (MAGE) or ``clip_cosine.csv`` (Palette, task None)."""
    return "clip_cosine.csv" if task is None else f"clip_cosine_{task}.csv"


def fid_is_row_name(dst: str, mode: str, k: int) -> str:
    """First cell of a MAGE FID/IS row: ``os.path.join(dst, f"{mode}_{k / 16.0}_")``."""
    return os.path.join(dst, generated_prefix(mode, k))


def clip_row_name(img_folder: str, mode: str, k: int) -> str:
    """First cell of a MAGE CLIP row: ``os.path.join(img_folder, f"{mode}_{k}_")`` (integer k)."""
    return os.path.join(img_folder, f"{mode}_{k}_")


def append_rows_atomic(path: str | os.PathLike, rows: Iterable[str]) -> None:
    """Append ``rows`` (each ending in "\\n") to ``path`` (its folder made if missing), atomically."""
    rows = list(rows)
    for row in rows:
        if not isinstance(row, str) or not row.endswith("\n") or "\n" in row[:-1]:
            raise ValueError(f"each row must be one line ending in a newline, got {row!r}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _appending_alone(path):
        atomic_append_text(path, "".join(rows))


@contextlib.contextmanager
def _appending_alone(path: str):
    """An exclusive flock on the CSV ``path`` (created empty if missing) while rows are appended: two evals that
    append to one CSV at once (checkpoints evaluated side by side into one --csv_dir) would each write the old
    content plus their own rows, and the later rename would drop the other's (the reference's open('a+') keeps
    both). The append replaces the file, so a waiter that wakes holding the replaced one locks the new one."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        yield
        return
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))  # still the CSV's current file
            except FileNotFoundError:  # removed meanwhile: create it again
                current = False
            if current:
                yield
                return
        finally:
            os.close(fd)


def read_rows(path: str | os.PathLike) -> list[list[str]]:
    """The cells of each line of a reference-format CSV (tab-separated, no header)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]
