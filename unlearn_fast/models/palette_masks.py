"""Palette's inpainting masks (REFERENCE.md §4.3): the ``hybrid`` training mask and the centred test hole.

Masks are float32 ``[1, H, W]`` with 1 in the hole. ``hybrid`` = a random box OR a brush stroke, the
reference's ``random_bbox`` / ``brush_stroke_mask`` with its 256² defaults (box at most 128² shrunk by up
to 40, margin 20; 4–12 vertices, width 12–40, 1–3 strokes). For other sizes the pixel defaults scale
with the image. Draws come from a ``numpy.random.Generator`` (or one seeded from a ``torch.Generator``),
never from the global state, so a seed gives the same masks in every worker.

Reference quirks kept: the box top/left come from ``randint(margin, max)`` (exclusive high) before the
shrink; the stroke's random flips are not applied (the reference discards PIL's flipped copy). The
reference uses PIL's (width, height) as (h, w) when placing the first vertex; for square images, the
only ones it trains on, that is the same as the x-in-width, y-in-height used here.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

RandomSource = Union[np.random.Generator, torch.Generator, int, None]


def as_numpy_rng(rng: RandomSource) -> np.random.Generator:
    """A numpy Generator from itself, an int seed, a torch.Generator (one 63-bit draw) or None (fresh)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=rng, device=rng.device).item())
        return np.random.default_rng(seed)
    if rng is None or isinstance(rng, numbers.Integral):  # numpy integers too
        return np.random.default_rng(int(rng) if rng is not None else None)
    raise TypeError(f"rng must be a numpy Generator, torch.Generator, int or None, got {type(rng).__name__}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if _is_int(image_size):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list, np.ndarray, torch.Size)) and len(image_size) >= 2:
        hw = tuple(image_size)[:2]  # (h, w) or (h, w, c) as the reference's img_shape[:2]
    else:
        raise TypeError(f"image size must be an int or (height, width), got {image_size!r}")
    if not all(_is_int(v) for v in hw):
        raise TypeError(f"image size must be integers, got {image_size!r}")
    h, w = int(hw[0]), int(hw[1])
    if h < 8 or w < 8:
        raise ValueError(f"image size must be at least 8x8, got {h}x{w}")
    return h, w


def _pair(value, what: str) -> Tuple[int, int]:
    """An int means (v, v), as the reference's random_bbox arguments."""
    pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _low_high(value, what: str) -> Tuple[int, int]:
    """An int v means exactly v, i.e. the range [v, v + 1), as the reference's brush_stroke_mask arguments."""
    if _is_int(value):
        return int(value), int(value) + 1
    return _pair(value, what)


def _scaled(value: int, size: int) -> int:
    return max(1, int(round(value * size / 256)))


def random_bbox(rng: RandomSource, image_size=(256, 256), max_bbox_shape: Optional[Tuple[int, int]] = None,
                max_bbox_delta: Optional[Tuple[int, int]] = None, min_margin: Optional[Tuple[int, int]] = None
                ) -> Tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random box (defaults 128², delta 40, margin 20 at 256²)."""
    rng = as_numpy_rng(rng)
    h, w = _hw(image_size)
    mh, mw = _pair(max_bbox_shape, "max_bbox_shape") if max_bbox_shape is not None else (_scaled(128, h),
                                                                                          _scaled(128, w))
    dh, dw = _pair(max_bbox_delta, "max_bbox_delta") if max_bbox_delta is not None else (_scaled(40, h),
                                                                                         _scaled(40, w))
    gh, gw = _pair(min_margin, "min_margin") if min_margin is not None else (_scaled(20, h), _scaled(20, w))
    if mh > h or mw > w:
        raise ValueError(f"box {mh}x{mw} larger than the image {h}x{w}")
    if dh // 2 * 2 >= mh or dw // 2 * 2 >= mw:
        raise ValueError(f"box shrink {dh}x{dw} too large for a box of {mh}x{mw}")
    if h - mh <= 2 * gh or w - mw <= 2 * gw:
        raise ValueError(f"margin {gh}x{gw} leaves no room for a {mh}x{mw} box in {h}x{w}")
    top = int(rng.integers(gh, h - gh - mh))
    left = int(rng.integers(gw, w - gw - mw))
    d_top = int(rng.integers(0, dh // 2 + 1))
    d_left = int(rng.integers(0, dw // 2 + 1))
    return top + d_top, left + d_left, mh - d_top, mw - d_left


def bbox_to_mask(image_size, bbox: Tuple[int, int, int, int]) -> np.ndarray:
    """uint8 ``[H, W]`` with ones inside ``(top, left, height, width)``."""
    h, w = _hw(image_size)
    mask = np.zeros((h, w), dtype=np.uint8)
    top, left, bh, bw = bbox
    mask[top:top + bh, left:left + bw] = 1
    return mask


def brush_stroke_mask(rng: RandomSource, image_size=(256, 256), num_vertices: Tuple[int, int] = (4, 12),
                      mean_angle: float = 2 * math.pi / 5, angle_range: float = 2 * math.pi / 15,
                      brush_width: Optional[Tuple[int, int]] = None, max_loops: int = 4) -> np.ndarray:
    """uint8 ``[H, W]``: 1–(max_loops−1) poly-line strokes with round joints (width 12–40 at 256²)."""
    from PIL import Image, ImageDraw  # drawing only

    rng = as_numpy_rng(rng)
    h, w = _hw(image_size)
    if brush_width is None:
        bw_min, bw_max = max(1, _scaled(12, min(h, w))), max(2, _scaled(40, min(h, w)))
    else:
        bw_min, bw_max = _low_high(brush_width, "brush_width")
    num_vertices = _low_high(num_vertices, "num_vertices")
    if bw_max <= bw_min or num_vertices[1] <= num_vertices[0] or max_loops < 2:
        raise ValueError("brush_width and num_vertices must be (low, high) with high > low, and max_loops >= 2")
    average_radius = math.sqrt(h * h + w * w) / 8
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    loops = int(rng.integers(1, max_loops))
    vertex_counts = rng.integers(num_vertices[0], num_vertices[1], size=loops)
    angle_min_list = rng.uniform(0, angle_range, size=loops)
    angle_max_list = rng.uniform(0, angle_range, size=loops)
    for n in range(loops):
        k = int(vertex_counts[n])
        angles = rng.uniform(mean_angle - angle_min_list[n], mean_angle + angle_max_list[n], size=k)
        reverse = (np.arange(k) % 2) == 0
        angles[reverse] = 2 * math.pi - angles[reverse]
        vertex = [(int(rng.integers(0, w)), int(rng.integers(0, h)))]
        radii = rng.normal(loc=average_radius, scale=average_radius // 2, size=k)
        for i in range(k):
            r = float(np.clip(radii[i], 0, 2 * average_radius))
            x = np.clip(vertex[-1][0] + r * math.cos(angles[i]), 0, w)
            y = np.clip(vertex[-1][1] + r * math.sin(angles[i]), 0, h)
            vertex.append((int(x), int(y)))
        width = int(rng.integers(bw_min, bw_max))
        draw.line(vertex, fill=1, width=width)
        for vx, vy in vertex:
            draw.ellipse((vx - width // 2, vy - width // 2, vx + width // 2, vy + width // 2), fill=1)
    return np.asarray(mask, dtype=np.uint8).copy()


def hybrid_mask(rng: RandomSource, image_size=(256, 256)) -> torch.Tensor:
    """The training mask ``hybrid``: random box OR brush stroke, float32 ``[1, H, W]``."""
    rng = as_numpy_rng(rng)
    box = bbox_to_mask(image_size, random_bbox(rng, image_size))
    stroke = brush_stroke_mask(rng, image_size)
    return torch.from_numpy(box | stroke).float().unsqueeze(0)


def center_mask(image_size=(256, 256), mask_ratio: float = 0.5) -> torch.Tensor:
    """The test hole: a centred square of side ``int(size·mask_ratio)`` (128² at (64, 64) for 256², 0.5)."""
    if not isinstance(mask_ratio, numbers.Real) or isinstance(mask_ratio, bool):
        raise TypeError(f"mask_ratio must be a number in (0, 1], got {mask_ratio!r}")
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    h, w = _hw(image_size)
    sh, sw = int(h * mask_ratio), int(w * mask_ratio)
    return torch.from_numpy(bbox_to_mask((h, w), ((h - sh) // 2, (w - sw) // 2, sh, sw))).float().unsqueeze(0)


def inpaint_condition(gt: torch.Tensor, mask: torch.Tensor, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
    """``y_cond = gt·(1−mask) + mask·N(0, 1)``, as the reference's dataset builds it."""
    dev = generator.device if generator is not None else gt.device
    z = torch.randn(gt.shape, generator=generator, device=dev, dtype=gt.dtype).to(gt.device)
    return gt * (1.0 - mask) + mask * z
