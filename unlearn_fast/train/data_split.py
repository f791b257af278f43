"""Which image files go in the forget, retain and proxy ("support") sets (REFERENCE.md §4.1, §4.2).

Reference semantics of `dataset_class_img1k_only` / `dataset_class_img1k_coco`, with one deliberate change
(§11): the per-class shuffle is seeded from (seed, class name), so every run and every DDP rank builds the
same subsets. Plain Python lists of paths; no tensors.

    from unlearn_fast.train.data_split import default_class_split, select_unlearning_files
    forget, retain = default_class_split("../dataset/imagenet1k/train")
    items = select_unlearning_files("../dataset/imagenet1k/train", forget, retain)  # [(path, ±100.0)]

Generalisation: the reference hard-codes its 100 forget classes and 800 proxy classes in the formulas
(`100·n`, `/800`). Here those numbers are the actual number of forget classes and of proxy class folders.
On the reference split (the 200 ImageNet-R classes) the reference's own rules apply, so its numbers come out
whatever else the tree holds: only folders named `n*` are proxy classes (its `glob(data_path/n*/)`), and each
gives ceil(ratio·100·n/800) files, also on a partial ImageNet copy or one with empty class folders.
A folder that cannot be read is an error for a forget or retain class and an empty proxy class (as glob).
"""
from __future__ import annotations

import csv
import math
import numbers
import os
import random
import re
import sys
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Sequence

from .seeding import derive_seed

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
FORGET_LABEL = -100.0  # the reference's label for forget rows
RETAIN_LABEL = 100.0   # retain and proxy rows
REFERENCE_PROXY_CLASSES = 800  # ImageNet-1K minus the 200 ImageNet-R classes: the reference's `/800.0`

Item = tuple[str, float]


def imagenet_r_wnids() -> list[str]:
    """The 200 ImageNet-R wnids, sorted (the reference's `img_r_folder_dict.yaml` order, ids 0..199)."""
    text = resources.files("unlearn_fast").joinpath("data/imagenet_r_wnids.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def reference_class_split() -> tuple[list[str], list[str]]:
    """Forget = ImageNet-R ids 0-99, retain = ids 100-199 (the reference's split, by sorted order)."""
    wnids = imagenet_r_wnids()
    return wnids[:100], wnids[100:]


def default_class_split(root) -> tuple[list[str], list[str]]:
    """The reference split if `root` is an ImageNet-style folder holding all 200 ImageNet-R classes."""
    root = _check_data_dir(root, "data path")
    folders = set(list_class_folders(root))
    wnids = imagenet_r_wnids()
    missing = [w for w in wnids if w not in folders]
    if missing:
        found = len(wnids) - len(missing)
        raise ValueError(
            f"{root} does not look like ImageNet ({found} of the 200 ImageNet-R class folders present, "
            f"missing e.g. {', '.join(missing[:3])}); pass --forget_classes and --retain_classes")
    return reference_class_split()


def parse_class_list(spec: str) -> list[str]:
    """Class names from 'a,b,c' or from a text file (one name per line, so a name may hold a comma; '#' at the
    start of a line or after a space starts a comment, so a name may hold a '#' too: 'b#ird')."""
    if os.path.isfile(spec):
        try:
            lines = Path(spec).read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"class list file {spec} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        names = [re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip() for line in lines]
    else:
        names = [name.strip() for name in spec.split(",")]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"no class names in {spec!r}")
    return names


def reference_coco_root(data_path) -> str:
    """Where the reference looks for COCO with --use_coco: dirname(dirname(data_path))/coco/train2017."""
    parent = os.path.dirname(os.path.dirname(os.path.normpath(str(data_path))))
    return os.path.join(parent, "coco", "train2017")


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_class_folders(root) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `root`."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(folder, recursive: bool = False) -> list[str]:
    """Sorted image paths in `folder` (sorted so the seeded shuffle sees the same order on every machine).
    A folder that cannot be listed is a ValueError naming it."""
    folder = str(folder)
    if not recursive:
        try:
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
        except OSError as exc:
            raise ValueError(f"cannot read the image folder {folder}: {exc.strerror or exc}") from None
        return [os.path.join(folder, name) for name in names]
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths += [os.path.join(dirpath, f) for f in filenames if is_image_file(f)]
    return sorted(paths)


