"""Red-team findings on the data protocol (REFERENCE.md §4.1-§4.2): odd image files, odd file names, class
lists, held-out files reached through symlinks, transform arguments. Each test failed before its fix."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_cli_fails_cleanly, make_class_tree
from unlearn_fast.train import image_datasets
from unlearn_fast.train.data_split import parse_class_list, read_file_list_csv, write_file_list_csv
from unlearn_fast.train.holdout_split import select_holdout_files
from unlearn_fast.train.image_datasets import SeededTrainTransform, item_generator, load_rgb_image


def write_png16(path, values: np.ndarray) -> str:
    """A 16-bit PNG of ``values`` (uint16 [H, W, C], C = 1 grey, 2 grey+alpha, 3 RGB), written by hand: PIL
    cannot write 16-bit grey or RGB PNGs."""
    h, w, c = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture
def grey16():
    """uint16 [7, 5] with the extremes and the edges of the high byte."""
    v = np.random.default_rng(0).integers(0, 65536, (7, 5), dtype=np.uint16)
    v.flat[:6] = [0, 65535, 255, 256, 32767, 32768]
    return v


def _expected_8bit(v: np.ndarray) -> np.ndarray:
    return (v // 256).astype(np.uint8)  # the high byte: what PIL keeps of 16-bit RGB PNGs


def test_sixteen_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path, grey16):
    """PIL's convert('RGB') clips 16-bit grey at 255 (an all-white image); it must keep the high byte."""
    got = np.asarray(load_rgb_image(write_png16(tmp_path / "g.png", grey16[..., None])))  # [7, 5, 3]
    assert got.shape == (7, 5, 3)
    for ch in range(3):
        np.testing.assert_array_equal(got[..., ch], _expected_8bit(grey16))
    # the same reduction PIL applies to the 16-bit PNGs it does reduce (RGB, grey + alpha)
    rgb = np.asarray(load_rgb_image(write_png16(tmp_path / "rgb.png", np.repeat(grey16[..., None], 3, -1))))
    np.testing.assert_array_equal(got, rgb)
    ga = np.stack([grey16, np.full_like(grey16, 65535)], -1)
    np.testing.assert_array_equal(got, np.asarray(load_rgb_image(write_png16(tmp_path / "ga.png", ga))))


def test_sixteen_bit_grey_png_opened_as_mode_I_by_older_pillow(tmp_path, grey16, monkeypatch):
    """Older Pillow opens 16-bit grey PNGs as mode "I" (32-bit); the same scaling applies."""
    path = write_png16(tmp_path / "g.png", grey16[..., None])
    real_open = Image.open

    def open_as_mode_i(p, *a, **k):
        with real_open(p, *a, **k) as im:
            out = im.convert("I")
        out.format = "PNG"
        return out

    monkeypatch.setattr(image_datasets.Image, "open", open_as_mode_i)
    got = np.asarray(load_rgb_image(path))
    np.testing.assert_array_equal(got[..., 1], _expected_8bit(grey16))


def _odd_files(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    files = {}
    files["cmyk.jpg"] = lambda p: im.convert("CMYK").save(p)
    files["palette_transparent.png"] = lambda p: im.convert("P", palette=Image.ADAPTIVE, colors=7).save(
        p, transparency=0)
    files["la.png"] = lambda p: im.convert("LA").save(p)
    files["rgba.png"] = lambda p: im.convert("RGBA").save(p)
    files["bilevel.png"] = lambda p: im.convert("1").save(p)
    files["one_pixel.png"] = lambda p: Image.fromarray(rgb[:1, :1]).save(p)
    files["webp.webp"] = lambda p: im.save(p, lossless=True)

    def exif_rotated(p):
        exif = im.getexif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        im.save(p, exif=exif)
    files["exif_rotated.jpg"] = exif_rotated
    paths = []
    for name, save in files.items():
        save(str(tmp_path / name))
        paths.append(str(tmp_path / name))
    return paths


def test_odd_but_valid_files_decode_as_the_reference_loader(tmp_path):
    """The reference loads with PIL's convert('RGB'): CMYK converted, alpha and palette transparency dropped,
    EXIF orientation not applied. Every such file also goes through the training transform."""
    tf = SeededTrainTransform(24)
    for path in _odd_files(tmp_path):
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))
        got = load_rgb_image(path)
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=path)
        x = tf(got, item_generator(0, 0, 3))
        assert x.shape == (3, 24, 24) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert load_rgb_image(str(tmp_path / "exif_rotated.jpg")).size == (13, 9)  # as stored, not rotated


def test_file_list_csv_round_trips_names_that_are_not_utf8(tmp_path):
    """Linux file names are bytes; os.listdir gives the undecodable ones as surrogates (PEP 383)."""
    undecodable = os.fsdecode(b"/data/n01443537/x\xff\xfe.JPEG")
    items = [(undecodable, -100.0), ("/data/n02437616/日本 ,\"q\".JPEG", 100.0), ("rel/a.png", 100.0)]
    path = tmp_path / "list.csv"
    write_file_list_csv(path, items)
    assert read_file_list_csv(path) == items
    assert b"x\xff\xfe.JPEG" in path.read_bytes()  # the file's own bytes, not a replacement character


