"""Data protocol against plain restatements of the official code (REFERENCE.md §4.1–§4.3).

The official subset code (`util/datasets.py`, Palette's `data/dataset.py`, `data/util/mask.py`) is restated
below with a seeded `random.Random` in place of its unseeded global `random` (§11: subsets are seeded) and
sorted globs in place of file-system order. Counts, per-class counts, orders and labels must then agree
exactly; only which files a shuffle picks may differ. Also: the bundled ImageNet-R wnid list reproduces the
official `img_r_folder_dict.yaml` byte for byte (md5), and odd inputs give one clear error.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unlearn_fast.models.palette_masks import (brush_stroke_mask, center_mask, hybrid_mask, random_bbox)
from unlearn_fast.train.data_split import (FORGET_LABEL, RETAIN_LABEL, default_class_split, imagenet_r_wnids,
                                           read_file_list_csv, reference_coco_root, select_unlearning_subsets)
from unlearn_fast.train.image_datasets import SeededTrainTransform, UnlearnImageDataset
from unlearn_fast.train.palette_data import class_folder, select_places365_test, select_places365_train

# ---------------------------------------------------------------- the 200 ImageNet-R wnids


def test_wnid_list_reproduces_the_official_yaml_exactly():
    wnids = imagenet_r_wnids()
    assert len(wnids) == 200 == len(set(wnids)) and wnids == sorted(wnids)
    assert (wnids[0], wnids[99], wnids[100], wnids[199]) == ("n01443537", "n02423022", "n02437616", "n12267677")
    # datacsv/img_r_folder_dict.yaml is json.dump({wnid: id}, indent=4) with no trailing newline (md5 4ab2a4b8...)
    text = json.dumps({w: i for i, w in enumerate(wnids)}, indent=4)
    assert hashlib.md5(text.encode()).hexdigest() == "4ab2a4b82cb5325689662cd1644c00b5"


# ---------------------------------------------------------------- ImageNet-1K subsets (MAGE)

def official_img1k_subsets(data_path, n, retain_ratio, open_ratio, use_coco, rng):
    """`dataset_class_img1k_only` / `dataset_class_img1k_coco`, restated (seeded rng, sorted globs)."""
    class_id = {w: i for i, w in enumerate(imagenet_r_wnids())}
    open_ratio = 0.0 if open_ratio is None else open_ratio
    if use_coco:
        n_support = math.ceil(open_ratio * 100 * n)
    else:
        n_support = math.ceil(open_ratio * 100 * n / 800.0)
    n_retain = int(math.ceil(n * retain_ratio))
    forget, retain, support = [], [], []
    for folder_name in sorted(glob.glob(os.path.join(data_path, "n*/"))):
        folder = folder_name.split("/")[-2]
        imgs = sorted(glob.glob(os.path.join(folder_name, "*.JPEG")))
        rng.shuffle(imgs)
        if folder in class_id:
            if class_id[folder] < 100:
                forget += imgs[:min(n, len(imgs))]
            else:
                retain += imgs[:min(n_retain, len(imgs))]
        elif not use_coco:
            support += imgs[:min(n_support, len(imgs))]
    if use_coco:
        path = data_path[:-1] if data_path[-1] == "/" else data_path
        support = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(path)), "coco/train2017/*.jpg")))
        rng.shuffle(support)
        support = support[:min(n_support, len(support))]
    target_r = max(len(support), len(forget))
    if retain:
        retain = retain * math.ceil(target_r / len(retain))
    retain = retain[:target_r]
    target_f = max(len(support) + len(retain), 100 * n)
    if forget:
        forget = forget * math.ceil(target_f / len(forget))
    rng.shuffle(forget)
    return forget[:target_f], retain, support


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A fake ImageNet: the 200 ImageNet-R wnids and 800 other 'n' folders, 2-7 empty .JPEG files each (the
    selection never opens a file), plus ../../coco/train2017 with 700 .jpg files."""
    base = tmp_path_factory.mktemp("dataset")
    train = base / "imagenet1k" / "train"
    rng = random.Random(7)
    for wnid in imagenet_r_wnids() + [f"n9{i:07d}" for i in range(800)]:
        os.makedirs(train / wnid)
        for k in range(rng.randint(2, 7)):
            open(train / wnid / f"{wnid}_{k}.JPEG", "wb").close()
    coco = base / "coco" / "train2017"
    os.makedirs(coco)
    for k in range(700):
        open(coco / f"{k:012d}.jpg", "wb").close()
    return str(train)


