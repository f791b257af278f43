"""The run directory and its text files, named and formatted as the official trainer's (REFERENCE.md §1.7), plus
unlearn_fast's ``data_split.json``: a fingerprint of the files the run trained on, which the audit checks."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

from ..atomic_files import atomic_append_text, atomic_write_text


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


def check_creatable_dir(path: str, flag_name: str) -> None:
    """Check that folder ``path`` exists or could be created, and could be written, without creating it.

    The nearest existing ancestor (``path`` itself if it exists) must be a folder the user may write and
    enter: so a bad ``--output_dir`` is found before hours of work, and a failed run leaves no empty folder.
    A ValueError names ``flag_name`` and the path. (:func:`check_output_dir` creates the folder and writes a
    probe file: it also catches a full disk.)"""
    path = os.path.abspath(path)
    existing = path
    while not os.path.lexists(existing):  # lexists: a dangling link is there, and blocks the mkdir
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing == path:
            what = "a file" if os.path.isfile(path) else "no folder (a broken link or a special file)"
            raise ValueError(f"{flag_name} {path} is not a folder: it exists and is {what}")
        what = "a file, not a folder" if os.path.isfile(existing) else "not a folder"
        raise ValueError(f"{flag_name} {path} is not a folder and cannot be created: {existing} is {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag_name} {path} is not writable ({existing} is read-only)")


def _why_not_a_folder(path: str, error: OSError) -> str:
    """makedirs' reason in words: "File exists" for a path that is a file says which file."""
    if os.path.isfile(path):
        return "it exists and is a file"
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isfile(parent):
        return f"{parent} is a file, not a folder"
    return error.strerror or str(error)


def check_output_dir(path: str) -> None:
    """Fail early, with a clear message, on an output folder that cannot be written (creates it: see also
    :func:`check_creatable_dir`)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {path!r}: {_why_not_a_folder(path, e)}") from None
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


# a run directory's name holds the time to the second; runs started in the same second wait for the next one
RUN_DIR_NAME_TRIES = 30


def create_run_dir(output_dir: str, name) -> str:
    """Create the new run directory ``output_dir/name()`` (``name``: e.g. ``lambda: run_dir_name(args)``) and
    return its path; a ValueError names a folder that cannot be created or written.

    The folder is made with an exclusive ``mkdir``: the reference lets a second run started in the same second
    (same timestamp) write into the first one's folder, so their checkpoints overwrite each other and their
    log lines interleave. Here that run waits for the next second's name instead (still the reference's
    format). A failure or a signal after the mkdir removes the folder again."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {output_dir!r}: {_why_not_a_folder(output_dir, e)}") \
            from None
    for _ in range(RUN_DIR_NAME_TRIES):
        taken = name()
        path = os.path.join(output_dir, taken)
        try:
            os.mkdir(path)
        except FileExistsError:  # another run's (or one that ended within this second)
            deadline = time.monotonic() + 2.0
            while name() == taken and time.monotonic() < deadline:
                time.sleep(0.05)
            continue
        except OSError as e:
            raise ValueError(f"cannot create run directory {path!r}: {e.strerror}") from None
        try:
            check_output_dir(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path
    raise ValueError(f"cannot create a new run directory in {output_dir!r}: the names of the last "
                     f"{RUN_DIR_NAME_TRIES} seconds are taken (other runs writing there?)")


def write_opt_yaml(output_dir: str, args_dict: dict) -> None:
    """``opt.yaml``: a JSON dump of the arguments (indent 4), appended (as the reference does), atomically."""
    atomic_append_text(os.path.join(output_dir, "opt.yaml"),
                       json.dumps(args_dict, indent=4, sort_keys=False, default=str) + "\n")


def opt_yaml_objects(text: str) -> tuple:
    """``(objects, error)``: the JSON values of an ``opt.yaml`` text (one dump per start of a run, one after
    another) in order, and the decoding error that stopped the reading (None when all were read)."""
    dec, pos, objects = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return objects, None
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            return objects, e
        objects.append(obj)


def append_log_line(output_dir: str, stats: dict) -> None:
    """One JSON line per epoch in ``log.txt``, appended atomically."""
    atomic_append_text(os.path.join(output_dir, "log.txt"), json.dumps(stats) + "\n")


# unlearn_fast's own file beside opt.yaml (which keeps the reference's keys): which files the run trained on, so
# that the audit can tell a data folder changed since the run from the one the run used
DATA_SPLIT_FILE = "data_split.json"
DATA_SPLITS = ("forget", "retain")
_SHA256_OF = ("the split's distinct training files as paths relative to data_path ('/'-separated), sorted, each "
              "followed by a newline, UTF-8")


def _relative_paths(data_path: str, paths) -> list:
    """The distinct ``paths`` relative to ``data_path``, '/'-separated and sorted: the same for a moved folder."""
    return sorted({os.path.relpath(p, data_path).replace(os.sep, "/") for p in paths})


def data_split_record(data_path: str, splits: dict) -> dict:
    """What ``data_split.json`` holds for ``splits`` ({"forget": [path], "retain": [path]}, paths may repeat):
    the data folder as given and, per split, the count of distinct files and a sha256 of their relative paths."""
    record = {"data_path": data_path}
    for name in DATA_SPLITS:
        rel = _relative_paths(data_path, splits[name])
        text = "".join(p + "\n" for p in rel).encode("utf-8", "surrogateescape")  # any Linux file name
        record[name] = {"count": len(rel), "sha256": hashlib.sha256(text).hexdigest()}
    record["sha256_of"] = _SHA256_OF
    return record


def write_data_split(output_dir: str, record: dict) -> None:
    """``data_split.json`` (see :func:`data_split_record`), written atomically."""
    atomic_write_text(os.path.join(output_dir, DATA_SPLIT_FILE), json.dumps(record, indent=2) + "\n")


def read_data_split(run_dir: str):
    """The ``data_split.json`` of ``run_dir``, or None for a run without one (made before the file existed). A
    damaged file is a ValueError naming it."""
    path = os.path.join(run_dir, DATA_SPLIT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not readable ({getattr(e, 'strerror', None) or e}); restore it, or delete it "
                         "to treat the run as one that did not record its training files") from None
    def valid(entry):
        return (isinstance(entry, dict) and isinstance(entry.get("count"), int)
                and not isinstance(entry["count"], bool) and entry["count"] >= 0
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]))
    bad = [n for n in DATA_SPLITS if not (isinstance(record, dict) and valid(record.get(n)))]
    if bad:
        raise ValueError(f"{path} is damaged (no valid count and sha256 of the {bad[0]} split); restore it, or "
                         "delete it to treat the run as one that did not record its training files")
    return record


def data_split_difference(recorded: dict, current: dict):
    """The first split whose files differ, as ``(split, recorded count, current count)``; None when all match."""
    for name in DATA_SPLITS:
        if any(recorded[name][k] != current[name][k] for k in ("count", "sha256")):
            return name, recorded[name]["count"], current[name]["count"]
    return None
