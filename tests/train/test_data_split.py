"""Forget / retain / proxy file selection: counts, oversampling, labels, seeding, CSV lists, errors."""
import math
import os
import re
from collections import Counter

import pytest
from PIL import Image

from unlearn_fast.train.data_split import (FORGET_LABEL, RETAIN_LABEL, default_class_split,
                                           imagenet_r_wnids, list_images, parse_class_list,
                                           read_file_list_csv, reference_class_split, reference_coco_root,
                                           select_unlearning_files, select_unlearning_subsets,
                                           write_file_list_csv)


def write_image(path, value=0, ext_format=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 3), (value % 256, 7, 9)).save(path, format=ext_format)


def make_tree(root, counts, ext=".png"):
    """root/<class>/<class>_<i><ext> with counts[class] images each."""
    for cls, n in counts.items():
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            write_image(str(root / cls / f"{cls}_{i:03d}{ext}"), i, "PNG")
    return root


@pytest.fixture
def tree(tmp_path):
    # 2 forget, 2 retain, 4 proxy classes; proxy p3 is small (2 images)
    return make_tree(tmp_path / "train", {"f1": 10, "f2": 10, "r1": 10, "r2": 10,
                                          "p0": 6, "p1": 6, "p2": 6, "p3": 2})


FORGET, RETAIN = ["f1", "f2"], ["r1", "r2"]


def class_of(path):
    return os.path.basename(os.path.dirname(path))


def expected_sizes(n_forget_raw, n_retain_raw, n_proxy, n_forget_classes, n):
    """The reference's oversampling formulas (REFERENCE.md §4.1), restated."""
    target_r = max(n_proxy, n_forget_raw) if n_retain_raw else 0
    target_f = max(n_proxy + target_r, n_forget_classes * n)
    return target_f, target_r


# ---------------------------------------------------------------- the 200 ImageNet-R wnids

def test_imagenet_r_wnids_file_gives_reference_boundaries():
    wnids = imagenet_r_wnids()
    assert len(wnids) == 200 and len(set(wnids)) == 200
    assert wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    forget, retain = reference_class_split()
    assert (forget[0], forget[-1]) == ("n01443537", "n02423022")
    assert (retain[0], retain[-1]) == ("n02437616", "n12267677")
    assert len(forget) == len(retain) == 100 and forget + retain == wnids


def test_default_class_split_on_imagenet_like_folder(tmp_path):
    for w in imagenet_r_wnids() + ["n00000001", "n99999999"]:
        os.makedirs(tmp_path / w)
    assert default_class_split(tmp_path) == reference_class_split()
    os.rmdir(tmp_path / imagenet_r_wnids()[57])
    with pytest.raises(ValueError, match="--forget_classes"):
        default_class_split(tmp_path)


def test_default_class_split_errors(tmp_path, tree):
    with pytest.raises(ValueError, match="does not look like ImageNet"):
        default_class_split(tree)
    with pytest.raises(ValueError, match="does not exist"):
        default_class_split(tmp_path / "nope")


# ---------------------------------------------------------------- counts and layout

def test_counts_labels_and_layout_without_proxy(tree):
    items = select_unlearning_files(tree, FORGET, RETAIN, num_image_per_class=4)
    assert len(items) == 16
    labels = [label for _, label in items]
    assert labels == [FORGET_LABEL] * 8 + [RETAIN_LABEL] * 8
    paths = [p for p, _ in items]
    forget_paths, retain_paths = paths[:8], paths[8:]
    assert Counter(map(class_of, forget_paths)) == {"f1": 4, "f2": 4}
    assert Counter(map(class_of, retain_paths)) == {"r1": 4, "r2": 4}
    assert len(set(forget_paths)) == 8 and len(set(retain_paths)) == 8  # no oversampling needed
    assert all(os.path.isfile(p) and p.startswith(str(tree)) for p in paths)