def _cls(path):
    return os.path.basename(os.path.dirname(path))


# (num_image_per_class, retainset_ratio, opendata_to_forget_ratio, use_coco): the README modes and odd ratios
MODES = [(4, 1.0, None, False),   # real retain only (the default run, scaled down)
         (3, 0.1, 0.0, False),    # ceil(3 * 0.1) = 1 retain image per class
         (5, 1.7, None, False),   # retain capped by what a class holds
         (6, 0.0, 1.0, False),    # the 800 other classes only
         (6, 0.5, 2.5, False),    # 800 + real
         (2, 0.0, 0.5, True),     # COCO only
         (5, 1.0, 1.0, True),     # COCO + real
         (1, 1.0, 0.3, False)]    # ceil(0.3 * 100 / 800) = 1 per proxy class


@pytest.mark.parametrize("n,retain_ratio,open_ratio,use_coco", MODES)
def test_imagenet_subsets_match_the_official_formulas(imagenet, n, retain_ratio, open_ratio, use_coco):
    forget_classes, retain_classes = default_class_split(imagenet)
    ref_f, ref_r, ref_s = official_img1k_subsets(imagenet + "/", n, retain_ratio, open_ratio, use_coco,
                                                 random.Random(0))
    proxy_root = reference_coco_root(imagenet + "/") if use_coco else None
    sub = select_unlearning_subsets(imagenet, forget_classes, retain_classes, n, retain_ratio, open_ratio,
                                    proxy_root, seed=0)
    assert (len(sub.forget), len(sub.retain), len(sub.proxy)) == (len(ref_f), len(ref_r), len(ref_s))
    # retain is repeated in order and cut: the per-class counts are determined, not random
    assert Counter(map(_cls, sub.retain)) == Counter(map(_cls, ref_r))
    if use_coco:
        assert all(p.endswith(".jpg") and _cls(p) == "train2017" for p in sub.proxy)
        assert len(set(sub.proxy)) == len(sub.proxy)
    else:
        assert Counter(map(_cls, sub.proxy)) == Counter(map(_cls, ref_s))
    # forget: only forget classes, at most min(n, |class|) distinct files per class, each repeated at most
    # ceil(target / |distinct forget files|) times (repeat, shuffle, truncate)
    assert set(map(_cls, sub.forget)) <= set(forget_classes[:100])
    distinct = set(sub.forget)
    per_class = Counter(map(_cls, distinct))
    assert all(per_class[c] <= min(n, len(os.listdir(os.path.join(imagenet, c)))) for c in per_class)
    n_raw = sum(min(n, len(os.listdir(os.path.join(imagenet, c)))) for c in forget_classes)
    assert max(Counter(sub.forget).values()) <= math.ceil(len(ref_f) / n_raw)
    items = sub.items()
    assert [lab for _, lab in items] == ([FORGET_LABEL] * len(ref_f) + [RETAIN_LABEL] * (len(ref_r) + len(ref_s)))


def test_retain_count_keeps_the_official_float_rounding(tmp_path):
    # int(ceil(100 * 0.07)) = 8, not 7, because 100 * 0.07 == 7.000000000000001 in floating point
    for cls, count in (("f0", 20), ("r0", 20)):
        os.makedirs(tmp_path / cls)
        for k in range(count):
            open(tmp_path / cls / f"{k}.JPEG", "wb").close()
    sub = select_unlearning_subsets(str(tmp_path), ["f0"], ["r0"], 100, 0.07)
    assert len(set(sub.retain)) == int(math.ceil(100 * 0.07)) == 8
    assert len(sub.retain) == 20 and len(sub.forget) == 100  # target_R = max(0, |F raw| = 20); target_F = 1 * 100


