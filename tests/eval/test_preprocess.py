"""Image reading with the BGR convention, the clean-fid resize, and the Inception-Score inputs."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.eval.preprocess import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, clean_resize,
                                          cleanfid_input, mage_is_input, places365_is_input, read_image_rgb,
                                          upsample_for_inception)


def _cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _resample_matrix(n_in, n_out):
    """PIL's antialiased bicubic resampling as a matrix [n_out, n_in] (support widened when shrinking)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = np.array([_cubic((j - center + 0.5) / filterscale) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m


def oracle_clean_resize(img, width, height):
    """Independent restatement: separable bicubic (horizontal, then vertical) per channel, then clip."""
    h, w, _ = img.shape
    rows, cols = _resample_matrix(h, height), _resample_matrix(w, width)
    out = np.stack([rows @ img[..., c].astype(np.float64) @ cols.T for c in range(img.shape[2])], axis=2)
    return np.clip(out, 0, 255)


@pytest.mark.parametrize("h,w,size", [(37, 53, (299, 299)), (600, 450, (299, 299)), (5, 5, (7, 3))])
def test_clean_resize_matches_bicubic_oracle(h, w, size):
    rng = np.random.default_rng(h)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    got = clean_resize(img, size)
    assert got.dtype == np.float32 and got.shape == (size[1], size[0], 3)  # (width, height) -> [H, W, C]
    # float32 intermediate inside PIL -> a few 1e-4 of the 0..255 range.
    np.testing.assert_allclose(got, oracle_clean_resize(img, *size), atol=2e-3, rtol=0)


def test_clean_resize_clips_overshoot_and_keeps_constants():
    board = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    img = np.stack([board, 255 - board, np.full_like(board, 77)], axis=2)
    out = clean_resize(img, (31, 31))  # bicubic upsampling of a checkerboard overshoots [0, 255]
    assert out.min() >= 0 and out.max() <= 255
    assert out[..., 0].max() == 255 and out[..., 0].min() == 0  # the clip was needed
    np.testing.assert_allclose(out[..., 2], 77, atol=1e-3)  # a constant channel stays constant


def test_clean_resize_is_per_channel_so_bgr_swap_commutes():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(40, 29, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clean_resize(img[..., ::-1])[..., ::-1], clean_resize(img))
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        clean_resize(img[..., 0])


def _save(path, arr):
    Image.fromarray(arr).save(path, format="PNG")  # lossless, whatever the extension says
    return str(path)


def test_read_image_rgb_bgr_option(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 10
    path = _save(tmp_path / "x.JPEG", rgb)
    np.testing.assert_array_equal(read_image_rgb(path), rgb)
    np.testing.assert_array_equal(read_image_rgb(path, bgr_on_disk=True), rgb[..., ::-1])
    with pytest.raises(FileNotFoundError):
        read_image_rgb(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        read_image_rgb(tmp_path / "bad.png")


def test_cleanfid_input_is_resized_chw_in_0_255(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    path = _save(tmp_path / "a.png", rgb)
    x = cleanfid_input(path, bgr_on_disk=True)
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), clean_resize(rgb[..., ::-1]).transpose(2, 0, 1))


def test_mage_is_input_normalises_as_on_disk_then_flips(tmp_path):
    rng = np.random.default_rng(3)
    disk = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)  # already 256: Resize is the identity
    path = _save(tmp_path / "g.JPEG", disk)
    as_read = torch.from_numpy(disk).permute(2, 0, 1).float() / 255
    normalised = (as_read - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(mage_is_input(path, bgr_on_disk=True), normalised[[2, 1, 0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(mage_is_input(path, bgr_on_disk=False), normalised, atol=1e-6, rtol=0)


def test_places365_is_input_crops_and_normalises(tmp_path):
    rng = np.random.default_rng(4)
    disk = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    path = _save(tmp_path / "Out_x.jpg", disk)
    x = places365_is_input(path)
    crop = torch.from_numpy(disk[16:240, 16:240]).permute(2, 0, 1).float() / 255
    want = (crop - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)


def test_upsample_for_inception_matches_nn_upsample():
    x = torch.randn(2, 3, 256, 256)
    up = torch.nn.Upsample(size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_for_inception(x), up(x))
    with pytest.raises(ValueError, match="batch"):
        upsample_for_inception(x[0])
    assert math.isclose(float(upsample_for_inception(torch.ones(1, 3, 5, 7)).mean()), 1.0, rel_tol=1e-6)
