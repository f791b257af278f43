"""Palette sampler (REFERENCE.md §5.5): a plain restatement of the official restoration loop is the oracle;
the known region must come back exactly; the result files follow the reference's names and pixel rule."""
import numpy as np
import pytest
import torch

from unlearn_fast import create_model
from unlearn_fast.models.palette_sampler import (image_grid, palette_restore,
                                                 restoration_images, tensor_to_uint8, write_restoration_images)

SIZE, N, T = 8, 2, 6  # tiny: the sampler runs the UNet T times per call


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("palette_micro", unet=dict(attn_res=[], image_size=SIZE),
                     beta_schedule=dict(train=dict(schedule="linear", n_timestep=T, linear_start=1e-3,
                                                   linear_end=0.3)))
    return m.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    y_0 = torch.rand(N, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(N, 1, SIZE, SIZE)
    mask[0, :, 2:6, 2:6] = 1
    mask[1, :, 1:5, 3:8] = 1
    y_cond = y_0 * (1 - mask) + mask * torch.randn(y_0.shape, generator=g)
    return y_cond, y_0, mask


def _official_restoration(model, y_cond, y_t, y_0, mask, sample_num, g):
    """The official Network.restoration / p_sample, restated with its `extract` helper."""
    b = y_cond.shape[0]

    def extract(a, t, shape):
        return a.gather(-1, t).reshape(b, *((1,) * (len(shape) - 1)))

    ret = y_t
    for i in reversed(range(model.num_timesteps)):
        t = torch.full((b,), i, dtype=torch.long)
        level = extract(model.gammas, t, (1, 1))
        eps = model.denoise_fn(torch.cat([y_cond, y_t], dim=1), level)
        y0_hat = extract(model.sqrt_recip_gammas, t, y_t.shape) * y_t - \
            extract(model.sqrt_recipm1_gammas, t, y_t.shape) * eps
        y0_hat.clamp_(-1.0, 1.0)
        mean = extract(model.posterior_mean_coef1, t, y_t.shape) * y0_hat + \
            extract(model.posterior_mean_coef2, t, y_t.shape) * y_t
        log_var = extract(model.posterior_log_variance_clipped, t, y_t.shape)
        noise = torch.randn(y_t.shape, generator=g) if any(t > 0) else torch.zeros_like(y_t)
        y_t = mean + noise * (0.5 * log_var).exp()
        y_t = y_0 * (1.0 - mask) + mask * y_t
        if i % (model.num_timesteps // sample_num) == 0:
            ret = torch.cat([ret, y_t], dim=0)
    return y_t, ret


@torch.no_grad()
def test_matches_official_loop_and_keeps_known_region(model, batch):
    y_cond, y_0, mask = batch
    out, vis = palette_restore(model, y_cond, y_0, mask, sample_num=3, generator=torch.Generator().manual_seed(3))
    want_out, want_vis = _official_restoration(model, y_cond, y_cond, y_0, mask, 3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vis, want_vis, rtol=1e-6, atol=1e-6)
    known = (mask == 0).expand_as(y_0)
    assert torch.equal(out[known], y_0[known])  # exactly
    assert vis.shape == (4 * N, 3, SIZE, SIZE)  # start + snapshots at i = 4, 2, 0
    assert torch.equal(vis[:N], y_cond) and torch.equal(vis[-N:], out)
    assert out[~known].abs().max() <= 1.5 and not torch.equal(out[~known], y_cond[~known])


@torch.no_grad()
def test_reproducible_with_a_seed(model, batch):
    y_cond, y_0, mask = batch
    a, _ = palette_restore(model, y_cond, y_0, mask, generator=torch.Generator().manual_seed(9), sample_num=2)
    b, _ = palette_restore(model, y_cond, y_0, mask, generator=torch.Generator().manual_seed(9), sample_num=2)
    c, _ = palette_restore(model, y_cond, y_0, mask, generator=torch.Generator().manual_seed(10), sample_num=2)
    assert torch.equal(a, b)
    hole = (mask == 1).expand_as(y_0)
    assert not torch.equal(a[hole], c[hole])


@torch.no_grad()
def test_steps_and_arguments(model, batch):
    y_cond, y_0, mask = batch
    calls = []
    h = model.denoise_fn.register_forward_hook(lambda *_: calls.append(1))
    try:
        out, vis = palette_restore(model, y_cond, y_0, mask, sample_num=2, steps=2,
                                   generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
    assert len(calls) == 2 and vis.shape[0] == N  # i = 5, 4: no snapshot yet (every T // 2 = 3)
    with pytest.raises(ValueError, match="sample_num"):
        palette_restore(model, y_cond, y_0, mask, sample_num=T)
    with pytest.raises(ValueError, match="steps"):
        palette_restore(model, y_cond, y_0, mask, steps=T + 1)
    with pytest.raises(ValueError, match="mask"):
        palette_restore(model, y_cond, y_0, mask[:1])


def test_grid_layout_matches_torchvision():
    tv = pytest.importorskip("torchvision.utils")
    imgs = torch.rand(5, 3, 4, 6) * 2 - 1
    for nrow in (1, 2, 3, 8):
        torch.testing.assert_close(image_grid(imgs, nrow), tv.make_grid(imgs, nrow=nrow, normalize=False),
                                   rtol=0, atol=0)


def test_grid_layout_plain():
    imgs = torch.arange(3 * 1 * 2 * 2, dtype=torch.float32).view(3, 1, 2, 2) + 1
    grid = image_grid(imgs, nrow=2, padding=1)  # 2 columns, 2 rows, zero padding
    assert grid.shape == (1, 7, 7)
    assert torch.equal(grid[0, 1:3, 1:3], imgs[0, 0]) and torch.equal(grid[0, 1:3, 4:6], imgs[1, 0])
    assert torch.equal(grid[0, 4:6, 1:3], imgs[2, 0]) and float(grid[0, 4:6, 4:6].abs().sum()) == 0.0


def test_uint8_rule():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5]).view(1, 1, 7).expand(3, 1, 7)
    got = tensor_to_uint8(x)
    want = np.round((np.clip(x[0, 0].numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    assert got.shape == (7, 3) and np.array_equal(got[:, 0], want)  # the reference squeezes H = 1 away


def test_writer_names_and_pixels(tmp_path, batch):
    from PIL import Image

    _, y_0, mask = batch
    g = torch.Generator().manual_seed(0)
    vis = torch.rand(5 * N, 3, SIZE, SIZE, generator=g) * 2.2 - 1.1  # start + 4 snapshots  # some values outside [-1, 1]
    names = ["airfield_Places365_val_00000001.png", "bedroom_Places365_val_00000002.png"]
    paths = write_restoration_images(str(tmp_path / "0.50"), names, y_0, vis, mask)
    want = [f"{p}_{n}" for n in names for p in ("GT", "Process", "Out")] + [f"Mask_{n}" for n in names]
    assert [p.split("/")[-1] for p in paths] == want
    read = {p.split("/")[-1]: np.asarray(Image.open(p)) for p in paths}

    def u8(x):
        return np.round((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)

    for i, n in enumerate(names):
        assert np.array_equal(read[f"GT_{n}"], u8(y_0[i]))
        assert np.array_equal(read[f"Out_{n}"], u8(vis[(5 - 1) * N + i]))
        assert np.array_equal(read[f"Mask_{n}"], u8(y_0[i] * (1 - mask[i]) + mask[i]))
        proc = read[f"Process_{n}"]  # 5 snapshots, nrow = int(sqrt(5)) = 2: 3 rows x 2 columns, padding 2
        assert proc.shape == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2, 3)
        assert np.array_equal(proc[2:2 + SIZE, 2 + SIZE + 2: 2 + 2 * SIZE + 2], u8(vis[N + i]))
        assert (proc[0, :] == 128).all()  # zero padding -> round(127.5) = 128
    assert [n for n, _ in restoration_images(names, y_0, vis, mask)] == want


def test_writer_jpeg_and_bad_names(tmp_path, batch):
    from PIL import Image

    _, y_0, mask = batch
    vis = torch.zeros(2 * N, 3, SIZE, SIZE)
    paths = write_restoration_images(str(tmp_path), ["a.jpg", "b.jpg"], y_0, vis, mask)
    with Image.open(paths[0]) as im:
        assert im.format == "JPEG" and im.size == (SIZE, SIZE)
    with pytest.raises(ValueError, match="extension"):
        write_restoration_images(str(tmp_path), ["a", "b.jpg"], y_0, vis, mask)
    with pytest.raises(ValueError, match="names"):
        write_restoration_images(str(tmp_path), ["a.jpg"], y_0, vis, mask)