def _small_tree(root, counts):
    for cls, count in counts.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for k in range(count):
            Image.new("RGB", (6, 5), (k, 0, 0)).save(os.path.join(root, cls, f"{cls}_{k}.png"))
    return str(root)


@pytest.mark.parametrize("kwargs", [dict(retainset_ratio=1e308), dict(opendata_to_forget_ratio=1e308),
                                    dict(opendata_to_forget_ratio=1e308, proxy="coco")])
def test_huge_finite_ratios_take_every_file_instead_of_overflowing(tmp_path, kwargs):
    # n * ratio overflows to inf: it must mean "every file", exactly as a large finite ratio does
    root = _small_tree(tmp_path / "train", {"f": 4, "r": 4, "p": 5})
    coco = _small_tree(tmp_path / "coco", {"train2017": 3})
    proxy_root = os.path.join(coco, "train2017") if kwargs.pop("proxy", None) else None
    huge = select_unlearning_subsets(root, ["f"], ["r"], 2, proxy_root=proxy_root, **kwargs)
    large = select_unlearning_subsets(root, ["f"], ["r"], 2, proxy_root=proxy_root,
                                      **{k: 1e6 for k in kwargs})
    assert huge == large
    assert len(set(huge.proxy)) == (0 if "retainset_ratio" in kwargs else 3 if proxy_root else 5)


def test_proxy_folder_holding_forget_images_is_refused(tmp_path):
    # pointing the proxy at the training tree itself would label forget images as retain (+100)
    root = _small_tree(tmp_path / "train", {"f": 3, "r": 3})
    with pytest.raises(ValueError, match="forget"):
        select_unlearning_subsets(root, ["f"], ["r"], 3, 1.0, 10.0, proxy_root=root)


# ---------------------------------------------------------------- file lists (datacsv)

def test_full_test_csv_layout_gives_5000_forget_then_5000_retain(tmp_path):
    wnids = imagenet_r_wnids()
    lines = [f"val/{w}/ILSVRC2012_val_{i * 50 + k:08d}.JPEG" for i, w in enumerate(wnids) for k in range(50)]
    (tmp_path / "full_test.csv").write_text("\n".join(lines) + "\n")
    items = read_file_list_csv(tmp_path / "full_test.csv", root="../dataset/imagenet1k/")
    assert len(items) == 10_000
    assert [lab for _, lab in items] == [FORGET_LABEL] * 5000 + [RETAIN_LABEL] * 5000
    assert items[0][0] == os.path.join("../dataset/imagenet1k/", lines[0])


@pytest.mark.parametrize("text", ["\ufeffimgs,labels\na/n01443537/x.JPEG,-100.0\n",   # UTF-8 byte-order mark
                                  "\n\nimgs,labels\na/n01443537/x.JPEG,-100.0\n",     # blank lines first
                                  "imgs,labels\r\na/n01443537/x.JPEG,-100.0\r\n"])    # CRLF
def test_csv_header_is_recognised_with_bom_or_leading_blank_lines(tmp_path, text):
    (tmp_path / "list.csv").write_text(text, encoding="utf-8", newline="")
    assert read_file_list_csv(tmp_path / "list.csv") == [("a/n01443537/x.JPEG", FORGET_LABEL)]


# ---------------------------------------------------------------- image dataset / transform inputs

