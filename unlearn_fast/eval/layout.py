"""Where generated and original evaluation images live, and how they are paired (§5.1, §5.5).

MAGE (`testpaint.py`), one folder per task:
    <dst>/<retain|forget>/<wnid>/<mode>_<r>_<original name>     e.g. center_0.25_ILSVRC2012_val_00000001.JPEG
with r = k/16 written by ``str(k / 16.0)``; the original is ``<data_root>/<wnid>/<original name>``
(``data_root`` = the ImageNet ``val/`` folder, eval.py's meaning). Inpaint: ``center`` x k in {4, 8};
outpaint: ``outpaint`` x k = 1..13 (the CLIP metric uses only k in {4, 8} for both tasks).

Palette (`run.py -p test`): ``<dst>/results/test/0/<mask_ratio:.2f>/{Out_,GT_}<class>_Places365_val_<id>.jpg``
where <class> is a line of ``class.txt`` with "/" -> "_" (the line starts with "/", so it gives "Out_a_...").
Lines 0-49 are retain classes, 50-99 forget classes.

Pairs are made by file name, never by glob order, and come in a deterministic (sorted) order. A dangling
link where an image should be is an error: skipping it would silently shrink the set a metric sees.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from ..train.data_split import IMAGE_EXTENSIONS  # what palette-test reads, and keeps in its output names

__all__ = [
    "SPLITS", "TASKS", "ratio_of", "generated_prefix", "eval_modes", "clip_modes", "generated_path",
    "original_name", "ImagePair", "collect_mage_pairs", "read_class_list", "palette_split_classes",
    "palette_results_dir", "collect_palette_pairs", "check_nonempty_files", "UNFINISHED_RECORD", "refuse_unfinished",
]

# in the folder ``generate`` / ``palette-test`` write into (``<output>.partial``) until every image is there: what
# made the images, so that a rerun continues only the same job; and the mark eval refuses
UNFINISHED_RECORD = ".unlearn_fast_unfinished.json"

SPLITS = ("retain", "forget")
TASKS = ("inpaint", "outpaint")
_EVAL_MODES = {"inpaint": [("center", 4), ("center", 8)], "outpaint": [("outpaint", k) for k in range(1, 14)]}
_CLIP_MODES = {"inpaint": [("center", 4), ("center", 8)], "outpaint": [("outpaint", 4), ("outpaint", 8)]}


def refuse_unfinished(folder: str) -> None:
    """ValueError for the folder of a generate or palette-test that has not finished (stopped, or running): its
    metrics would silently be those of part of the test set."""
    folder = os.path.normpath(folder)
    if os.path.isfile(os.path.join(folder, UNFINISHED_RECORD)) or folder.endswith(".partial"):
        done = folder[:-len(".partial")] if folder.endswith(".partial") else "the folder it is renamed to"
        raise ValueError(f"{folder} holds the images of an unfinished generate or palette-test (stopped, or still "
                         f"running); run that command again to finish it, then evaluate {done}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def ratio_of(k: int) -> float:
    """Mask ratio k/16 (the reference writes ``ratio / 16.0``)."""
    return k / 16.0


def generated_prefix(mode: str, k: int) -> str:
    """File-name prefix of generated images, e.g. ``center_0.25_`` for (center, 4)."""
    return f"{mode}_{ratio_of(k)}_"


def eval_modes(task: str) -> list[tuple[str, int]]:
    """(mode, k) pairs the FID/IS eval runs over: inpaint center x {4, 8}; outpaint outpaint x 1..13."""
    _check_task(task)
    return list(_EVAL_MODES[task])


def clip_modes(task: str) -> list[tuple[str, int]]:
    """(mode, k) pairs the CLIP eval runs over: k in {4, 8} for both tasks (reference quirk, §8)."""
    _check_task(task)
    return list(_CLIP_MODES[task])


def generated_path(dst: str, split: str, wnid: str, mode: str, k: int, orig_name: str) -> str:
    """``<dst>/<split>/<wnid>/<mode>_<k/16>_<orig_name>``: where generation writes one image."""
    _check_split(split)
    return os.path.join(dst, split, wnid, generated_prefix(mode, k) + orig_name)


def original_name(generated_name: str, prefix: str) -> str:
    """The original file name inside a generated one: the base name with ``prefix`` removed."""
    base = os.path.basename(generated_name)
    if not base.startswith(prefix) or len(base) == len(prefix):
        raise ValueError(f"generated file {generated_name!r} does not start with prefix {prefix!r}")
    return base[len(prefix):]


@dataclass(frozen=True)
class ImagePair:
    generated: str  # path of the generated image
    original: str   # path of the original it should reproduce
    folder: str     # class folder (wnid) or Palette class tag
    name: str       # original file name (the pairing key)


def _is_broken_link(path: str) -> bool:
    return os.path.islink(path) and not os.path.exists(path)


def _refuse_broken_links(broken: list[str], what: str) -> None:
    """A dangling link is an image that should be there: skipping it would silently shrink the metric's set."""
    if broken:
        raise FileNotFoundError(f"{len(broken)} {what} file(s) are broken links (their targets are gone), "
                                f"e.g. {broken[:3]}; restore the targets or remove the links")


def check_nonempty_files(paths, what: str) -> None:
    """ValueError naming the empty (0-byte) files among ``paths``: what an interrupted write leaves behind.

    A cheap stat per file, so it runs before any network; other undecodable files are found when read.
    """
    empty = [p for p in paths if os.path.getsize(p) == 0]
    if empty:
        raise ValueError(f"cannot decode image file(s) among the {what}: {len(empty)} empty (0-byte) file(s), "
                         f"e.g. {empty[:3]}; was a generation or copy interrupted? Regenerate or remove them")


