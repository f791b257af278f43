"""Palette unlearning step ("Ours"): reference-semantics eager vs fast, fp32 (and the opt-in bf16 on the GPU)
(REFERENCE.md §3.2, §7 items 11-13).

    pytest benchmarks/bench_palette_step.py -k cpu      # palette_micro, batch 8, 32x32 (CI-sized)
    pytest benchmarks/bench_palette_step.py -k gpu      # palette_places2, batch 12, 256x256 on a CUDA GPU

Each benchmark times its own variant with pytest-benchmark; the reference-semantics step of the same
configuration is timed once in the same process, and ``extra_info["speedup_vs_reference"]`` is the ratio of
the two medians. A step = forward of student and teacher encoders, loss, backward, Adam, EMA. Random weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch

import unlearn_fast
from step_harness import benchmark_steps, peak_memory_mb, peak_memory_of, reset_peak_memory, time_steps
from unlearn_fast.models.palette import PaletteBatch
from unlearn_fast.train.palette_steps import build_palette_setup, palette_fast_step, palette_reference_step


@dataclass(frozen=True)
class PaletteStepConfig:
    name: str
    model: str
    batch: int
    size: int
    device: str
    approach: str = "ours"
    forget_alpha: float = 0.1


CPU_CONFIGS = {"cpu_palette_micro": PaletteStepConfig("cpu_palette_micro", "palette_micro", 8, 32, "cpu")}
GPU_CONFIGS = {"gpu_palette_places2": PaletteStepConfig("gpu_palette_places2", "palette_places2", 12, 256, "cuda")}
CPU_STEPS, CPU_WARMUP = 10, 2
GPU_STEPS, GPU_WARMUP = 8, 3

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_models: Dict[str, torch.nn.Module] = {}
_reference_seconds: Dict[str, float] = {}


def _base(cfg: PaletteStepConfig):
    if cfg.name not in _models:
        torch.manual_seed(0)
        _models[cfg.name] = unlearn_fast.create_model(cfg.model)
    return _models[cfg.name]


def _batch(cfg: PaletteStepConfig):
    g = torch.Generator().manual_seed(1)
    n, s = cfg.batch, cfg.size
    gt = torch.rand(n, 3, s, s, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, s, s)
    mask[:, :, s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 1.0
    y_cond = gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g)
    return PaletteBatch(gt, mask, y_cond).to(cfg.device), torch.arange(n) % 2 == 0  # labels on the host


def make_runner(cfg: PaletteStepConfig, variant: str) -> Callable[[int], None]:
    """``variant``: reference (fp32, the reference's costs) | fast (fp32) | fast_bf16 (opt-in bf16 autocast)."""
    fast = variant.startswith("fast")
    setup = build_palette_setup(copy.deepcopy(_base(cfg)), cfg.device, cfg.approach, cfg.forget_alpha, fast=fast,
                                precision="bf16" if variant.endswith("bf16") else "fp32")
    batch, is_forget = _batch(cfg)
    step_fn = palette_fast_step if fast else palette_reference_step
    return lambda step: step_fn(setup, batch, is_forget, step)


def reference_seconds(cfg: PaletteStepConfig, steps: int, warmup: int) -> float:
    if cfg.name not in _reference_seconds:
        _reference_seconds[cfg.name] = time_steps(make_runner(cfg, "reference"), cfg.device, steps, warmup)
    return _reference_seconds[cfg.name]


def _bench(benchmark, cfg: PaletteStepConfig, variant: str, steps: int, warmup: int):
    ref = reference_seconds(cfg, steps, warmup)
    reset_peak_memory(cfg.device)  # after the reference timing: the row's peak is its own variant's
    med = benchmark_steps(benchmark, make_runner(cfg, variant), cfg.device, steps, warmup)
    benchmark.extra_info.update({
        "config": cfg.name, "model": cfg.model, "batch": cfg.batch, "image_size": cfg.size, "variant": variant,
        "approach": cfg.approach, "dtype": "bf16" if variant.endswith("bf16") else "fp32",
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "reference_step_s": ref, "step_s": med, "steps_per_s": 1.0 / med,
        "images_per_s": cfg.batch / med, "speedup_vs_reference": ref / med,
        "peak_memory_mb": peak_memory_mb(cfg.device), "peak_memory_of": peak_memory_of(cfg.device),
    })


@pytest.mark.parametrize("cfg", list(CPU_CONFIGS.values()), ids=list(CPU_CONFIGS))
@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_cpu_palette_step(benchmark, cfg, variant):
    _bench(benchmark, cfg, variant, CPU_STEPS, CPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS.values()), ids=list(GPU_CONFIGS))
@pytest.mark.parametrize("variant", ["reference", "fast", "fast_bf16"])
def test_gpu_palette_step(benchmark, cfg, variant):
    _bench(benchmark, cfg, variant, GPU_STEPS, GPU_WARMUP)
