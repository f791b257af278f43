"""Palette's 13-map feature loss ("Ours", REFERENCE.md §3.2, §7 item 12): the fused multi-map op (one launch
over all maps) vs the reference's per-map masked-copy loss, forward + backward, fp32.

    pytest benchmarks/bench_palette_loss.py -k cpu      # Places2's 13 maps at 1/4 resolution, batch 4
    pytest benchmarks/bench_palette_loss.py -k gpu      # Places2's 13 maps at full size (22.28 M/image), batch 8

``extra_info``: ``speedup_vs_reference`` (median reference time / median fused time, both timed in this
process), ``speedup_vs_per_map_fused`` (against the previous fast path: the single-map fused op called once
per map), and the fused rate counting the fewest bytes the loss must move: forward reads student and teacher
and writes 2(s−t), backward reads it and writes the student gradient = 20 B per fp32 element.
"""
from __future__ import annotations

import pytest
import torch
from step_harness import median_seconds, sync

from unlearn_fast.objective.palette_loss import (palette_unlearn_loss_terms, palette_unlearn_loss_terms_reference,
                                                 weighted_mse_loss)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (C, H, W) of the 13 encoder maps of the Places2 UNet at 256² (REFERENCE.md §3.1)
PLACES2_13 = ([(64, 256, 256)] * 3 + [(64, 128, 128)] + [(128, 128, 128)] * 2 + [(128, 64, 64)]
              + [(256, 64, 64)] * 2 + [(256, 32, 32)] + [(512, 32, 32)] * 3)
CONFIGS = {"cpu": dict(batch=4, shrink=4, reps=20), "gpu": dict(batch=8, shrink=1, reps=30)}
ALPHA = 0.1


def _per_map_fused(fs, ft, is_forget, alpha):
    """The previous fast path: the single-tensor fused op once per map (13 calls)."""
    terms = [weighted_mse_loss(a, b, is_forget, alpha) for a, b in zip(fs, ft)]
    return torch.stack([t.loss for t in terms]).sum()


def _loss_fns(dev, batch, shrink):
    shapes = [(c, h // shrink, w // shrink) for c, h, w in PLACES2_13]
    g = torch.Generator(device=dev).manual_seed(0)
    fs = [torch.randn((batch,) + s, device=dev, generator=g).requires_grad_(True) for s in shapes]
    ft = [torch.randn((batch,) + s, device=dev, generator=g) for s in shapes]
    is_forget = torch.arange(batch, device=dev) % 2 == 0

    def run(loss_fn):
        def go():
            loss_fn(fs, ft, is_forget, ALPHA).backward()
            for x in fs:
                x.grad = None
        return go
    fused = run(lambda *a: palette_unlearn_loss_terms(*a).loss)
    reference = run(lambda *a: palette_unlearn_loss_terms_reference(*a).loss)
    per_map = run(_per_map_fused)
    return fused, reference, per_map, sum(x.numel() for x in fs)


def _bench(benchmark, dev, which):
    cfg = CONFIGS[which]
    fused, reference, per_map, elements = _loss_fns(dev, cfg["batch"], cfg["shrink"])
    ref_s = median_seconds(reference, dev, cfg["reps"], warmup=2)
    per_map_s = median_seconds(per_map, dev, cfg["reps"], warmup=2)

    def one():
        fused()
        sync(dev)
    benchmark.pedantic(one, rounds=cfg["reps"], iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "dtype": "fp32", "maps": 13,
        "batch": cfg["batch"], "resolution": 256 // cfg["shrink"], "elements": elements, "reference_s": ref_s,
        "per_map_fused_s": per_map_s, "fused_s": med, "speedup_vs_reference": ref_s / med,
        "speedup_vs_per_map_fused": per_map_s / med, "fused_GB_per_s": elements * 20 / med / 1e9})


def test_cpu_palette_loss_fused_vs_reference(benchmark):
    _bench(benchmark, "cpu", "cpu")


@needs_gpu
def test_gpu_palette_loss_fused_vs_reference(benchmark):
    _bench(benchmark, "cuda", "gpu")