def _require_existing(pairs: list[ImagePair], what: str) -> None:
    missing = [p.original for p in pairs if not os.path.isfile(p.original)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(pairs)} {what} originals are missing, e.g. {missing[:3]}")


def collect_mage_pairs(dst: str, split: str, prefix: str, data_root: str, *,
                       name_pattern: str = "ILSVRC2012_*.JPEG", check_originals: bool = True) -> list[ImagePair]:
    """Generated ``<dst>/<split>/*/<prefix><name>`` paired with ``<data_root>/<wnid>/<name>``.

    ``name_pattern`` filters the original names as the reference glob ``{prefix}ILSVRC2012_*.JPEG`` does.
    With ``check_originals`` a missing original is an error (it would silently change the FID set).
    """
    _check_split(split)
    split_dir = os.path.join(dst, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"no generated {split} folder: {split_dir}")
    pairs, skipped, broken = [], [], []
    for wnid in sorted(os.listdir(split_dir)):
        wnid_dir = os.path.join(split_dir, wnid)
        if wnid.startswith(".") or not os.path.isdir(wnid_dir):  # the reference's glob "*/" skips hidden folders
            continue
        for fname in sorted(os.listdir(wnid_dir)):
            path = os.path.join(wnid_dir, fname)
            if not fname.startswith(prefix):
                continue
            if not os.path.isfile(path):  # a folder is skipped; a dangling link is an error (below)
                if _is_broken_link(path):
                    broken.append(path)
                continue
            name = fname[len(prefix):]
            if not fnmatch.fnmatchcase(name, name_pattern):
                skipped.append(fname)
                continue
            pairs.append(ImagePair(path, os.path.join(data_root, wnid, name), wnid, name))
    _refuse_broken_links(broken, f"generated {split} {prefix}")
    if not pairs and skipped:  # files are there, but under other names: say so instead of "no images"
        raise FileNotFoundError(
            f"none of the {len(skipped)} generated {split} files with prefix {prefix!r} under {dst} has an original "
            f"name matching {name_pattern!r} (e.g. {skipped[0]!r}); pass the names' pattern (--name_pattern)")
    if check_originals:
        _require_existing(pairs, f"{split} {prefix}")
    return pairs


def read_class_list(path: str) -> list[str]:
    """Lines of Palette's ``class.txt`` (e.g. ``/a/airfield``), blank lines dropped."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark would glue onto the first class
        classes = [line.strip() for line in f if line.strip()]
    if not classes:
        raise ValueError(f"class list {path} is empty")
    return classes


def palette_split_classes(classes: list[str]) -> dict[str, list[str]]:
    """{'retain': classes[0:50], 'forget': classes[50:100]} (§4.3)."""
    if len(classes) < 100:
        raise ValueError(f"the Palette class list needs at least 100 lines, got {len(classes)}")
    return {"retain": list(classes[:50]), "forget": list(classes[50:100])}


def palette_results_dir(dst: str, mask_ratio: float = 0.5) -> str:
    """``<dst>/results/test/0/<mask_ratio:.2f>``: where Palette's test writes Out_/GT_ images."""
    return os.path.join(dst, "results", "test", "0", f"{mask_ratio:.2f}")


def collect_palette_pairs(dst: str, classes: list[str], *, mask_ratio: float = 0.5,
                          original_root: str | None = None, check_originals: bool = True) -> list[ImagePair]:
    """``Out_<tag>_Places365*.jpg`` of the given classes (or another image extension palette-test kept from its
    data: .jpeg / .png / .bmp / .webp, any case), each paired with its original by name.

    ``dst`` is the checkpoint folder (``<dst>/results/test/0/<mask_ratio:.2f>`` holds the images) or that
    results folder itself.

    The original is ``GT_<name>`` in the same folder (what eval365.py's FID uses), or, with
    ``original_root`` (e.g. ``<data_root>/val_256``), ``<original_root>/<class without leading "/">/<name>``
    (what clip_embed.py compares with). Pairs come in class-list order, names sorted within a class.
    """
    results = palette_results_dir(dst, mask_ratio)
    if not os.path.isdir(results):
        if os.path.isdir(dst) and any(f.startswith("Out_") for f in os.listdir(dst)):
            results = dst  # dst is the results folder itself (what palette-test prints)
        elif os.path.isdir(results + ".partial"):
            refuse_unfinished(results + ".partial")
        else:
            raise FileNotFoundError(f"no Palette results: neither {results} nor {dst} holds Out_ images")
    listing = sorted(os.listdir(results))
    _refuse_broken_links([os.path.join(results, f) for f in listing if f.startswith(("Out_", "GT_"))
                          and _is_broken_link(os.path.join(results, f))], "Palette result")
    files = [f for f in listing if os.path.isfile(os.path.join(results, f))]
    pairs = []
    for cls in classes:
        tag = cls.replace("/", "_")  # "/a/airfield" -> "_a_airfield"
        pattern = f"Out{tag}_Places365*"
        for fname in files:
            if fnmatch.fnmatchcase(fname, pattern) and fname.lower().endswith(IMAGE_EXTENSIONS):
                name = fname[len("Out_"):]
                original = (os.path.join(results, "GT_" + name) if original_root is None
                            else os.path.join(original_root, cls.lstrip("/"), name))
                pairs.append(ImagePair(os.path.join(results, fname), original, tag.lstrip("_"), name))
    if check_originals:
        _require_existing(pairs, "Palette GT_")
    return pairs
