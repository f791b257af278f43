"""Files written whole or not at all: checkpoints, logs, CSV rows, figures, generated images.

    from unlearn_fast.atomic_files import atomic_save, atomic_append_text, atomic_write_with
    atomic_save({"model": model.state_dict()}, "out/checkpoint-0.pth")
    atomic_append_text("out/log.txt", '{"epoch": 0}\\n')
    atomic_write_with("grid.png", lambda fh: image.save(fh, format="PNG"))

This module sits below the layers (kernels -> ops -> objective -> models -> train -> cli / eval) and imports
only the standard library and torch, so that every layer may import it: models write generated images, train
writes checkpoints and logs, eval and cli write CSVs, figures and reports, all in the same way.

Every file is written to a temporary file in the same folder, fsync'd and renamed over the target (``os.replace``
is atomic on POSIX), so a crash or a kill leaves either the old or the new file, never a torn one. Text files
that grow (``log.txt``, ``opt.yaml``) are rewritten the same way: old content plus the new lines, to a temporary
file, then renamed. A write that fails (disk full, ...) raises :class:`OutputWriteError` naming the file.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Optional

import torch


class OutputWriteError(ValueError):
    """An output file could not be written (disk full, read-only folder, ...); the message names it.
    The previous version of the file, if any, is intact."""


def _fsync_dir(folder: str) -> None:
    """Make a rename durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under this process's umask (mkstemp's files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_with(path: str, write, mode: Optional[int] = None, durable: bool = True) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync, rename over ``path``. On any failure the
    temporary file is removed and ``path`` is untouched; an OSError becomes an OutputWriteError. The file
    gets ``mode``, by default the one a new file of ``open(path, "w")`` gets. ``durable=False`` skips the
    fsyncs (~6 ms a file): for thousands of generated images, whose reader takes an empty file (what a power
    cut may leave then) for one not written."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
        with os.fdopen(fd, "wb") as fh:
            # readable as the reference's torch.save output is (mkstemp's files are 0600)
            os.fchmod(fh.fileno(), new_file_mode() if mode is None else mode)
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync_dir(folder)
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    atomic_write_with(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically. A file name in ``text`` that is not UTF-8 (os.listdir gives
    its bytes as surrogates) is written as its own bytes, as the shell would print it."""
    atomic_write_with(path, lambda fh: fh.write(text.encode("utf-8", "surrogateescape")))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (an encoded image, for instance)."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_append_text(path: str, text: str) -> None:
    """Append ``text`` by rewriting the whole file atomically (for small files such as log.txt): a kill
    leaves the file as it was before or after the append, never with half a line. As ``open(path, "a")``:
    a linked file gets the text in its target (the link stays) and an existing file keeps its mode."""
    path = os.path.realpath(path)
    old, mode = b"", None
    if os.path.exists(path):
        with open(path, "rb") as fh:
            old = fh.read()
        mode = os.stat(path).st_mode & 0o777
    atomic_write_with(path, lambda fh: fh.write(old + text.encode("utf-8", "surrogateescape")), mode=mode)


def atomic_link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` an atomic replica of ``src``: a hard link when the file system allows one (no copy),
    else a full copy; either way through a temporary name and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f".tmp-link-{os.getpid()}-{os.path.basename(dst)}")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as fh:
            data = fh.read()
        atomic_write_with(dst, lambda out: out.write(data))
        return
    try:
        os.replace(tmp, dst)
    except BaseException as e:  # also a signal between the link and the rename: no stray temporary link
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputWriteError(f"cannot write {dst}: {e.strerror or e}") from None
        raise


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """The tensors (detached, contiguous, on the CPU) as a safetensors file, written atomically."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})  # bytes
    atomic_write_with(path, lambda fh: fh.write(data))


def save_image_atomic(image, path: str, fmt: str, **params) -> None:
    """A PIL ``image.save`` through :func:`atomic_write_with`: a stop or a full disk in the middle of a write leaves
    no file under an image's name (a later eval would count half an image). No fsync per image (a resume takes an
    empty file for an unwritten one). A failed write is an OSError naming the file."""
    try:
        atomic_write_with(path, lambda fh: image.save(fh, format=fmt, **params), durable=False)
    except OutputWriteError as e:  # generate / palette-test tell a full disk (an OSError) from bad input
        raise OSError(str(e)) from None


__all__ = ["OutputWriteError", "new_file_mode", "atomic_write_with", "atomic_save", "atomic_write_text",
           "atomic_write_bytes", "atomic_append_text", "atomic_link_or_copy", "atomic_save_safetensors",
           "save_image_atomic"]
