"""Red team of the Palette path (palette-unlearn / palette-test) against the official trainer's behaviour
(models/model.py ``unlearn_step``, core/praser.py, data/dataset.py), on palette_micro and tiny fake data:

- train.log: a ``train/mse_loss`` line exactly when the images seen are a multiple of ``log_iter`` (the
  reference's ``iter % log_iter == 0``), holding the epoch's running mean, whatever ``--readback_every`` is;
- the EMA follows the config's ``ema_scheduler`` (update iff images seen > ema_start and % ema_iter == 0);
- a non-object ``ema_scheduler`` is one error naming the key; ``-b`` is written into the saved config.json.

Tolerances: losses rtol 1e-6 (same fp32 ops, summed in float64 vs Python floats); EMA weights rtol 1e-6.
"""
from __future__ import annotations

import copy
import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.cli.palette_command import palette_unlearn_main
from unlearn_fast.cli.palette_config import resolve_palette_job
from unlearn_fast.models import create_model
from unlearn_fast.models.palette import MICRO_SCHEDULE, MICRO_UNET, PaletteBatch, save_palette_checkpoint
from unlearn_fast.train.palette_data import class_folder
from unlearn_fast.train.palette_steps import build_palette_setup, palette_fast_step
from unlearn_fast.train.palette_trainer import palette_train_loop

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SIZE = 16
CLASSES = [f"/{chr(97 + i % 26)}/r{i:03d}" for i in range(100)]


@pytest.fixture(scope="module")
def base_net():
    torch.manual_seed(0)
    return create_model("palette_micro")


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, SIZE, SIZE)
    mask[:, :, 2:9, 3:12] = 1.0
    y_cond = gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g)
    is_forget = torch.arange(n) % 2 == 0
    return PaletteBatch(gt, mask, y_cond), is_forget


def _batches(n, steps):
    data = [_batch(n, 100 + s) for s in range(steps)]

    def batches(epoch):
        for b, f in data:
            yield {"gt_image": b.gt, "cond_image": b.y_cond, "mask": b.mask}, torch.where(f, -1.0, 1.0).double()
    return data, batches


def _setup(net, ema_decay=0.9):
    return build_palette_setup(copy.deepcopy(net), "cpu", "ours", forget_alpha=0.2, lr=1e-3, ema_decay=ema_decay,
                               seed=5)


def _mse_lines(run_dir):
    lines = open(os.path.join(run_dir, "train.log")).read().splitlines()
    return [float(x.split("train/mse_loss: ")[1]) for x in lines if "train/mse_loss: " in x]


@pytest.mark.parametrize("n,log_iter,readback_every", [(4, 8, 20), (5, 8, 1), (4, 6, 2)])
def test_log_lines_at_exact_multiples_of_log_iter(base_net, tmp_path, n, log_iter, readback_every):
    """Before: a line whenever a multiple of log_iter had been *passed* by the last read-back (every
    --readback_every steps), so their number and values depended on --readback_every and not on the
    reference's rule (batch 12, log_iter 1e4: a line every 2500 steps, not every ~833)."""
    steps = 6
    data, batches = _batches(n, steps)
    twin = _setup(base_net)
    losses = [palette_fast_step(twin, b, f, s).loss.item() for s, (b, f) in enumerate(data)]
    palette_train_loop(_setup(base_net), batches, steps, n_epoch=1, run_dir=str(tmp_path), progress=False,
                       readback_every=readback_every, log_iter=log_iter)
    expected = [sum(losses[:k + 1]) / (k + 1) for k in range(steps) if (k + 1) * n % log_iter == 0]
    expected.append(sum(losses) / steps)  # the epoch-end line
    assert _mse_lines(str(tmp_path)) == pytest.approx(expected, rel=1e-6)


def _ema_expected(net, data, decay, seen_rule):
    """A plain restatement: step the twin, and after each step blend the EMA iff seen_rule(images seen)."""
    twin = _setup(net, ema_decay=None)
    ema = {k: v.clone() for k, v in twin.network.denoise_fn.named_parameters()}
    seen = 0
    for s, (b, f) in enumerate(data):
        palette_fast_step(twin, b, f, s)
        seen += b.gt.shape[0]
        if seen_rule(seen):
            for k, p in twin.network.denoise_fn.named_parameters():
                ema[k] = ema[k] * decay + (1 - decay) * p.detach()
    return ema