@pytest.mark.parametrize("ratio,per_class", [(0.5, 2), (0.3, 2), (0.25, 1), (2.0, 8)])
def test_retainset_ratio_and_retain_repetition(tree, ratio, per_class):
    subsets = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=4, retainset_ratio=ratio)
    raw = 2 * per_class  # ceil(4 * ratio) per retain class
    assert per_class == math.ceil(4 * ratio)
    assert len(subsets.forget) == 8 and len(subsets.retain) == 8  # target_R = max(0, |forget|) = 8
    # list repetition in order, then truncation: retain[k] == retain[k % raw]
    assert len(set(subsets.retain)) == min(raw, 8)
    assert all(subsets.retain[k] == subsets.retain[k % raw] for k in range(8))


def test_folder_proxy_counts_and_forget_oversampling(tree):
    # n=3, 2 forget classes, 4 proxy folders: ceil(1.0 * 2 * 3 / 4) = 2 per proxy class
    subsets = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=3,
                                        opendata_to_forget_ratio=1.0)
    assert Counter(map(class_of, subsets.proxy)) == {"p0": 2, "p1": 2, "p2": 2, "p3": 2}
    target_f, target_r = expected_sizes(6, 6, 8, 2, 3)
    assert (len(subsets.forget), len(subsets.retain), len(subsets.proxy)) == (target_f, target_r, 8) == (16, 8, 8)
    # forget: 6 distinct files repeated 3x (18), shuffled, cut to 16 -> 2 copies dropped, every file kept
    counts = Counter(subsets.forget)
    assert len(counts) == 6 and set(counts.values()) <= {1, 2, 3} and sum(counts.values()) == 16
    items = subsets.items()
    assert [lab for _, lab in items] == [FORGET_LABEL] * 16 + [RETAIN_LABEL] * 16


def test_folder_proxy_small_class_gives_all_it_has(tree):
    # ceil(2.5 * 2 * 4 / 4) = 5 per class; p3 only has 2
    subsets = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=4,
                                        opendata_to_forget_ratio=2.5)
    assert Counter(map(class_of, subsets.proxy)) == {"p0": 5, "p1": 5, "p2": 5, "p3": 2}
    target_f, target_r = expected_sizes(8, 8, 17, 2, 4)
    assert (len(subsets.forget), len(subsets.retain)) == (target_f, target_r) == (34, 17)


def test_proxy_only_mode_without_real_retain(tree):
    # the README's "800 other classes only" mode: retainset_ratio 0, open ratio > 0
    subsets = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=4, retainset_ratio=0.0,
                                        opendata_to_forget_ratio=0.5)
    assert subsets.retain == []  # stays empty when it was empty
    assert len(subsets.proxy) == 4 * 1  # ceil(0.5 * 2 * 4 / 4) = 1 per class
    assert len(subsets.forget) == max(4, 8)


def test_external_proxy_root(tmp_path, tree):
    coco = tmp_path / "coco" / "train2017"
    for i in range(7):
        write_image(str(coco / f"{i:012d}.jpg"), i, "JPEG")
    for i in range(3):
        write_image(str(coco / "sub" / f"x{i}.JPG"), i, "JPEG")
    (coco / "notes.txt").write_text("not an image")
    subsets = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=4,
                                        opendata_to_forget_ratio=0.5, proxy_root=coco)
    assert len(subsets.proxy) == math.ceil(0.5 * 2 * 4) == 4  # total, not per class
    assert all(p.startswith(str(coco)) for p in subsets.proxy) and len(set(subsets.proxy)) == 4
    everything = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=4,
                                           opendata_to_forget_ratio=5.0, proxy_root=coco)
    assert sorted(everything.proxy) == list_images(coco, recursive=True)  # capped at the 10 available
    assert len(everything.retain) == 10 and len(everything.forget) == 20


@pytest.mark.parametrize("ratio", [None, 0, 0.0])
def test_no_proxy_when_ratio_is_none_or_zero(tmp_path, tree, ratio):
    coco = tmp_path / "coco"
    write_image(str(coco / "a.jpg"), 1, "JPEG")
    subsets = select_unlearning_subsets(tree, FORGET, RETAIN, num_image_per_class=4,
                                        opendata_to_forget_ratio=ratio, proxy_root=coco)
    assert subsets.proxy == [] and len(subsets.forget) == len(subsets.retain) == 8


def test_reference_coco_root():
    assert reference_coco_root("../dataset/imagenet1k/train") == os.path.join("../dataset", "coco", "train2017")
    assert reference_coco_root("/d/imagenet1k/train/") == "/d/coco/train2017"