def seeded_shuffle(items: Sequence, seed: int, *key) -> list:
    """A copy of `items` shuffled by a Random seeded from (seed, *key): the same on every rank and run."""
    out = list(items)
    random.Random(derive_seed(seed, "data_split", *key)).shuffle(out)
    return out


class UnlearnSubsets(NamedTuple):
    """The three file lists after oversampling; paths may repeat."""
    forget: list[str]
    retain: list[str]
    proxy: list[str]

    def items(self) -> list[Item]:
        """forget (-100.0) + retain (+100.0) + proxy (+100.0), the reference's order and labels."""
        return ([(p, FORGET_LABEL) for p in self.forget] + [(p, RETAIN_LABEL) for p in self.retain]
                + [(p, RETAIN_LABEL) for p in self.proxy])


def select_unlearning_subsets(root, forget_classes: Sequence[str], retain_classes: Sequence[str],
                              num_image_per_class: int = 120, retainset_ratio: float = 1.0,
                              opendata_to_forget_ratio: float | None = None, proxy_root=None,
                              seed: int = 0) -> UnlearnSubsets:
    """Choose and oversample the forget / retain / proxy files (see `select_unlearning_files`)."""
    root = _check_data_dir(root, "data path")
    forget_classes, retain_classes = _check_classes(forget_classes, retain_classes)
    if isinstance(num_image_per_class, bool) or not isinstance(num_image_per_class, numbers.Integral) \
            or num_image_per_class < 1:
        raise ValueError(f"num_image_per_class must be an integer >= 1, got {num_image_per_class!r}")
    if not _is_nonneg(retainset_ratio):
        raise ValueError(f"retainset_ratio must be a number >= 0, got {retainset_ratio!r}")
    open_ratio = 0.0 if opendata_to_forget_ratio is None else opendata_to_forget_ratio
    if not _is_nonneg(open_ratio):
        raise ValueError(f"opendata_to_forget_ratio must be a number >= 0, got {opendata_to_forget_ratio!r}")

    folders = list_class_folders(root)
    absent = [c for c in forget_classes + retain_classes if c not in set(folders)]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise ValueError(f"class folder(s) not found under {root}: {', '.join(absent[:5])}{more}"
                         + (_not_a_folder_hint(root, absent) or _comma_hint(folders, absent)
                            or _layout_hint(root, folders, absent)))

    folder_proxy = open_ratio > 0 and proxy_root is None
    _refuse_aliased_forget_folders(root, forget_classes, [c for c in folders if c not in set(forget_classes)]
                                   if folder_proxy else retain_classes)
    n = int(num_image_per_class)
    forget = _take_per_class(root, forget_classes, n, seed)
    retain = _take_per_class(root, retain_classes, _ceil_count(n * retainset_ratio), seed)
    proxy: list[str] = []
    if open_ratio > 0:
        wanted_total = open_ratio * len(forget_classes) * n  # reference: open_ratio * 100 * n
        if proxy_root is not None:
            proxy = _take_external_proxy(proxy_root, _ceil_count(wanted_total), seed,
                                         [os.path.join(root, c) for c in forget_classes])
        else:
            taken = set(forget_classes) | set(retain_classes)
            others = [c for c in folders if c not in taken]
            divisor = None
            if _is_reference_split(forget_classes, retain_classes):
                # the reference's classes are glob(data_path/n*/), and it divides by 800 whatever the tree holds
                others, divisor = [c for c in others if c.startswith("n")], REFERENCE_PROXY_CLASSES
            proxy = _take_folder_proxy(root, others, wanted_total, seed, divisor)
    if not retain and not proxy:
        raise ValueError("the retain set is empty: give retain classes with retainset_ratio (--retainset_ratio) > 0, "
                         "or a proxy with opendata_to_forget_ratio (--opendata_to_forget_ratio) > 0")

    # Oversampling, as the reference: retain up to max(|proxy|, |forget|) by repetition (in order) ...
    retain = _repeat_to(retain, max(len(proxy), len(forget)))
    # ... then forget up to max(|proxy| + |retain|, #forget classes * n), repeated, shuffled, truncated.
    target_forget = max(len(proxy) + len(retain), len(forget_classes) * n)
    pool = forget * math.ceil(target_forget / len(forget))
    forget = seeded_shuffle(pool, seed, "forget_oversample")[:target_forget]
    return UnlearnSubsets(forget, retain, proxy)