def test_class_list_file_with_byte_order_mark_or_bad_encoding(tmp_path):
    bom = tmp_path / "classes.txt"
    bom.write_text("n01443537\n# comment\nn02423022  # trailing\n", encoding="utf-8-sig")  # Windows Notepad
    assert parse_class_list(str(bom)) == ["n01443537", "n02423022"]
    binary = tmp_path / "classes.bin"
    binary.write_bytes(b"\xff\xfe\x00n\x00\x01")
    with pytest.raises(ValueError, match="classes.bin is not UTF-8"):
        parse_class_list(str(binary))


def _tree(tmp_path, per_class=4):
    rng = np.random.default_rng(2)
    for cls in ("f", "r"):
        os.makedirs(tmp_path / cls)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / cls / f"{k}.png")
    return str(tmp_path)


def test_holdout_never_offers_a_symlink_to_a_training_file(tmp_path):
    root = _tree(tmp_path)
    trained = [os.path.join(root, "f", "0.png"), os.path.join(root, "f", "1.png")]
    os.symlink(os.path.join(root, "f", "0.png"), os.path.join(root, "f", "z_link_to_trained.png"))
    os.symlink(os.path.join(root, "f", "3.png"), os.path.join(root, "f", "z_link_to_unseen.png"))
    held = select_holdout_files(root, ["f"], ["r"], exclude=trained, per_set=10, seed=0)
    real = [os.path.realpath(p) for p in held.forget]
    assert not set(real) & {os.path.realpath(p) for p in trained}
    assert len(real) == len(set(real)) == 2  # 2.png and 3.png (once, through the file or its link)
    assert sorted(os.path.basename(p) for p in real) == ["2.png", "3.png"]
    assert len(held.retain) == 4


@pytest.mark.parametrize("kwargs, match", [(dict(ratio=(0, 1)), "aspect ratio"), (dict(ratio=(2.0, 1.0)), "aspect"),
                                           (dict(ratio=1.0), "aspect"), (dict(flip_p=1.5), "flip probability"),
                                           (dict(flip_p="0.5"), "flip probability")])
def test_train_transform_refuses_bad_ratio_and_flip_probability(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeededTrainTransform(16, **kwargs)


def test_train_transform_accepts_edge_arguments():
    im = Image.new("RGB", (5, 3), (10, 20, 30))
    for kwargs in (dict(ratio=[1, 1], flip_p=0), dict(ratio=(0.5, 2.0), flip_p=1.0)):
        x = SeededTrainTransform(7, **kwargs)(im, item_generator(0, 0, 0))
        assert x.shape == (3, 7, 7)
        assert torch_allclose_const(x, (10 / 255, 20 / 255, 30 / 255))


def torch_allclose_const(x, rgb) -> bool:
    return all(abs(float(x[c].min()) - v) < 1e-6 and abs(float(x[c].max()) - v) < 1e-6 for c, v in enumerate(rgb))


def test_cli_balanced_batch_that_cannot_fit_names_the_flags(tmp_path, capsys):
    """8 forget + 8 retain rows, --batch_size 16 --forget_per_batch 1 needs 15 retain rows per step: the error
    names the CLI flags, not the Python-only drop_last, and nothing is written."""
    data = make_class_tree(tmp_path / "data", ["a", "b", "c", "d"], 4, seed=0, size=(8, 8))
    out = tmp_path / "out"
    msg = assert_cli_fails_cleanly(["unlearn", "--model", "mae_micro", "--input_size", "16", "--data_path", data,
                                    "--forget_classes", "a,b", "--retain_classes", "c,d", "--num_image_per_class",
                                    "4", "--batch_size", "16", "--forget_per_batch", "1", "--output_dir", str(out),
                                    "--num_workers", "0", "--no_progress"], out, capsys,
                                   "1 forget + 15 retain", "8 forget and 8 retain rows", "--forget_per_batch")
    assert "--batch_size" in msg


def test_class_folder_symlinked_to_a_forget_class_is_refused(tmp_path):
    """A retain or proxy folder that is the forget folder under another name would label forget images +100."""
    from unlearn_fast.train.data_split import select_unlearning_files
    root = make_class_tree(tmp_path / "data", ["f", "r", "p"], 3, seed=0, size=(6, 6))
    os.symlink(os.path.join(root, "f"), os.path.join(root, "f_alias"))
    with pytest.raises(ValueError, match="f_alias is the forget class folder f"):
        select_unlearning_files(root, ["f"], ["f_alias"], num_image_per_class=2)
    with pytest.raises(ValueError, match="f_alias is the forget class folder f"):  # the folder proxy
        select_unlearning_files(root, ["f"], ["r"], num_image_per_class=2, opendata_to_forget_ratio=1.0)
    # without the folder proxy the alias is never read; as a forget class it may sit beside the retain classes
    items = select_unlearning_files(root, ["f"], ["r"], num_image_per_class=2)
    assert {os.path.basename(os.path.dirname(p)) for p, lab in items if lab > 0} == {"r"}
    items = select_unlearning_files(root, ["f", "f_alias"], ["r"], num_image_per_class=2)
    assert {os.path.basename(os.path.dirname(p)) for p, lab in items if lab > 0} == {"r"}