def test_image_extensions_case_insensitive_hidden_and_other_files_skipped(tmp_path):
    root = tmp_path / "d"
    names = ["a.JPEG", "b.jpg", "c.Png", "d.bmp", "e.webp", "f.JPG"]
    for i, name in enumerate(names):
        fmt = {"JPEG": "JPEG", "jpg": "JPEG", "JPG": "JPEG", "Png": "PNG", "bmp": "BMP", "webp": "WEBP"}
        write_image(str(root / "c1" / name), i, fmt[name.split(".")[1]])
    (root / "c1" / "readme.txt").write_text("x")
    (root / "c1" / "._a.JPEG").write_bytes(b"mac resource fork")
    os.makedirs(root / "c1" / "nested.jpg")  # a folder named like an image
    write_image(str(root / "c2" / "z.png"), 0, "PNG")
    assert [os.path.basename(p) for p in list_images(root / "c1")] == sorted(names)
    items = select_unlearning_files(root, ["c1"], ["c2"], num_image_per_class=10)
    assert {os.path.basename(p) for p, lab in items if lab == FORGET_LABEL} == set(names)


# ---------------------------------------------------------------- seeding

def test_same_seed_same_list_different_seed_different_list(tree):
    kw = dict(num_image_per_class=3, opendata_to_forget_ratio=1.0)
    a = select_unlearning_files(tree, FORGET, RETAIN, seed=0, **kw)
    b = select_unlearning_files(str(tree), list(FORGET), list(RETAIN), seed=0, **kw)
    c = select_unlearning_files(tree, FORGET, RETAIN, seed=1, **kw)
    assert a == b
    assert a != c and len(a) == len(c)
    # per-class choice depends on (seed, class) only, not on the rest of the call
    f1_a = [p for p, _ in a if class_of(p) == "f1"]
    f1_other = select_unlearning_subsets(tree, ["f1"], ["r1"], num_image_per_class=3, seed=0).forget
    assert set(f1_other) == set(f1_a)


