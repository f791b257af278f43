"""Places-365 protocol for Palette (REFERENCE.md §4.3) on a fake class-folder tree: class split by line,
per-class selection (sorted, then seeded shuffle), retain truncated to |forget|, the open/proxy variant, the
test set, and the dataset's tensors against a plain restatement of Resize -> ToTensor -> Normalize(0.5, 0.5)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.models.palette_masks import center_mask
from unlearn_fast.train.palette_data import (PaletteInpaintDataset, class_folder, places365_class_split,
                                            read_class_list, select_places365_test, select_places365_train)

N_CLASSES = 103  # 50 retain, 50 forget, 3 proxy
SHORT_FORGET = {50: 1, 51: 2}  # forget classes with fewer training images than asked for


def _class_names():
    # nested names like the reference's "/d/desert/sand"
    return [f"/{chr(97 + i % 26)}/c{i:03d}" + ("/sub" if i % 9 == 0 else "") for i in range(N_CLASSES)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("places")
    root = base / "places365"
    names = _class_names()
    (base / "class.txt").write_text("# reordered Places-365 classes\n" + "\n".join(names) + "\n\n")
    rng = np.random.default_rng(0)
    for split, per in (("train_256", 4), ("val_256", 3)):
        for i, c in enumerate(names):
            d = class_folder(str(root), split, c)
            os.makedirs(d)
            count = SHORT_FORGET.get(i, per) if split == "train_256" else per
            for k in reversed(range(count)):  # created in reverse: selection must not depend on creation order
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(os.path.join(d, f"im{k}.png"))
    return str(root), str(base / "class.txt"), names


def test_class_list_and_split(tree, tmp_path):
    _, path, names = tree
    assert read_class_list(path) == names
    split = places365_class_split(names)
    assert split.retain == names[:50] and split.forget == names[50:100] and split.proxy == names[100:]
    (tmp_path / "idx.txt").write_text("/a/x 0\n/b/y 1\n")
    assert read_class_list(str(tmp_path / "idx.txt")) == ["/a/x", "/b/y"]  # an index column is dropped
    with pytest.raises(ValueError, match="at least 100"):
        places365_class_split(names[:99])
    (tmp_path / "dup.txt").write_text("/a/x\n/a/x\n")
    with pytest.raises(ValueError, match="repeats class names: /a/x"):
        read_class_list(str(tmp_path / "dup.txt"))
    with pytest.raises(ValueError, match="class list not found"):
        read_class_list(str(tmp_path / "missing.txt"))


def test_class_list_with_a_byte_order_mark_or_not_utf8(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeff/a/airfield 0\n/b/bakery 1\n".encode("utf-8"))
    assert read_class_list(str(tmp_path / "bom.txt")) == ["/a/airfield", "/b/bakery"]  # not "\ufeff/a/airfield"
    (tmp_path / "latin1.txt").write_bytes("/c/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_class_list(str(tmp_path / "latin1.txt"))


def test_train_selection_reference_semantics(tree):
    root, _, names = tree
    items = select_places365_train(root, names, number_img_per_class=3, seed=0)
    labels = [lab for _, lab in items]
    n_forget = 48 * 3 + 1 + 2  # two forget classes are short
    assert labels.count(-1.0) == n_forget and labels.count(1.0) == n_forget  # retain truncated to |forget|
    assert labels == [1.0] * n_forget + [-1.0] * n_forget  # retain first, then forget
    paths = [p for p, _ in items]
    assert len(set(paths)) == len(paths)
    retain_dirs = {os.path.dirname(p) for p in paths[:n_forget]}
    forget_dirs = {os.path.dirname(p) for p in paths[n_forget:]}
    assert retain_dirs <= {class_folder(root, "train_256", c) for c in names[:50]}
    assert forget_dirs == {class_folder(root, "train_256", c) for c in names[50:100]}
    # retain keeps the class order: the first 49 classes' 3 images each, then one of class 49
    assert [os.path.dirname(p) for p in paths[:3]] == [class_folder(root, "train_256", names[0])] * 3
    # per class: a seeded shuffle of the sorted files, the same on every call, another with another seed
    assert select_places365_train(root, names, 3, seed=0) == items
    other = select_places365_train(root, names, 3, seed=1)
    assert sorted(other) != sorted(items) and len(other) == len(items)


def test_selection_is_a_seeded_shuffle_of_the_sorted_files(tree):
    root, _, names = tree
    import random

    from unlearn_fast.train.seeding import derive_seed
    items = select_places365_train(root, names, 2, seed=7)
    folder = class_folder(root, "train_256", names[60])
    expected = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    random.Random(derive_seed(7, "places365", names[60])).shuffle(expected)
    assert [p for p, _ in items if os.path.dirname(p) == folder] == expected[:2]


def test_open_proxy_variant(tree):
    root, _, names = tree
    items = select_places365_train(root, names, number_img_per_class=2, seed=0, open_proxy=True)
    labels = [lab for _, lab in items]
    assert labels.count(1.0) == 3 * 2  # proxy classes (lines 100..), not truncated
    assert labels.count(-1.0) == 48 * 2 + 1 + 2
    proxy_dirs = {class_folder(root, "train_256", c) for c in names[100:]}
    assert {os.path.dirname(p) for p, lab in items if lab > 0} == proxy_dirs
    with pytest.raises(ValueError, match="beyond line 100"):
        select_places365_train(root, names[:100], 2, open_proxy=True)


def test_test_selection(tree):
    root, _, names = tree
    items = select_places365_test(root, names, number_img_per_class=2)
    assert [lab for _, lab in items] == [-1.0] * 100 + [1.0] * 100  # forget first, as the reference
    folder = class_folder(root, "val_256", names[50])
    assert [p for p, _ in items[:2]] == [os.path.join(folder, "im0.png"), os.path.join(folder, "im1.png")]


def test_missing_data_gives_one_clear_error(tree, tmp_path):
    root, _, names = tree
    with pytest.raises(ValueError, match="does not exist"):
        select_places365_train(str(tmp_path / "nope"), names)
    with pytest.raises(ValueError, match="no train_256/ folder"):
        select_places365_train(str(tmp_path), names)
    with pytest.raises(ValueError, match=r"1 class folder\(s\) missing .*zz/none"):
        select_places365_train(root, names[:60] + ["/zz/none"] + names[61:], 2)
    with pytest.raises(ValueError, match="number_img_per_class must be >= 1"):
        select_places365_train(root, names, 0)


def _plain_image(path, size):
    img = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def test_dataset_sample_matches_plain_restatement(tree):
    root, _, names = tree
    items = select_places365_train(root, names, 2, seed=0)
    ds = PaletteInpaintDataset(items, image_size=(16, 24), seed=3)
    ds.set_epoch(1)
    sample, label = ds[5]
    assert set(sample) == {"gt_image", "cond_image", "mask_image", "mask", "path"}
    assert label == items[5][1] and sample["path"] == os.path.basename(items[5][0])
    gt, mask, cond = sample["gt_image"], sample["mask"], sample["cond_image"]
    assert gt.shape == (3, 16, 24) and mask.shape == (1, 16, 24) and gt.dtype == torch.float32
    torch.testing.assert_close(gt, _plain_image(items[5][0], (16, 24)), rtol=0, atol=1.5 / 127.5)  # PIL vs tv resize
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.sum() < mask.numel()
    keep = mask.expand_as(gt) == 0
    assert torch.equal(cond[keep], gt[keep])  # y_cond = gt outside the hole
    hole = cond[~keep]
    assert hole.std() > 0.5 and not torch.equal(hole, gt[~keep])  # N(0, 1) inside
    torch.testing.assert_close(sample["mask_image"], gt * (1 - mask) + mask)
    # seeded per (seed, epoch, index): same again, another mask next epoch / for another seed
    again, _ = ds[5]
    assert all(torch.equal(again[k], sample[k]) for k in ("mask", "cond_image"))
    ds.set_epoch(2)
    assert not torch.equal(ds[5][0]["mask"], mask)
    other_seed = PaletteInpaintDataset(items, (16, 24), seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[5][0]["mask"], ds[5][0]["mask"])


def test_dataset_center_mask_and_collate(tree):
    root, _, names = tree
    items = select_places365_test(root, names, 1)[:5]  # batch of 5 (odd)
    ds = PaletteInpaintDataset(items, image_size=(32, 32), seed=0, mask_mode="center", mask_ratio=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    sample, labels = next(iter(loader))
    assert sample["gt_image"].shape == (5, 3, 32, 32) and len(sample["path"]) == 5
    assert torch.equal(sample["mask"], center_mask((32, 32), 0.5).expand(5, 1, 32, 32))
    assert sample["mask"][0, 0, 8:24, 8:24].all() and sample["mask"].sum() == 5 * 16 * 16
    assert labels.tolist() == [-1.0] * 5
    with pytest.raises(ValueError, match="mask_mode"):
        PaletteInpaintDataset(items, 32, mask_mode="bbox")
    with pytest.raises(ValueError, match="at least one image"):
        PaletteInpaintDataset([], 32)