def _not_a_folder_hint(root: str, absent: list) -> str:
    """A requested class that `ls` shows but that is no folder: a link whose target is gone (a data drive that is
    not mounted), or a file."""
    for name in absent:
        path = os.path.join(root, name)
        if os.path.islink(path) and not os.path.exists(path):
            return f"; {path} is a link to {os.readlink(path)}, which does not exist (a drive not mounted?)"
        if os.path.lexists(path) and not os.path.isdir(path):
            return f"; {path} is a file, not a class folder"
    return ""


def _comma_hint(folders: list, absent: list) -> str:
    """A class folder with a comma in its name, which a comma-separated list splits into names not found."""
    split = [f for f in folders if "," in f and any(part.strip() in absent for part in f.split(","))]
    if not split:
        return ""
    return (f"; the class folder {split[0]!r} has a comma in its name, which the comma-separated list splits: list "
            "the class names in a text file, one per line, and pass the file's path instead")


def _layout_hint(root: str, folders: list, absent: list) -> str:
    """What the data folder holds instead: the class folders one level down (pass that folder), loose images (the
    layout is DIR/<class>/<image>), or the class folders that are there."""
    def inside(folder):
        try:
            return set(list_class_folders(os.path.join(root, folder)))
        except OSError:  # an unreadable sub-folder holds no hint
            return set()
    nested = [os.path.join(root, f) for f in folders if set(absent) <= inside(f)]
    if nested:
        return f"; they are in {nested[0]}: pass --data_path {nested[0]}"
    if not folders and any(is_image_file(e.name) for e in os.scandir(root) if e.is_file()):
        return "; it holds loose images: the layout is DIR/<class>/<image>"
    if folders:
        shown = ", ".join(folders[:8]) + (f" and {len(folders) - 8} more" if len(folders) > 8 else "")
        return f"; its class folders are: {shown}"
    return "; it holds no class folder (the layout is DIR/<class>/<image>)"


def select_unlearning_files(root, forget_classes: Sequence[str], retain_classes: Sequence[str],
                            num_image_per_class: int = 120, retainset_ratio: float = 1.0,
                            opendata_to_forget_ratio: float | None = None, proxy_root=None,
                            seed: int = 0) -> list[Item]:
    """The training list [(path, label)]: forget (-100.0) + retain (+100.0) + proxy (+100.0).

    Per class the image files are sorted then shuffled by a Random seeded from (seed, class name).
    forget: first `num_image_per_class` of each forget class. retain: first
    ceil(num_image_per_class * retainset_ratio) of each retain class. proxy (only when
    opendata_to_forget_ratio > 0): with `proxy_root` None, every other class folder under `root` gives
    ceil(ratio * F * n / P) files (F forget classes, P proxy folders with images; on the reference split
    the reference's rule: the other `n*` folders, ceil(ratio * 100 * n / 800) each);
    with `proxy_root` (COCO-style, searched recursively) ceil(ratio * F * n) files in total (a proxy_root
    that holds forget-class images is refused; a ratio so large that the count overflows takes every file).
    Then retain is repeated to max(|proxy|, |forget|) and forget is repeated, shuffled and cut to
    max(|proxy| + |retain|, F * n), so forget rows make up about half of the list (more when the classes
    hold fewer than n files: forget is still repeated up to F * n, as the reference's 100 * n).
    """
    return select_unlearning_subsets(root, forget_classes, retain_classes, num_image_per_class,
                                     retainset_ratio, opendata_to_forget_ratio, proxy_root, seed).items()