@pytest.mark.parametrize("n,ema_start,ema_iter", [(4, 5, 8), (1, 1, 1), (3, 0, 2)])
def test_ema_follows_ema_start_and_ema_iter(base_net, n, ema_start, ema_iter):
    """Before: the EMA was updated after every step whatever the config's ema_start / ema_iter (and so also
    after the first step of a batch-1 run, which the reference's ``iter > ema_start = 1`` skips)."""
    steps, decay = 4, 0.5
    data, batches = _batches(n, steps)
    setup = _setup(base_net, ema_decay=decay)
    palette_train_loop(setup, batches, steps, n_epoch=1, progress=False, ema_start=ema_start, ema_iter=ema_iter)
    expected = _ema_expected(base_net, data, decay, lambda seen: seen > ema_start and seen % ema_iter == 0)
    for k, p in setup.ema.module.named_parameters():
        torch.testing.assert_close(p, expected[k], rtol=1e-6, atol=1e-7)


# ---- the command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def places(tmp_path_factory):
    base = tmp_path_factory.mktemp("palette_rt")
    root = base / "places365"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        for split in ("train_256", "val_256"):
            d = class_folder(str(root), split, c)
            os.makedirs(d)
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(os.path.join(d, "a.jpg"))
    (base / "class.txt").write_text("\n".join(CLASSES) + "\n")
    torch.manual_seed(0)
    save_palette_checkpoint(create_model("palette_micro"), base / "16_Network.pth")
    return dict(root=str(root), class_list=str(base / "class.txt"), ckpt=str(base / "16_Network.pth"))


def _config(places, ema_scheduler=None):
    return {
        "name": "inpainting_places2", "seed": -1, "path": {"base_dir": "experiments", "checkpoint": "checkpoint"},
        "datasets": {"train": {"which_dataset": {"name": ["data.dataset", "ForgetInpaintDataset"],
                                                 "args": {"data_root": places["root"], "image_size": [SIZE, SIZE],
                                                          "mask_config": {"mask_mode": "hybrid"}}},
                               "dataloader": {"args": {"batch_size": 4, "num_workers": 0}}}},
        "model": {"which_model": {"args": {"ema_scheduler": ema_scheduler or {"ema_start": 1, "ema_iter": 1,
                                                                              "ema_decay": 0.9},
                                           "optimizers": [{"lr": 1e-3, "weight_decay": 0}]}},
                  "which_networks": [{"args": {"module_name": "guided_diffusion", "unet": dict(MICRO_UNET),
                                               "beta_schedule": {"train": dict(MICRO_SCHEDULE)}}}]},
        "train": {"n_epoch": 1, "log_iter": 1e4},
    }


@pytest.mark.parametrize("ema,expected", [
    ("yes", "model.which_model.args.ema_scheduler must be a JSON object"),
    ({"ema_iter": 0}, "ema_scheduler.ema_iter must be an integer >= 1"),
    ({"ema_start": -1}, "ema_scheduler.ema_start must be a number >= 0"),
])
def test_bad_ema_scheduler_names_the_key(places, ema, expected):
    """Before: ``"ema_scheduler": "yes"`` silently ran an EMA of decay 0.9999; ema_start / ema_iter were ignored."""
    with pytest.raises(ValueError, match=expected):
        resolve_palette_job(_config(places, ema_scheduler=ema), "train", source="cfg.json")
    job = resolve_palette_job(_config(places, ema_scheduler={"ema_start": 1e3, "ema_iter": 2.0}), "train")
    assert (job.ema_start, job.ema_iter, job.ema_decay) == (1000.0, 2, 0.9999)


def test_saved_config_has_the_batch_of_dash_b(places, tmp_path):
    """core/praser.py writes -b into the config.json it saves; before, the file kept the config's batch size."""
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_config(places)))
    out = tmp_path / "out"
    palette_unlearn_main(["-c", str(cfg_path), "--ckpt", places["ckpt"], "--class_list", places["class_list"],
                          "--output_dir", str(out), "--device", "cpu", "--no_progress", "--fix_decoder", "1",
                          "-b", "2", "--max_steps_per_epoch", "1"])
    (run,) = glob.glob(str(out / "*"))
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["datasets"]["train"]["dataloader"]["args"]["batch_size"] == 2
    assert saved["phase"] == "train" and saved["name"] == "train_inpainting_places2"
    assert json.loads(cfg_path.read_text())["datasets"]["train"]["dataloader"]["args"]["batch_size"] == 4
