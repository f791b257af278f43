"""Red team of the MAGE family against the official code's own arithmetic (testpaint.py, models_mage.py,
engine_baseline.py), restated here in plain PyTorch / numpy / PIL."""
import numpy as np
import pytest
import torch

from unlearn_fast.models import create_model
from unlearn_fast.models.mage_generate import (IMAGENET_MEAN, paint_batch, pixel_mask, soft_composite_mask,
                                               token_mask_from_pixels)


def _official_rects(mode, r, size):
    """testpaint.py's (left, width, top, height) rectangles of test_single_inpaint / test_single_outpaint."""
    if mode == "center":
        left, width = int(size * 0.5 * (1 - r)), int(size * r)
        return [(left, width, left, width)]
    b = int(size * r * 0.5)
    return list(zip([0, 0, 0, size - b], [size, size, b, b], [0, size - b, 0, 0], [b, b, size, size]))


def _official_pixel_mask(mode, r, size):
    m = torch.zeros(size, size, dtype=torch.bool)
    for left, width, top, height in _official_rects(mode, r, size):
        m[left:left + width, top:top + height] = True
    return m


def _official_token_mask(mode, r, size, grid):
    p, margin = size // grid, 1  # latent_margin = 1
    t = torch.zeros(grid, grid)
    for left, width, top, height in _official_rects(mode, r, size):
        t[max(0, left // p - margin):min(256, (left + width) // p + margin),
          max(0, top // p - margin):min(256, (top + height) // p + margin)] = 1
    return t.view(-1) > 0


CASES = [("center", k / 16) for k in range(1, 16)] + [("center", 0.3), ("center", 0.33)] + \
        [("outpaint", k / 16) for k in range(1, 14)]


@pytest.mark.parametrize("size,grid", [(256, 16), (32, 8)])
def test_pixel_and_token_masks_are_testpaints(size, grid):
    for mode, r in CASES:
        pm = pixel_mask(size, mode, r)
        assert torch.equal(pm, _official_pixel_mask(mode, r, size)), (mode, r)
        assert torch.equal(token_mask_from_pixels(pm, grid), _official_token_mask(mode, r, size, grid)), (mode, r)


def test_token_counts_of_the_evaluated_settings():
    # inpaint r = 4/16, 8/16: 36 and 100 (REFERENCE.md §5.1); outpaint k/16: asymmetric for odd k
    # (the left/top border reaches e // 16 only), e.g. 87 masked tokens at k = 1, 255 at k = 13
    got = [int(token_mask_from_pixels(pixel_mask(256, "center", r), 16).sum()) for r in (0.25, 0.5)]
    assert got == [36, 100]
    got = [int(token_mask_from_pixels(pixel_mask(256, "outpaint", k / 16), 16).sum()) for k in range(1, 14)]
    assert got == [87, 112, 135, 156, 175, 192, 207, 220, 231, 240, 247, 252, 255]
    with pytest.raises(ValueError, match="grow"):
        token_mask_from_pixels(pixel_mask(256, "center", 0.25), 16, grow=0)


@pytest.mark.parametrize("mode,r", [("center", 0.25), ("center", 0.5), ("outpaint", 3 / 16)])
def test_soft_mask_is_pils_gaussian_blur_of_the_8bit_mask(mode, r):
    from PIL import Image, ImageFilter
    size, margin = 256, 14
    g = np.zeros((1, 3, size, size), np.float32)  # testpaint's gaussian_mask: every rectangle grown by 14 px
    for left, width, top, height in _official_rects(mode, r, size):
        g[:, :, max(0, left - margin):min(256, left + width + margin), max(0, top - margin):min(256, top + height + margin)] = 1
    img = Image.fromarray(np.uint8(g[0].transpose(1, 2, 0) * 255.)).filter(ImageFilter.GaussianBlur(radius=7))
    want = torch.from_numpy(np.float32(img) / 255.)  # [R, R, 3], the same in every band
    got = soft_composite_mask(pixel_mask(size, mode, r), margin, 7.0)
    assert got.dtype == torch.float32
    assert torch.equal(got, want[..., 0]) and torch.equal(got, want[..., 2])


def test_composite_clips_after_blending_not_the_generation_before():
    torch.manual_seed(0)
    model = create_model("mage_micro").eval()
    x = torch.rand(2, 3, 32, 32)
    # an out-of-range decoder output (real VQGANs overshoot [0, 1]) makes the order of clip and blend visible
    model.vqgan.decode_ids = lambda ids: torch.full((ids.shape[0], 3, 32, 32), 1.6)
    out, parts = paint_batch(model, x, "center", 0.5, seed=0, return_parts=True)
    m = parts["soft_mask"]
    masked = torch.where(pixel_mask(32, "center", 0.5), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), x)
    want = (1.6 * m + masked * (1 - m)).clamp(0, 1)  # testpaint: clip(gen * m + masked * (1 - m))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    ramp = (m > 0) & (m < 1)
    assert bool(ramp.any()) and float((out - (1.0 * m + masked * (1 - m))).abs()[..., ramp].max()) > 0.05


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("mage_micro").eval()


@pytest.mark.parametrize("shape,match", [((1, 3, 32, 40), "square"), ((0, 3, 32, 32), "non-empty"),
                                         ((1, 1, 32, 32), r"\[N, 3, R, R\]")])
def test_paint_refuses_bad_batches_by_name(micro, shape, match):
    with pytest.raises(ValueError, match=match):
        paint_batch(micro, torch.rand(*shape), "center", 0.25)


def test_paint_bad_settings_are_named(micro):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="num_iter"):
        paint_batch(micro, x, "center", 0.25, num_iter=0)
    with pytest.raises(TypeError, match="ratio must be a number"):
        paint_batch(micro, x, "center", "0.25")


def test_numpy_and_tensor_seeds_are_seeds(micro):
    x = torch.rand(2, 3, 32, 32)
    want = paint_batch(micro, x, "outpaint", 0.25, seed=3)
    assert torch.equal(paint_batch(micro, x, "outpaint", 0.25, seed=np.int64(3)), want)
    assert torch.equal(paint_batch(micro, x, "outpaint", 0.25, seed=torch.tensor([3, 3])), want)


def test_write_refuses_non_finite_and_non_rgb_images_before_writing(tmp_path):
    from unlearn_fast.models.mage_generate import write_paint_outputs
    bad = torch.rand(2, 3, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        write_paint_outputs(bad, str(tmp_path), ["retain"] * 2, ["n0"] * 2, ["a.JPEG", "b.JPEG"], "center", 0.25)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        write_paint_outputs(torch.rand(1, 1, 8, 8), str(tmp_path), ["retain"], ["n0"], ["a.JPEG"], "center", 0.25)
    assert list(tmp_path.iterdir()) == []
