"""Palette masks (REFERENCE.md §4.3): box geometry, brush strokes, the hybrid OR, the centred test hole."""
import numpy as np
import pytest
import torch

from unlearn_fast.models.palette_masks import (as_numpy_rng, bbox_to_mask, brush_stroke_mask, center_mask,
                                               hybrid_mask, inpaint_condition, random_bbox)


def test_center_mask_is_the_128_square_at_64():
    m = center_mask(256, 0.5)
    assert m.shape == (1, 256, 256) and m.dtype == torch.float32
    assert float(m.sum()) == 128 * 128 and float(m[0, 64:192, 64:192].min()) == 1.0
    m = center_mask((32, 32), 0.25)
    assert float(m.sum()) == 64 and float(m[0, 12:20, 12:20].min()) == 1.0
    with pytest.raises(ValueError, match="mask_ratio"):
        center_mask(256, 0.0)


def test_random_bbox_ranges_at_256():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_bbox(rng, (256, 256))
        assert 20 <= top and 20 <= left  # margin 20
        assert 108 <= h <= 128 and 108 <= w <= 128  # 128 shrunk by at most 40 // 2
        assert top + h <= 256 - 20 and left + w <= 256 - 20
    m = bbox_to_mask(256, (10, 20, 30, 40))
    assert m.sum() == 1200 and m[10, 20] == 1 and m[39, 59] == 1 and m[40, 59] == 0


def test_random_bbox_rejects_impossible_boxes():
    with pytest.raises(ValueError, match="larger"):
        random_bbox(0, (64, 64), max_bbox_shape=(80, 10))
    with pytest.raises(ValueError, match="shrink"):
        random_bbox(0, (256, 256), max_bbox_delta=(128, 40))
    with pytest.raises(ValueError, match="margin"):
        random_bbox(0, (256, 256), min_margin=(64, 20))


def test_brush_stroke_is_binary_nonempty_and_seeded():
    a = brush_stroke_mask(np.random.default_rng(3), (256, 256))
    b = brush_stroke_mask(np.random.default_rng(3), (256, 256))
    c = brush_stroke_mask(np.random.default_rng(4), (256, 256))
    assert a.shape == (256, 256) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    assert a.sum() > 12 * 12  # at least one round joint of width >= 12
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_hybrid_is_box_or_stroke_with_one_stream():
    got = hybrid_mask(np.random.default_rng(11), (64, 64))
    rng = np.random.default_rng(11)
    box = bbox_to_mask(64, random_bbox(rng, (64, 64)))
    want = box | brush_stroke_mask(rng, (64, 64))
    assert got.shape == (1, 64, 64) and torch.equal(got[0], torch.from_numpy(want).float())
    assert (got[0].numpy() >= box).all()
    cover = np.mean([float(hybrid_mask(s, 256).mean()) for s in range(12)])
    assert 0.15 < cover < 0.6  # a 108-128 px box (18-25 %) plus strokes


def test_random_sources():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(hybrid_mask(g1, 32), hybrid_mask(g2, 32))  # torch generators seed a numpy stream
    assert torch.equal(hybrid_mask(7, 32), hybrid_mask(7, 32))
    with pytest.raises(TypeError, match="rng"):
        as_numpy_rng("seed")
    with pytest.raises(ValueError, match="at least 8x8"):
        hybrid_mask(0, 4)


def test_inpaint_condition():
    gt = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.stack([center_mask(16, 0.5)] * 2)
    y = inpaint_condition(gt, mask, torch.Generator().manual_seed(0))
    z = torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))
    known = (mask == 0).expand_as(gt)
    assert torch.equal(y[known], gt[known]) and torch.equal(y[~known], z[~known])