def test_dataset_names_a_malformed_item(tmp_path):
    path = str(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(path)
    for items, match in (([path], "item 0"), ([(path, -100.0), (path,)], "item 1"),
                         ([(path, "x")], "label"), ([(path, None)], "label"), ([(path, float("nan"))], "label")):
        with pytest.raises(ValueError, match=match):
            UnlearnImageDataset(items)
    assert UnlearnImageDataset([(path, "100.0")]).items == [(path, 100.0)]  # a numeric string is a number


def test_transform_size_and_scale_arguments():
    assert SeededTrainTransform(np.int64(24)).input_size == 24
    for bad in (True, 0, 2.5, "256"):
        with pytest.raises(ValueError, match="input_size"):
            SeededTrainTransform(bad)
    for bad in ((0.2,), "ab", None, (0.2, "x")):
        with pytest.raises(ValueError, match="scale"):
            SeededTrainTransform(16, scale=bad)


# ---------------------------------------------------------------- Places-365 (Palette)

def _places_names(count=104):
    return [f"/{chr(97 + i % 26)}/c{i:03d}" + ("/sub" if i % 7 == 0 else "") for i in range(count)]


def official_places(root, names, split, lines, n):
    out = []
    for name in names[slice(*lines)]:
        out += sorted(glob.glob(os.path.join(root, split, name[1:], "*.jpg")))[:n]
    return out


@pytest.mark.parametrize("n", [1, 3, 5000])
def test_places_selection_matches_the_official_datasets(tmp_path, n):
    names = _places_names()
    rng = random.Random(3)
    for split in ("train_256", "val_256"):
        for name in names:
            folder = class_folder(str(tmp_path), split, name)
            os.makedirs(folder)
            for k in range(rng.randint(1, 4)):
                open(os.path.join(folder, f"{k:08d}.jpg"), "wb").close()
    root, folder_of = str(tmp_path), os.path.dirname
    # ForgetInpaintDataset: retain (lines 0-49) cut to |forget| (+1), then forget (lines 50-99) (-1)
    forget = official_places(root, names, "train_256", (50, 100), n)
    retain = official_places(root, names, "train_256", (0, 50), n)[:len(forget)]
    ours = select_places365_train(root, names, n, seed=0)
    assert [(folder_of(p), lab) for p, lab in ours] == \
        [(folder_of(p), 1.0) for p in retain] + [(folder_of(p), -1.0) for p in forget]
    # OpenForgetInpaintDataset: retain = lines 100-end, not cut
    retain = official_places(root, names, "train_256", (100, None), n)
    ours = select_places365_train(root, names, n, seed=0, open_proxy=True)
    assert [(folder_of(p), lab) for p, lab in ours] == \
        [(folder_of(p), 1.0) for p in retain] + [(folder_of(p), -1.0) for p in forget]
    # TestForgetInpaintDataset: forget (-1) then retain (+1), the first n of each class
    forget = official_places(root, names, "val_256", (50, 100), n)
    retain = official_places(root, names, "val_256", (0, 50), n)
    assert select_places365_test(root, names, n) == [(p, -1.0) for p in forget] + [(p, 1.0) for p in retain]


# ---------------------------------------------------------------- Palette masks

def official_random_bbox(r):
    """mask.random_bbox() with its defaults (256², box 128, delta 40, margin 20); r = np.random.RandomState."""
    top, left = r.randint(20, 256 - 20 - 128), r.randint(20, 256 - 20 - 128)
    d_top, d_left = r.randint(0, 40 // 2 + 1), r.randint(0, 40 // 2 + 1)
    return top + d_top, left + d_left, 128 - d_top, 128 - d_left


def official_hybrid_256(r):
    """bbox2mask(random_bbox()) | brush_stroke_mask((256, 256)), restated (uint8 [256, 256])."""
    box = np.zeros((256, 256), np.uint8)
    t, l, h, w = official_random_bbox(r)
    box[t:t + h, l:l + w] = 1
    radius = math.sqrt(2 * 256 * 256) / 8
    mask = Image.new("L", (256, 256), 0)
    loops = r.randint(1, 4)
    n_vertex = r.randint(4, 12, size=loops)
    a_min, a_max = r.uniform(0, 2 * math.pi / 15, size=loops), r.uniform(0, 2 * math.pi / 15, size=loops)
    for i in range(loops):
        k = n_vertex[i]
        angles = r.uniform(2 * math.pi / 5 - a_min[i], 2 * math.pi / 5 + a_max[i], size=k)
        even = np.arange(k) % 2 == 0
        angles[even] = 2 * math.pi - angles[even]
        vertex = [(r.randint(0, 256), r.randint(0, 256))]
        radii = r.normal(loc=radius, scale=radius // 2, size=k)
        for j in range(k):
            rad = np.clip(radii[j], 0, 2 * radius)
            vertex.append((int(np.clip(vertex[-1][0] + rad * math.cos(angles[j]), 0, 256)),
                           int(np.clip(vertex[-1][1] + rad * math.sin(angles[j]), 0, 256))))
        draw = ImageDraw.Draw(mask)
        width = r.randint(12, 40)
        draw.line(vertex, fill=1, width=width)
        for x, y in vertex:
            draw.ellipse((x - width // 2, y - width // 2, x + width // 2, y + width // 2), fill=1)
    r.normal(), r.normal()  # the official flips draw, but their result is discarded
    return box | np.asarray(mask, np.uint8)


def test_hybrid_mask_distribution_matches_the_official_one_at_256():
    n = 200
    r = np.random.RandomState(0)
    ref = np.array([official_hybrid_256(r).mean() for _ in range(n)])
    rng = np.random.default_rng(0)
    ours = np.array([hybrid_mask(rng, (256, 256)).mean().item() for _ in range(n)])
    # hole fraction ~0.33 +- 0.064: the means agree within 5 standard errors of their difference
    se = math.sqrt(ref.var() / n + ours.var() / n)
    assert abs(ref.mean() - ours.mean()) < 5 * se, (ref.mean(), ours.mean(), se)
    assert abs(ref.std() - ours.std()) < 0.02
    # the box alone: top = top0 + d with top0 in [20, 108), d in [0, 20], side = 128 - d (bottom/right edge fixed)
    boxes = np.array([random_bbox(rng) for _ in range(2000)])            # [2000, 4] (top, left, h, w)
    ref_boxes = np.array([official_random_bbox(r) for _ in range(2000)])
    for b in (boxes, ref_boxes):
        d = 128 - b[:, 2:]
        assert (d >= 0).all() and (d <= 20).all()
        assert (b[:, :2] - d >= 20).all() and (b[:, :2] - d < 108).all()
    se = np.sqrt(boxes.var(0) / 2000 + ref_boxes.var(0) / 2000)
    assert (np.abs(boxes.mean(0) - ref_boxes.mean(0)) < 5 * se).all(), (boxes.mean(0), ref_boxes.mean(0))


def test_mask_arguments_accept_what_the_official_functions_accept():
    rng = np.random.default_rng(1)
    # ints for the box shape / delta / margin mean a square (mask.random_bbox)
    t, l, h, w = random_bbox(rng, (64, 64), max_bbox_shape=32, max_bbox_delta=8, min_margin=4)
    assert 28 <= h <= 32 and 28 <= w <= 32 and t >= 4 and l >= 4
    # an int vertex count / brush width is fixed (mask.brush_stroke_mask)
    stroke = brush_stroke_mask(rng, (64, 64), num_vertices=5, brush_width=6)
    assert stroke.shape == (64, 64) and stroke.any()
    # numpy integers as sizes and seeds
    assert tuple(hybrid_mask(np.int64(3), np.int64(40)).shape) == (1, 40, 40)
    assert torch.equal(hybrid_mask(np.int64(3), (40, 40)), hybrid_mask(3, (40, 40)))


@pytest.mark.parametrize("size", [256.0, (256,), "256", (256, "a"), None])
def test_bad_mask_sizes_are_named(size):
    with pytest.raises((ValueError, TypeError), match="image size"):
        hybrid_mask(0, size)


def test_bad_center_mask_ratio_is_named():
    with pytest.raises((ValueError, TypeError), match="mask_ratio"):
        center_mask((256, 256), "0.5")
