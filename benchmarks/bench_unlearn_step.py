"""Whole unlearning step: reference-semantics eager vs fast (equal numerics) vs fast bf16.

    pytest benchmarks -k cpu            # small CPU configurations (CI-sized)
    pytest benchmarks -k gpu            # MAE-B, MAE-L, MAGE-B at batch 64 on a CUDA GPU

Each benchmark times its own variant with pytest-benchmark; the reference-semantics step of the same
configuration is timed once in the same process, and ``extra_info["speedup_vs_reference"]`` is the ratio
of the two medians. Random weights (speed does not depend on them).
"""
from __future__ import annotations

import pytest
import torch

from step_harness import (CPU_CONFIGS, GPU_CONFIGS, batch_for, base_model, benchmark_steps, make_runner,
                          peak_memory_mb, peak_memory_of, record_row, reference_seconds, reset_peak_memory)

CPU_STEPS, CPU_WARMUP = 9, 2  # medians of 9: 3 steps gave ratios that moved by 0.3 between runs
GPU_STEPS, GPU_WARMUP = 8, 4

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _bench(benchmark, cfg, variant, steps, warmup):
    if cfg.model.startswith("mage"):
        pytest.importorskip("unlearn_fast.models.mage")
    ref = reference_seconds(cfg, steps, warmup)
    reset_peak_memory(cfg.device)  # after the reference timing: the row's peak is its own variant's
    med = benchmark_steps(benchmark, make_runner(cfg, variant), cfg.device, steps, warmup)
    batch = batch_for(cfg, base_model(cfg))[0].shape[0]
    benchmark.extra_info.update({
        "config": cfg.name, "model": cfg.model, "batch": batch, "variant": variant,
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
        "reference_step_s": ref, "step_s": med, "steps_per_s": 1.0 / med, "images_per_s": batch / med,
        "speedup_vs_reference": ref / med, "peak_memory_mb": peak_memory_mb(cfg.device),
        "peak_memory_of": peak_memory_of(cfg.device),
    })
    record_row(benchmark.name, med, dict(benchmark.extra_info))


@pytest.mark.parametrize("cfg", list(CPU_CONFIGS.values()), ids=list(CPU_CONFIGS))
def test_cpu_step_reference(benchmark, cfg):
    _bench(benchmark, cfg, "reference", CPU_STEPS, CPU_WARMUP)


@pytest.mark.parametrize("cfg", list(CPU_CONFIGS.values()), ids=list(CPU_CONFIGS))
def test_cpu_step_fast(benchmark, cfg):
    _bench(benchmark, cfg, "fast", CPU_STEPS, CPU_WARMUP)


@pytest.mark.parametrize("cfg", list(CPU_CONFIGS.values()), ids=list(CPU_CONFIGS))
def test_cpu_step_fast_bf16(benchmark, cfg):
    _bench(benchmark, cfg, "fast_bf16", CPU_STEPS, CPU_WARMUP)


@pytest.mark.parametrize("variant", ["fast_full_embed", "fast_bf16_full_embed"])
def test_cpu_step_mae_variants(benchmark, variant):
    """The official conv patch embedding of every patch (``--full_patch_embed``) in the fast step: what
    embedding the visible patches alone gains on the CPU."""
    _bench(benchmark, CPU_CONFIGS["cpu_mae_small"], variant, CPU_STEPS, CPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS.values()), ids=list(GPU_CONFIGS))
def test_gpu_step_reference(benchmark, cfg):
    _bench(benchmark, cfg, "reference", GPU_STEPS, GPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS.values()), ids=list(GPU_CONFIGS))
def test_gpu_step_fast(benchmark, cfg):
    _bench(benchmark, cfg, "fast", GPU_STEPS, GPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS.values()), ids=list(GPU_CONFIGS))
def test_gpu_step_fast_bf16(benchmark, cfg):
    _bench(benchmark, cfg, "fast_bf16", GPU_STEPS, GPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("variant", ["fast_shared", "fast_unfused", "fast_bf16_unfused", "fast_nchw", "fast_bf16_nchw",
                                     "fast_bf16_explicit_attn", "fast_bf16_plain_blocks", "fast_bf16_unpadded",
                                     "fast_bf16_nchw_plain_blocks", "fast_bf16_split_pool", "fast_bf16_half_student",
                                     "fast_bf16_deferred_bias"])
def test_gpu_step_mage_variants(benchmark, variant):
    """MAGE only, each against the default fast step: the opt-in shared tokenisation at reference precision, the
    VQGAN's GroupNorm + swish with torch's ops (what the fused kernel gains), the VQGAN in NCHW instead of
    channels_last (the default since run 3, where the fused norm reads NHWC in place), MAGE's attention written
    out as the official code instead of scaled_dot_product_attention, the ViT blocks' residual adds and
    LayerNorms as torch's ops instead of fused, the VQGAN's RGB conv over its 3 channels instead of 8
    (zero-padded), and each VQGAN level's last residual add and its pool as torch's two ops instead of one fused
    pass, the opt-in bf16 student weight copies written by the AdamW kernel, and the A/B proj / fc2 biases added in
    the fused add + LayerNorm; ``fast_bf16_nchw_plain_blocks`` is run 3's default bf16 step."""
    _bench(benchmark, GPU_CONFIGS["gpu_mage_base"], variant, GPU_STEPS, GPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("variant", ["fast_full_embed", "fast_bf16_full_embed", "fast_bf16_autocast_teacher",
                                     "fast_plain_blocks", "fast_bf16_plain_blocks", "fast_bf16_fold_clip",
                                     "fast_bf16_half_student", "fast_bf16_deferred_bias",
                                     "fast_bf16_half_student_deferred_bias"])
@pytest.mark.parametrize("cfg", [GPU_CONFIGS["gpu_mae_base"], GPU_CONFIGS["gpu_mae_large"]],
                         ids=["gpu_mae_base", "gpu_mae_large"])
def test_gpu_step_mae_variants(benchmark, cfg, variant):
    """MAE only: the official conv patch embedding of every patch (``--full_patch_embed``) instead of one GEMM
    over the visible patches, (bf16) the teacher casting its fp32 weights on every call instead of the pre-cast
    copy, the residual adds and LayerNorms as torch's ops instead of fused (what each default gains), and (bf16)
    the opt-in clip folded into the fused AdamW step, the opt-in bf16 student weight copies written by the
    AdamW kernel and the A/B proj / fc2 biases added in the fused add + LayerNorm, alone and with the copies (what
    each would gain)."""
    _bench(benchmark, cfg, variant, GPU_STEPS, GPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("variant", ["fast_serial", "fast_bf16_serial"])
@pytest.mark.parametrize("cfg", [GPU_CONFIGS["gpu_mae_base"], GPU_CONFIGS["gpu_mage_base"]],
                         ids=["gpu_mae_base", "gpu_mage_base"])
def test_gpu_step_teacher_not_overlapped(benchmark, cfg, variant):
    """The fast step with the teacher after the student on one stream: what the side-stream overlap gains."""
    _bench(benchmark, cfg, variant, GPU_STEPS, GPU_WARMUP)


@needs_gpu
@pytest.mark.parametrize("cfg", [GPU_CONFIGS["gpu_mae_base"], GPU_CONFIGS["gpu_mage_base"]],
                         ids=["gpu_mae_base", "gpu_mage_base"])
def test_gpu_step_compiled_reference(benchmark, cfg):
    _bench(benchmark, cfg, "compiled_reference", GPU_STEPS, GPU_WARMUP)
