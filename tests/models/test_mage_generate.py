"""Batched MAGE inpaint / outpaint: masks, the decoding schedule, compositing, reproducibility, files."""
import math
import os

import numpy as np
import pytest
import torch

from unlearn_fast.models import create_model
from unlearn_fast.models.mage_generate import (IMAGENET_MEAN, mage_decode_tokens, paint_batch, paint_file_name,
                                               paint_settings, pixel_mask, run_paint, soft_composite_mask,
                                               token_mask_from_pixels, write_paint_outputs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("mage_micro").eval()


def test_settings_and_masks_at_256():
    assert paint_settings("inpaint") == [("center", 0.25), ("center", 0.5)]
    assert [r for _, r in paint_settings("outpaint")] == [k / 16 for k in range(1, 14)]
    with pytest.raises(ValueError):
        paint_settings("paint")
    for r, side, tokens in ((0.25, 64, 36), (0.5, 128, 100)):  # REFERENCE.md §5.1
        pm = pixel_mask(256, "center", r)
        assert int(pm.sum()) == side * side and bool(pm[128, 128]) and not bool(pm[0, 0])
        assert int(token_mask_from_pixels(pm, 16).sum()) == tokens
    for k in range(1, 14):
        w = int(256 * (k / 16) / 2)
        pm = pixel_mask(256, "outpaint", k / 16)
        assert int(pm.sum()) == 256 * 256 - (256 - 2 * w) ** 2
        tm = token_mask_from_pixels(pm, 16).view(16, 16)
        # testpaint.py: a border [s, e) masks tokens [s // 16 - 1, e // 16 + 1), so the left/top border reaches
        # token w // 16 and the right/bottom one starts at (256 - w) // 16 - 1
        inner = max(0, ((256 - w) // 16 - 1) - (w // 16 + 1))
        assert int((~tm).sum()) == inner ** 2
    with pytest.raises(ValueError):
        pixel_mask(256, "corner", 0.5)


def test_token_mask_grows_by_one_token():
    pm = torch.zeros(32, 32, dtype=torch.bool)
    pm[13, 13] = True  # one pixel in token (3, 3) of an 8x8 grid of 4-px tokens
    tm = token_mask_from_pixels(pm, 8).view(8, 8)
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[2:4, 2:4] = True  # testpaint.py: pixels [13, 14) -> tokens [13 // 4 - 1, 14 // 4 + 1) = [2, 4)
    assert torch.equal(tm, want)


class CountingModel:
    """A stand-in with MAGE's decoding surface: random logits, records the masked count per call."""
    codebook_size, mask_token_label = 32, 40

    def __init__(self):
        self.unknown_per_call = []

    def forward_outputs(self, ids, task):
        self.unknown_per_call.append(int(task["token_all_mask"][0].sum()))
        g = torch.Generator().manual_seed(len(self.unknown_per_call))
        return torch.randn(ids.shape[0], ids.shape[1] + 1, 41, generator=g)


@pytest.mark.parametrize("unknown,steps", [(36, 2), (100, 6), (256, 20)])
def test_skip_rule_and_remask_counts(unknown, steps):
    m = CountingModel()
    mask = torch.zeros(256, dtype=torch.bool)
    mask[torch.randperm(256, generator=torch.Generator().manual_seed(0))[:unknown]] = True
    ids = torch.randint(0, 32, (3, 256))
    out = mage_decode_tokens(m, ids, mask, seeds=[0, 0, 1])
    assert len(m.unknown_per_call) == steps  # REFERENCE.md §5.1: 2 steps at r=0.25, 6 at r=0.5
    # the counts follow clamp(floor(L cos(pi/2 (k+1)/20)), 1, #unknown - 1)
    want, n_unknown = [unknown], unknown
    for k in range(20 - steps, 19):
        n_unknown = max(1, min(n_unknown - 1, math.floor(256 * math.cos(math.pi / 2 * (k + 1) / 20))))
        want.append(n_unknown)
    assert m.unknown_per_call == want
    assert out.dtype == torch.long and int(out.max()) < 32 and (out != 40).all()
    if unknown < 256:  # known tokens stay (their confidence is log 1e20)
        assert torch.equal(out[:, ~mask], ids[:, ~mask])


def test_no_unknown_tokens_returns_input():
    m = CountingModel()
    ids = torch.randint(0, 32, (2, 256))
    assert torch.equal(mage_decode_tokens(m, ids, torch.zeros(256, dtype=torch.bool), [0, 0]), ids)
    assert m.unknown_per_call == []


def test_confident_logits_are_sampled():
    class Peaked(CountingModel):
        def forward_outputs(self, ids, task):
            logits = torch.full((ids.shape[0], ids.shape[1] + 1, 41), -1e4)
            logits[..., 7] = 0.0
            return logits
    out = mage_decode_tokens(Peaked(), torch.zeros(2, 256, dtype=torch.long), torch.ones(256, dtype=torch.bool), [3, 4])
    assert (out == 7).all()


@pytest.mark.parametrize("mode,ratio", [("center", 0.25), ("outpaint", 0.25)])
def test_known_region_is_exactly_the_input(model, mode, ratio):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    out, parts = paint_batch(model, x, mode, ratio, seed=0, return_parts=True)
    assert tuple(out.shape) == (2, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    pm = pixel_mask(32, mode, ratio)
    # at 32 px: grow round(14/8) = 2 px, blur sigma 7/8 with radius ceil(3 sigma) = 3 px
    reach = torch.nn.functional.max_pool2d(pm.float()[None, None], 11, stride=1, padding=5)[0, 0] > 0
    assert torch.equal(out[..., ~reach], x[..., ~reach])
    assert bool(((parts["soft_mask"] > 0) <= reach).all())  # PIL's 8-bit blur rounds the far corners to 0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    assert torch.equal(parts["masked"][..., pm], mean.expand(2, 3, int(pm.sum())))
    # deep inside the grown mask (>= radius - grow = 1 px inside the hole) the output is the generation
    core = torch.nn.functional.max_pool2d((~pm).float()[None, None], 3, stride=1, padding=1)[0, 0] == 0
    assert bool((parts["soft_mask"][core] == 1).all())
    assert torch.equal(out[..., core], parts["generated"].clamp(0, 1)[..., core])  # clipped after compositing


def test_soft_mask_shape_and_range():
    pm = pixel_mask(256, "center", 0.5)
    soft = soft_composite_mask(pm, 14, 7.0)
    assert float(soft.min()) == 0 and float(soft.max()) == 1
    edge = 64 - 14  # first pixel of the grown square: the 0.5 line runs between it and its outer neighbour
    assert float(soft[128, edge - 1] + soft[128, edge]) / 2 == pytest.approx(0.5, abs=1e-6)
    assert float(soft[128, edge]) > 0.5 > float(soft[128, edge - 1])
    assert float(soft[128, 64 - 14 - 22]) == 0 and float(soft[128, 64 - 14 + 22]) == 1


def test_reproducible_with_fixed_seed_and_seed_sensitive(model):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32)
    a = paint_batch(model, x, "center", 0.5, seed=0)
    b = paint_batch(model, x, "center", 0.5, seed=0)
    c = paint_batch(model, x, "center", 0.5, seed=[0, 5])
    assert torch.equal(a, b)
    assert torch.equal(c[0], a[0]) and not torch.equal(c[1], a[1])
    # the same image twice in one batch with the same seed gives the same result (per-image streams)
    d = paint_batch(model, torch.stack([x[1], x[1]]), "center", 0.5, seed=0)
    assert torch.equal(d[0], d[1])
    with pytest.raises(ValueError, match="seeds"):
        paint_batch(model, x, "center", 0.5, seed=[0])


def test_file_names():
    assert paint_file_name("center", 0.25, "ILSVRC2012_val_00000001.JPEG") == "center_0.25_ILSVRC2012_val_00000001.JPEG"
    assert paint_file_name("outpaint", 3 / 16, "/a/b/x.JPEG") == "outpaint_0.1875_x.JPEG"
    assert paint_file_name("outpaint", 0.5, "x") == "outpaint_0.5_x.JPEG"


def test_writer_channel_order(tmp_path):
    from PIL import Image
    img = torch.zeros(1, 3, 16, 16)
    img[:, 0] = 0.9  # red
    img[:, 2] = 0.1
    p_bgr = write_paint_outputs(img, str(tmp_path / "a"), ["forget"], ["n01"], ["x.JPEG"], "center", 0.5)[0]
    p_rgb = write_paint_outputs(img, str(tmp_path / "b"), ["forget"], ["n01"], ["x.JPEG"], "center", 0.5,
                                channel_order="rgb")[0]
    assert p_bgr == str(tmp_path / "a" / "forget" / "n01" / "center_0.5_x.JPEG")
    bgr = np.asarray(Image.open(p_bgr)).astype(int)
    rgb = np.asarray(Image.open(p_rgb)).astype(int)
    assert abs(rgb[..., 0].mean() - 229) < 3 and abs(rgb[..., 2].mean() - 25) < 3  # floor(0.9*255) = 229
    assert np.abs(bgr[..., ::-1] - rgb).max() <= 3  # R/B swapped on disk, as the reference's cv2 files
    with pytest.raises(ValueError, match="channel_order"):
        write_paint_outputs(img, str(tmp_path), ["forget"], ["n01"], ["x"], "center", 0.5, channel_order="bgra")
    with pytest.raises(ValueError, match="split"):
        write_paint_outputs(img, str(tmp_path), ["train"], ["n01"], ["x"], "center", 0.5)


def test_run_paint_writes_the_expected_files(model, tmp_path):
    torch.manual_seed(3)
    batches = [(torch.rand(2, 3, 32, 32), ["retain", "forget"], ["n01440764", "n02102040"],
                ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]),
               (torch.rand(1, 3, 32, 32), ["retain"], ["n01440764"], ["ILSVRC2012_val_00000003.JPEG"])]
    model.train()
    paths = run_paint(model, batches, str(tmp_path), "inpaint", seed=0)
    assert model.training  # the mode is restored
    rel = sorted(os.path.relpath(p, tmp_path) for p in paths)
    want = sorted(f"{s}/{w}/center_{r}_{n}" for r in (0.25, 0.5)
                  for imgs, ss, ws, ns in batches for s, w, n in zip(ss, ws, ns))
    assert rel == want
    assert all(os.path.getsize(p) > 0 for p in paths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_its_own_rerun(model):
    m = create_model("mage_micro").cuda().eval()
    m.load_state_dict(model.state_dict())
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)).cuda()
    a = paint_batch(m, x, "outpaint", 0.5, seed=[0, 1, 0])
    b = paint_batch(m, x, "outpaint", 0.5, seed=[0, 1, 0])
    assert torch.equal(a, b) and a.is_cuda
    reach = torch.nn.functional.max_pool2d(pixel_mask(32, "outpaint", 0.5).float()[None, None], 11, stride=1,
                                           padding=5)[0, 0].cuda() > 0
    assert torch.equal(a[..., ~reach], x[..., ~reach])
