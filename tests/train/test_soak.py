"""Soak: several hundred mae_micro steps on CPU through the real data path (image files, seeded transforms,
DataLoader with 2 workers re-created every epoch, as the CLI does), with mid-epoch checkpoints and log
writes, and the main process's resident memory measured after every epoch.

Bound: from the end of epoch 1 (allocator and worker warm-up done) to the end, RSS may grow by at most
8 MiB over the remaining 300 steps (measured: +0.1 MiB). Keeping one batch per step alive (4 images,
48 KiB) would exceed it: tried, +17 MiB. Deselect with ``-m "not soak"``.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.train.balanced_sampler import ReferenceShuffleBatchSampler
from unlearn_fast.train.image_datasets import UnlearnImageDataset, reference_train_transform
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = [pytest.mark.soak, pytest.mark.usefixtures("single_thread")]

EPOCHS, ROWS, BATCH = 8, 200, 4          # 50 steps per epoch, 400 steps
RSS_GROWTH_LIMIT_MIB = 8.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the RSS")
def test_soak_rss_stays_flat(make_mae_micro, tmp_path):
    rng = np.random.default_rng(4)
    files = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    items = [(files[i % len(files)], -100.0 if i % 2 else 100.0) for i in range(ROWS)]
    dataset = UnlearnImageDataset(items, reference_train_transform(32), seed=0)
    sampler = ReferenceShuffleBatchSampler(len(items), BATCH, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2, persistent_workers=False)

    def epoch_batches(epoch):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        return iter(loader)

    setup = build_setup(make_mae_micro(), "cpu", lr=1e-4, precision="reference", forget_alpha=0.2)
    out = tmp_path / "run"
    out.mkdir()
    rss = []
    t0 = time.perf_counter()
    history = train_loop(setup, epoch_batches, sampler.steps_per_epoch, epochs=EPOCHS, lr=1e-4, warmup_epochs=1,
                         progress=False, output_dir=str(out), save_every_steps=25, readback_every=10,
                         on_epoch_end=lambda epoch, stats: rss.append(_rss_mib()))
    seconds = time.perf_counter() - t0
    growth = rss[-1] - rss[1]
    print(f"soak: {EPOCHS * sampler.steps_per_epoch} steps in {seconds:.1f} s; RSS per epoch (MiB): "
          + ", ".join(f"{r:.1f}" for r in rss) + f"; growth after warm-up {growth:+.1f} MiB")
    assert len(history) == EPOCHS and all(np.isfinite(h["train_loss"]) for h in history)
    assert growth <= RSS_GROWTH_LIMIT_MIB, f"RSS grew by {growth:.1f} MiB over {EPOCHS - 2} epochs: {rss}"
    assert len(open(out / "log.txt").read().splitlines()) == EPOCHS
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