def test_selection_is_a_shuffle_not_the_sorted_prefix(tree):
    seen = set()
    for seed in range(6):
        chosen = select_unlearning_subsets(tree, ["f1"], ["r1"], num_image_per_class=3, seed=seed).forget
        seen.add(tuple(sorted(chosen)))
    assert len(seen) > 1


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(forget_classes=[]), "forget set is empty"),
    (dict(forget_classes=["f1", "f1"]), "more than once"),
    (dict(forget_classes=["f1", "r1"]), "both in forget and retain"),
    (dict(forget_classes=["f1", "zz"]), "not found.*zz"),
    (dict(retain_classes=["r1", "missing"]), "not found.*missing"),
    (dict(num_image_per_class=0), "num_image_per_class"),
    (dict(num_image_per_class=2.5), "num_image_per_class"),
    (dict(retainset_ratio=-0.5), "retainset_ratio"),
    (dict(retainset_ratio=float("nan")), "retainset_ratio"),
    (dict(opendata_to_forget_ratio=-1.0), "opendata_to_forget_ratio"),
    (dict(retainset_ratio=0.0), "retain set is empty"),
    (dict(retain_classes=[]), "retain set is empty"),
])
def test_bad_arguments_raise_clear_errors(tree, kwargs, match):
    args = dict(root=tree, forget_classes=FORGET, retain_classes=RETAIN, num_image_per_class=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_unlearning_files(**args)


def test_class_names_as_a_string_is_a_type_error(tree):
    with pytest.raises(TypeError, match="parse_class_list"):
        select_unlearning_files(tree, "f1,f2", RETAIN)


def test_bad_paths_raise_clear_errors(tmp_path, tree):
    with pytest.raises(ValueError, match="data path is empty"):
        select_unlearning_files("", FORGET, RETAIN)
    with pytest.raises(ValueError, match="does not exist"):
        select_unlearning_files(tmp_path / "missing", FORGET, RETAIN)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        select_unlearning_files(tmp_path / "file.txt", FORGET, RETAIN)
    with pytest.raises(ValueError, match="proxy path .* does not exist"):
        select_unlearning_files(tree, FORGET, RETAIN, opendata_to_forget_ratio=1.0, proxy_root=tmp_path / "no")
    os.makedirs(tmp_path / "emptycoco")
    with pytest.raises(ValueError, match="proxy path .*emptycoco has no images"):
        select_unlearning_files(tree, FORGET, RETAIN, opendata_to_forget_ratio=1.0,
                                proxy_root=tmp_path / "emptycoco")


def test_empty_class_folder_is_named(tree):
    os.makedirs(tree / "f3")
    (tree / "f3" / "list.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"f3 has no images"):
        select_unlearning_files(tree, FORGET + ["f3"], RETAIN)


def test_folder_proxy_needs_other_classes(tmp_path):
    root = make_tree(tmp_path / "t", {"f1": 2, "r1": 2})
    os.makedirs(root / "empty_stray")
    with pytest.raises(ValueError, match="no other class folders"):
        select_unlearning_files(root, ["f1"], ["r1"], opendata_to_forget_ratio=1.0)


# ---------------------------------------------------------------- class lists and CSV

def test_parse_class_list(tmp_path):
    assert parse_class_list(" a, b,,c ") == ["a", "b", "c"]
    f = tmp_path / "classes.txt"
    f.write_text("# forget classes\nn01\n\nn02  # comment\n")
    assert parse_class_list(str(f)) == ["n01", "n02"]
    with pytest.raises(ValueError, match="no class names"):
        parse_class_list(" , ")


def test_csv_round_trip(tmp_path, tree):
    items = select_unlearning_files(tree, FORGET, RETAIN, num_image_per_class=3, opendata_to_forget_ratio=1.0)
    path = tmp_path / "list.csv"
    write_file_list_csv(path, items)
    lines = path.read_text().splitlines()
    assert lines[0] == "imgs,labels" and len(lines) == len(items) + 1
    assert lines[1].endswith(",-100.0") and lines[-1].endswith(",100.0")
    assert read_file_list_csv(path) == items


def test_read_reference_style_csvs(tmp_path):
    labelled = tmp_path / "dataset_class_img1k_coco_120_1.0_0.5.csv"
    labelled.write_text("imgs,labels\n../dataset/imagenet1k/train/n01443537/a.JPEG,-100.0\n"
                        "../dataset/imagenet1k/train/n02437616/b.JPEG,100.0\n")
    assert read_file_list_csv(labelled) == [("../dataset/imagenet1k/train/n01443537/a.JPEG", -100.0),
                                            ("../dataset/imagenet1k/train/n02437616/b.JPEG", 100.0)]
    no_header = tmp_path / "full_test.csv"
    no_header.write_text("val/n01443537/ILSVRC2012_val_00000001.JPEG\n"
                         "val/n12267677/ILSVRC2012_val_00000002.JPEG\n\n"
                         "val/n02423022/ILSVRC2012_val_00000003.JPEG\n")
    items = read_file_list_csv(no_header, root="/data/imagenet1k")
    assert items == [("/data/imagenet1k/val/n01443537/ILSVRC2012_val_00000001.JPEG", FORGET_LABEL),
                     ("/data/imagenet1k/val/n12267677/ILSVRC2012_val_00000002.JPEG", RETAIN_LABEL),
                     ("/data/imagenet1k/val/n02423022/ILSVRC2012_val_00000003.JPEG", FORGET_LABEL)]
    custom = read_file_list_csv(no_header, forget_classes=["n12267677"], retain_classes=["n01443537", "n02423022"])
    assert [lab for _, lab in custom] == [RETAIN_LABEL, FORGET_LABEL, RETAIN_LABEL]


@pytest.mark.parametrize("text,match", [
    ("imgs,labels\n", "no entries"),
    ("a.png,5.0\n", "must be -100.0"),
    ("a.png,forget\n", "not a number"),
    ("a.png,1,2\n", "3 fields"),
    ("val/n00000000/x.JPEG\n", "neither a forget nor a retain"),
])
def test_bad_csv_lines_are_named(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_file_list_csv(path)


def test_missing_csv(tmp_path):
    with pytest.raises(ValueError, match="file list not found"):
        read_file_list_csv(tmp_path / "none.csv")