def read_file_list_csv(path, root=None, forget_classes: Sequence[str] | None = None,
                       retain_classes: Sequence[str] | None = None) -> list[Item]:
    """Read a reference file list: `imgs,labels` rows (header optional) or one path per line
    (`val/<wnid>/<file>`, as `full_test.csv`), labelled by whether the parent folder is a forget or a
    retain class (default: the reference split). Relative paths are joined to `root` when given."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"file list not found: {path}")
    if forget_classes is None and retain_classes is None:
        forget_classes, retain_classes = reference_class_split()
    forget_set, retain_set = set(forget_classes or ()), set(retain_classes or ())
    items: list[Item] = []
    # -sig: a byte-order mark is not part of the header; surrogateescape: file names that are not UTF-8 round-trip
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            row = [cell.strip() for cell in row]
            if not row or not any(row):
                continue
            if not items and [c.lower() for c in row] == ["imgs", "labels"]:  # header: the first non-blank row
                continue
            file = row[0]
            if len(row) == 2:
                label = _parse_label(row[1], path, line_no)
            elif len(row) == 1:
                wnid = os.path.basename(os.path.dirname(file))
                if wnid in forget_set:
                    label = FORGET_LABEL
                elif wnid in retain_set:
                    label = RETAIN_LABEL
                else:
                    raise ValueError(f"{path}:{line_no}: class {wnid!r} of {file!r} is neither a forget "
                                     "nor a retain class")
            else:
                raise ValueError(f"{path}:{line_no}: expected 'path' or 'path,label', got {len(row)} fields")
            if root is not None and not os.path.isabs(file):
                file = os.path.join(str(root), file)
            items.append((file, label))
    if not items:
        raise ValueError(f"file list {path} has no entries")
    return items


def write_file_list_csv(path, items: Sequence[Item]) -> None:
    """Write [(path, label)] as the reference's `imgs,labels` CSV (labels like -100.0 / 100.0)."""
    # UTF-8 whatever the locale; a file name that is not UTF-8 (Linux allows any bytes) is written byte for byte
    with open(str(path), "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["imgs", "labels"])
        for file, label in items:
            writer.writerow([file, repr(float(label))])


# ---------------------------------------------------------------------------------------------------

def _check_data_dir(path, what: str) -> str:
    if path is None or str(path) == "":
        raise ValueError(f"{what} is empty")
    path = str(path)
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path} does not exist or is not a folder")
    return path


def _check_classes(forget_classes, retain_classes) -> tuple[list[str], list[str]]:
    for what, classes in (("forget_classes", forget_classes), ("retain_classes", retain_classes)):
        if isinstance(classes, str):
            raise TypeError(f"{what} must be a list of class names, not a string ({classes!r}); "
                            "use parse_class_list for 'a,b,c'")
    forget_classes, retain_classes = list(forget_classes), list(retain_classes or [])
    if not forget_classes:
        raise ValueError("the forget set is empty: give at least one forget class")
    for what, classes in (("forget_classes", forget_classes), ("retain_classes", retain_classes)):
        dups = sorted({c for c in classes if classes.count(c) > 1})
        if dups:
            raise ValueError(f"{what} lists {', '.join(dups[:5])} more than once")
    both = sorted(set(forget_classes) & set(retain_classes))
    if both:
        raise ValueError(f"class(es) both in forget and retain: {', '.join(both[:5])}")
    return forget_classes, retain_classes


def _refuse_aliased_forget_folders(root: str, forget_classes, others) -> None:
    """A retain or proxy class folder (``others``) that is a symlink to a forget class folder (or the
    reverse) would train the forget images as retain (+100): refused, as a proxy holding forget images."""
    forget_real = {os.path.realpath(os.path.join(root, c)): c for c in forget_classes}
    for cls in others:
        twin = forget_real.get(os.path.realpath(os.path.join(root, cls)))
        if twin is not None:
            raise ValueError(f"class folder {os.path.join(root, cls)} is the forget class folder {twin} (a symlink); "
                             "its images would be trained as retain images: remove the link or pick other classes")


