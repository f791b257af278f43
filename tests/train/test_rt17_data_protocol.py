"""Audit of the MAGE data protocol against the official `util/datasets.py` (REFERENCE.md §4.1), findings only.

The official `dataset_class_img1k_only` lists its classes with `glob(data_path + 'n*/')` and gives every
other class ceil(ratio * 100 * n / 800) files: the 100 and the 800 are constants, and a folder whose name does
not start with "n" is never a class. A folder glob cannot read is simply empty to it. unlearn_fast replaces 100
and 800 with the actual class counts, which is meant to give "the same numbers on the reference split"
(README); these tests pin that claim on ImageNet trees that are not exactly the 1000 ImageNet-1K folders.
The restatement below uses sorted globs and a seeded shuffle (§11), so only counts per class are compared.
"""
from __future__ import annotations

import glob
import math
import os
from collections import Counter

import pytest

from unlearn_fast.train import data_split
from unlearn_fast.train.data_split import (default_class_split, imagenet_r_wnids, list_images,
                                           select_unlearning_subsets)


def _touch(folder, count, ext=".JPEG"):
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        open(os.path.join(folder, f"{os.path.basename(folder)}_{k}{ext}"), "wb").close()  # never opened


def _imagenet_like(root, others: dict, per_r_class=3, extra: dict | None = None) -> str:
    """The 200 ImageNet-R wnid folders (``per_r_class`` empty .JPEG each), the ``others`` n-folders
    {name: count} and ``extra`` non-class folders {name: count}."""
    for wnid in imagenet_r_wnids():
        _touch(os.path.join(root, wnid), per_r_class)
    for name, count in {**others, **(extra or {})}.items():
        _touch(os.path.join(root, name), count)
    return str(root)


def official_support_per_class(data_path, n, open_ratio) -> Counter:
    """How many files `dataset_class_img1k_only` takes from each non-ImageNet-R folder (restated)."""
    r_wnids = set(imagenet_r_wnids())
    per_class = math.ceil(open_ratio * 100 * n / 800.0)
    out = Counter()
    for folder_name in sorted(glob.glob(os.path.join(data_path, "n*/"))):
        folder = folder_name.split("/")[-2]
        if folder not in r_wnids:
            taken = min(per_class, len(glob.glob(os.path.join(folder_name, "*.JPEG"))))
            if taken:
                out[folder] = taken
    return out


def _cls(path):
    return os.path.basename(os.path.dirname(path))


# ------------------------------------------------------------------ finding 1: only n* folders are classes

def test_reference_split_proxy_takes_only_n_folders_as_the_official_glob(tmp_path):
    """A non-wnid folder inside the ImageNet train folder (a mount's lost+found, a scratch folder) is not a proxy
    class for the official glob `n*/`; it must neither give files nor change the per-class count."""
    others = {f"n9{i:07d}": 30 for i in range(800)}
    root = _imagenet_like(tmp_path / "train", others, extra={"scratch": 30, "Xtra": 30})
    forget, retain = default_class_split(root)
    n, ratio = 4, 2.0  # ceil(2 * 100 * 4 / 800) = 1 per proxy class
    sub = select_unlearning_subsets(root, forget, retain, n, 1.0, ratio, seed=0)
    assert Counter(map(_cls, sub.proxy)) == official_support_per_class(root + "/", n, ratio)
    assert not {"scratch", "Xtra"} & set(map(_cls, sub.proxy))


# ------------------------------------------------------------------ finding 2: the constant 800

@pytest.mark.parametrize("n,ratio", [(8, 2.0), (5, 0.3), (120, 0.5)])
def test_reference_split_on_a_partial_imagenet_keeps_the_official_per_class_count(tmp_path, n, ratio):
    """On a tree with the 200 ImageNet-R classes and only some of the 800 others (a subset copy), or with an
    empty class folder, the official count per proxy class is still ceil(ratio * 100 * n / 800)."""
    others = {f"n9{i:07d}": 25 for i in range(11)}
    others["n90000099"] = 0  # an empty class folder: the official code counts it in its 800 and takes nothing
    root = _imagenet_like(tmp_path / "train", others)
    forget, retain = default_class_split(root)
    sub = select_unlearning_subsets(root, forget, retain, n, 1.0, ratio, seed=0)
    expected = official_support_per_class(root + "/", n, ratio)
    assert Counter(map(_cls, sub.proxy)) == expected
    # and the oversampling that follows uses those counts: |retain| = max(|S|, |F raw|), |forget| = max(|S|+|R|, 100n)
    f_raw = 100 * min(n, 3)
    assert len(sub.retain) == max(sum(expected.values()), f_raw)
    assert len(sub.forget) == max(sum(expected.values()) + len(sub.retain), 100 * n)


