"""Generated-folder layout (§5.1, §5.5): prefixes, mode lists, and pairing by file name."""
import os

import pytest

from unlearn_fast.eval import layout


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    return str(path)


def test_prefixes_and_mode_lists_match_the_reference():
    assert [layout.generated_prefix(m, k) for m, k in layout.eval_modes("inpaint")] == ["center_0.25_", "center_0.5_"]
    outpaint = [layout.generated_prefix(m, k) for m, k in layout.eval_modes("outpaint")]
    assert len(outpaint) == 13
    assert outpaint[0] == "outpaint_0.0625_" and outpaint[3] == "outpaint_0.25_" and outpaint[-1] == "outpaint_0.8125_"
    assert outpaint == [f"outpaint_{k / 16.0}_" for k in range(1, 14)]  # str(k/16.0) as the reference
    assert layout.clip_modes("outpaint") == [("outpaint", 4), ("outpaint", 8)]
    assert layout.clip_modes("inpaint") == [("center", 4), ("center", 8)]
    with pytest.raises(ValueError, match="task"):
        layout.eval_modes("deblur")


def test_generated_path_and_original_name():
    p = layout.generated_path("/o/ck-inpaint", "forget", "n01443537", "center", 8, "ILSVRC2012_val_00000236.JPEG")
    assert p == "/o/ck-inpaint/forget/n01443537/center_0.5_ILSVRC2012_val_00000236.JPEG"
    assert layout.original_name(p, "center_0.5_") == "ILSVRC2012_val_00000236.JPEG"
    with pytest.raises(ValueError, match="prefix"):
        layout.original_name(p, "center_0.25_")
    with pytest.raises(ValueError, match="split"):
        layout.generated_path("/o", "test", "n0", "center", 4, "a.JPEG")


def test_mage_pairs_by_name_not_by_listing_order(tmp_path):
    dst, root = tmp_path / "ck-inpaint", tmp_path / "val"
    names = {"n02": ["ILSVRC2012_val_00000009.JPEG", "ILSVRC2012_val_00000002.JPEG"],
             "n01": ["ILSVRC2012_val_00000005.JPEG"]}
    for wnid, files in names.items():
        for name in files:
            touch(root / wnid / name)
            for prefix in ("center_0.25_", "center_0.5_"):
                touch(dst / "retain" / wnid / (prefix + name))
    touch(dst / "retain" / "n01" / "center_0.25_notes.txt")  # not an ILSVRC2012_*.JPEG name
    touch(dst / "retain" / "stray_file.JPEG")  # not in a class folder
    pairs = layout.collect_mage_pairs(str(dst), "retain", "center_0.25_", str(root))
    assert [(p.folder, p.name) for p in pairs] == [
        ("n01", "ILSVRC2012_val_00000005.JPEG"), ("n02", "ILSVRC2012_val_00000002.JPEG"),
        ("n02", "ILSVRC2012_val_00000009.JPEG")]
    for p in pairs:
        assert os.path.basename(p.generated) == "center_0.25_" + p.name
        assert p.original == os.path.join(str(root), p.folder, p.name)
    assert len(layout.collect_mage_pairs(str(dst), "retain", "center_0.5_", str(root))) == 3


def test_missing_originals_and_folders_are_errors(tmp_path):
    dst, root = tmp_path / "ck", tmp_path / "val"
    touch(dst / "forget" / "n01" / "center_0.25_ILSVRC2012_val_00000001.JPEG")
    os.makedirs(root)
    with pytest.raises(FileNotFoundError, match="1 of 1 forget center_0.25_ originals are missing"):
        layout.collect_mage_pairs(str(dst), "forget", "center_0.25_", str(root))
    assert len(layout.collect_mage_pairs(str(dst), "forget", "center_0.25_", str(root), check_originals=False)) == 1
    with pytest.raises(FileNotFoundError, match="no generated retain folder"):
        layout.collect_mage_pairs(str(dst), "retain", "center_0.25_", str(root))


CLASSES = [f"/{chr(97 + i % 26)}/class_{i:03d}" for i in range(100)] + ["/z/extra"]


def test_palette_split_and_out_gt_pairs(tmp_path):
    split = layout.palette_split_classes(CLASSES)
    assert split["retain"] == CLASSES[:50] and split["forget"] == CLASSES[50:100]
    with pytest.raises(ValueError, match="at least 100"):
        layout.palette_split_classes(CLASSES[:99])
    results = tmp_path / "run" / "results" / "test" / "0" / "0.50"
    assert layout.palette_results_dir(str(tmp_path / "run")) == str(results)
    tag = CLASSES[0].replace("/", "_")  # "_a_class_000"
    for i in (7, 3):
        touch(results / f"Out{tag}_Places365_val_{i:08d}.jpg")
        touch(results / f"GT{tag}_Places365_val_{i:08d}.jpg")
    # A class whose name extends another's must not be picked up by the shorter one's pattern.
    touch(results / f"Out{tag}x_Places365_val_00000001.jpg")
    pairs = layout.collect_palette_pairs(str(tmp_path / "run"), split["retain"][:1])
    assert [p.name for p in pairs] == [f"{tag[1:]}_Places365_val_00000003.jpg", f"{tag[1:]}_Places365_val_00000007.jpg"]
    assert all(os.path.basename(p.original) == "GT_" + p.name for p in pairs)
    clip_pairs = layout.collect_palette_pairs(str(tmp_path / "run"), split["retain"][:1],
                                              original_root="/data/val_256", check_originals=False)
    assert clip_pairs[0].original == f"/data/val_256/a/class_000/{tag[1:]}_Places365_val_00000003.jpg"


def test_read_class_list(tmp_path):
    path = tmp_path / "class.txt"
    path.write_text("/a/airfield\n\n/b/bar\n")
    assert layout.read_class_list(str(path)) == ["/a/airfield", "/b/bar"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        layout.read_class_list(str(tmp_path / "empty.txt"))