def _is_nonneg(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _class_images(root: str, cls: str) -> list[str]:
    files = list_images(os.path.join(root, cls))
    if not files:
        raise ValueError(f"class folder {os.path.join(root, cls)} has no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _take_per_class(root: str, classes: list[str], count: int, seed: int) -> list[str]:
    out: list[str] = []
    for cls in classes:
        files = _class_images(root, cls)  # checked even when count is 0: a listed class must hold images
        out += seeded_shuffle(files, seed, "class", cls)[:count]
    return out


def _is_reference_split(forget_classes, retain_classes) -> bool:
    forget, retain = reference_class_split()
    return set(forget_classes) == set(forget) and set(retain_classes) == set(retain)


def _readable_images(folder: str) -> list[str]:
    """The folder's images, or none if it cannot be read (the reference's glob skips such folders)."""
    try:
        return list_images(folder)
    except ValueError:
        return []


def _take_folder_proxy(root: str, proxy_classes: list[str], wanted_total: float, seed: int,
                       divisor: int | None = None) -> list[str]:
    """ceil(wanted_total / divisor) files from each proxy class; divisor None: the number of proxy folders
    with images (stray empty folders are not classes)."""
    per_class_files = {c: _readable_images(os.path.join(root, c)) for c in proxy_classes}
    per_class_files = {c: f for c, f in per_class_files.items() if f}
    if not per_class_files:
        raise ValueError(f"opendata_to_forget_ratio (--opendata_to_forget_ratio) > 0 but {root} has no other class "
                         "folders with images to use as the proxy; give proxy_root (--use_coco --proxy_path DIR, "
                         "e.g. COCO) or set the ratio to 0")
    count = _ceil_count(wanted_total / (divisor or len(per_class_files)))
    out: list[str] = []
    for cls, files in per_class_files.items():
        out += seeded_shuffle(files, seed, "class", cls)[:count]
    return out


def _take_external_proxy(proxy_root, count: int, seed: int, forget_dirs=()) -> list[str]:
    if proxy_root is not None and str(proxy_root) and not os.path.isdir(str(proxy_root)):
        raise ValueError(f"proxy path {proxy_root} does not exist or is not a folder (--proxy_path; with "
                         "--use_coco it defaults to <data_path>/../../coco/train2017, as the reference)")
    proxy_root = _check_data_dir(proxy_root, "proxy path")
    files = list_images(proxy_root, recursive=True)
    if not files:
        raise ValueError(f"proxy path {proxy_root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    # a proxy that holds forget-class images (e.g. the training tree itself) would train them as retain (+100)
    forget_dirs = {os.path.realpath(d) for d in forget_dirs}
    clash = sorted(d for d in {os.path.dirname(f) for f in files} if os.path.realpath(d) in forget_dirs)
    if clash:
        raise ValueError(f"proxy path {proxy_root} contains forget-class images ({', '.join(clash[:3])}); "
                         "point the proxy at other data (e.g. COCO)")
    return seeded_shuffle(files, seed, "external_proxy")[:count]


def _ceil_count(x: float) -> int:
    """ceil(x) as a file count; a product of huge finite ratios that overflows to inf means 'every file'."""
    return math.ceil(x) if math.isfinite(x) else sys.maxsize


def _repeat_to(items: list, target: int) -> list:
    """`items` repeated in order and cut to `target` (stays empty if empty)."""
    if not items:
        return []
    return (items * math.ceil(target / len(items)))[:target]


def _parse_label(text: str, path: str, line_no: int) -> float:
    try:
        label = float(text)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: label {text!r} is not a number") from None
    if label not in (FORGET_LABEL, RETAIN_LABEL):
        raise ValueError(f"{path}:{line_no}: label {text!r} must be -100.0 (forget) or 100.0 (retain)")
    return label
