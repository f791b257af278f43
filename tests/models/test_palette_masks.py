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


# ---- the reference's data/util/mask.py, restated (np.random.randint(a, b) ≙ Generator.integers(a, b)) -----------
def _reference_random_bbox(rng, img_h=256, img_w=256, max_h=128, max_w=128, delta=40, margin=20):
    top = rng.integers(margin, img_h - margin - max_h)
    left = rng.integers(margin, img_w - margin - max_w)
    d_top, d_left = rng.integers(0, delta // 2 + 1), rng.integers(0, delta // 2 + 1)
    return top + d_top, left + d_left, max_h - d_top, max_w - d_left


def _reference_brush_stroke(rng, img_h=256, img_w=256, num_vertices=(4, 12), mean_angle=2 * np.pi / 5,
                            angle_range=2 * np.pi / 15, brush_width=(12, 40), max_loops=4):
    import math

    from PIL import Image, ImageDraw
    average_radius = math.sqrt(img_h * img_h + img_w * img_w) / 8
    mask = Image.new("L", (img_w, img_h), 0)
    loop_num = rng.integers(1, max_loops)
    num_vertex_list = rng.integers(num_vertices[0], num_vertices[1], size=loop_num)
    angle_min_list = rng.uniform(0, angle_range, size=loop_num)
    angle_max_list = rng.uniform(0, angle_range, size=loop_num)
    for n in range(loop_num):
        k = num_vertex_list[n]
        angles = rng.uniform(mean_angle - angle_min_list[n], mean_angle + angle_max_list[n], size=k)
        reverse = (np.arange(k, dtype=np.float32) % 2) == 0
        angles[reverse] = 2 * math.pi - angles[reverse]
        h, w = mask.size  # PIL's (width, height): the same for square images
        vertex = [(rng.integers(0, w), rng.integers(0, h))]
        r_list = rng.normal(loc=average_radius, scale=average_radius // 2, size=k)
        for i in range(k):
            r = np.clip(r_list[i], 0, 2 * average_radius)
            new_x = np.clip(vertex[-1][0] + r * math.cos(angles[i]), 0, w)
            new_y = np.clip(vertex[-1][1] + r * math.sin(angles[i]), 0, h)
            vertex.append((int(new_x), int(new_y)))
        draw = ImageDraw.Draw(mask)
        width = int(rng.integers(brush_width[0], brush_width[1]))
        draw.line(vertex, fill=1, width=width)
        for v in vertex:
            draw.ellipse((v[0] - width // 2, v[1] - width // 2, v[0] + width // 2, v[1] + width // 2), fill=1)
    return np.array(mask).astype(np.uint8)  # the random flips are drawn last and discarded by the reference


def test_hybrid_mask_is_the_reference_algorithm_on_one_stream():
    """At 256² (the reference's size) the hybrid mask is bit for bit ``bbox2mask(random_bbox()) |
    brush_stroke_mask()`` fed by the same random stream, and the test hole is ``TestForgetInpaintDataset``'s."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        top, left, h, w = _reference_random_bbox(rng)
        box = np.zeros((256, 256), np.uint8)
        box[top:top + h, left:left + w] = 1
        want = torch.from_numpy(box | _reference_brush_stroke(rng)).float()[None]
        assert torch.equal(hybrid_mask(np.random.default_rng(seed), (256, 256)), want), seed
    for (h, w), ratio in (((256, 256), 0.5), ((256, 256), 0.25), ((255, 257), 0.5), ((100, 60), 0.3)):
        ch, cw = int(h * ratio), int(w * ratio)
        want = torch.zeros(1, h, w)
        want[:, (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw] = 1
        assert torch.equal(center_mask((h, w), ratio), want), (h, w, ratio)