def test_custom_classes_keep_the_actual_class_counts(tmp_path):
    """The generalisation stays for any other split: ceil(ratio * F * n / P) with P the proxy folders with images."""
    for name, count in {"f1": 6, "f2": 6, "r1": 6, "p1": 9, "p2": 9, "p3": 9, "lost": 0}.items():
        _touch(str(tmp_path / name), count, ".png")
    sub = select_unlearning_subsets(str(tmp_path), ["f1", "f2"], ["r1"], 3, 1.0, 1.0, seed=0)
    assert Counter(map(_cls, sub.proxy)) == {"p1": 2, "p2": 2, "p3": 2}  # ceil(1 * 2 * 3 / 3)


# ------------------------------------------------------------------ finding 3: unreadable folders

@pytest.fixture
def unreadable(monkeypatch):
    """Make os.scandir raise PermissionError for the folders put in the returned set (tests run as root, where
    chmod 000 does not stop reads)."""
    blocked: set[str] = set()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.normpath(str(path)) in blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return blocked


def test_unreadable_proxy_folder_is_empty_as_for_the_official_glob(tmp_path, unreadable):
    others = {f"n9{i:07d}": 10 for i in range(6)}
    root = _imagenet_like(tmp_path / "train", others)
    forget, retain = default_class_split(root)
    expected = select_unlearning_subsets(root, forget, retain, 4, 1.0, 8.0, seed=0)
    unreadable.add(os.path.normpath(os.path.join(root, "n90000002")))
    sub = select_unlearning_subsets(root, forget, retain, 4, 1.0, 8.0, seed=0)
    # glob swallows the error: that folder gives nothing, the others give what they gave before
    assert "n90000002" not in set(map(_cls, sub.proxy))
    assert [p for p in expected.proxy if _cls(p) != "n90000002"] == sub.proxy


def test_unreadable_forget_or_retain_folder_is_one_clear_error(tmp_path, unreadable):
    for name in ("f1", "r1"):
        _touch(str(tmp_path / name), 3, ".png")
    for name in ("f1", "r1"):
        unreadable.clear()
        unreadable.add(os.path.normpath(str(tmp_path / name)))
        with pytest.raises(ValueError, match=rf"cannot read the image folder .*{name}.*Permission denied"):
            select_unlearning_subsets(str(tmp_path), ["f1"], ["r1"], 2)
        with pytest.raises(ValueError, match=rf"cannot read the image folder .*{name}"):
            list_images(str(tmp_path / name))


def test_reference_split_is_recognised_by_its_classes_not_their_order(tmp_path):
    others = {f"n9{i:07d}": 25 for i in range(3)}
    root = _imagenet_like(tmp_path / "train", others)
    forget, retain = default_class_split(root)
    a = select_unlearning_subsets(root, forget, retain, 8, 1.0, 2.0, seed=0)
    b = select_unlearning_subsets(root, forget[::-1], retain[::-1], 8, 1.0, 2.0, seed=0)
    assert Counter(map(_cls, a.proxy)) == Counter(map(_cls, b.proxy)) == {f"n9{i:07d}": 2 for i in range(3)}
    # one class fewer is not the reference split: the actual counts apply (ceil(2 * 99 * 8 / 4) > 25 files),
    # and the dropped forget class is now one of the 4 proxy folders
    c = select_unlearning_subsets(root, forget[1:], retain, 8, 1.0, 2.0, seed=0)
    assert Counter(map(_cls, c.proxy)) == {**{f"n9{i:07d}": 25 for i in range(3)}, forget[0]: 3}
    assert data_split.REFERENCE_PROXY_CLASSES == 800


def test_missing_class_folders_say_what_the_data_folder_holds(tmp_path):
    """The usual layout mistakes: the classes one level down (pass that folder), loose images, other classes."""
    from PIL import Image

    from tests.helpers import make_class_tree
    from unlearn_fast.train.data_split import select_unlearning_files
    args = (["cat"], ["bird"], 2, 1.0, None, None, 0)
    make_class_tree(tmp_path / "nested" / "train", ("cat", "bird"), 2, seed=0)
    with pytest.raises(ValueError, match=r"not found under .*nested: cat, bird; they are in .*train: pass "
                                         r"--data_path .*nested/train"):
        select_unlearning_files(str(tmp_path / "nested"), *args)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(ValueError, match="it holds loose images: the layout is DIR/<class>/<image>"):
        select_unlearning_files(str(loose), *args)
    make_class_tree(tmp_path / "other", ("dog", "fish"), 1, seed=1)
    with pytest.raises(ValueError, match="its class folders are: dog, fish"):
        select_unlearning_files(str(tmp_path / "other"), *args)
