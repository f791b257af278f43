"""Shared harness for the step benchmarks: build a configuration, time a step variant, keep the
reference-semantics baseline of each configuration measured once per process (same machine, same run)."""
from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict

import torch

import unlearn_fast
from unlearn_fast.train.device_prefetch import DevicePrefetcher
from unlearn_fast.train.lr_schedule import set_lr
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_graphed import GraphedUnlearnStep
from unlearn_fast.train.step_reference import reference_step
from unlearn_fast.train.unlearn_setup import build_setup


@dataclass(frozen=True)
class StepConfig:
    name: str
    model: str
    batch: int
    device: str
    model_kwargs: tuple = ()
    forget_alpha: float = 0.2


CPU_CONFIGS = {
    "cpu_mae_micro": StepConfig("cpu_mae_micro", "mae_micro", 32, "cpu"),
    "cpu_mae_small": StepConfig("cpu_mae_small", "mae_micro", 16, "cpu",
                                (("img_size", 64), ("embed_dim", 256), ("depth", 4), ("num_heads", 4))),
    "cpu_mage_micro": StepConfig("cpu_mage_micro", "mage_micro", 16, "cpu"),  # VQGAN tokenizer + MAGE encoder
}
GPU_CONFIGS = {
    "gpu_mae_base": StepConfig("gpu_mae_base", "mae_vit_base_patch16", 64, "cuda"),
    "gpu_mae_large": StepConfig("gpu_mae_large", "mae_vit_large_patch16", 64, "cuda"),
    "gpu_mage_base": StepConfig("gpu_mage_base", "mage_vit_base_patch16", 64, "cuda"),
}

if torch.cuda.is_available():
    torch.backends.cudnn.benchmark = True  # as the reference trainer (REFERENCE.md §1.4), for every variant

_models: Dict[str, torch.nn.Module] = {}
_reference_seconds: Dict[str, float] = {}


def base_model(cfg: StepConfig):
    if cfg.name not in _models:
        torch.manual_seed(0)
        _models[cfg.name] = unlearn_fast.create_model(cfg.model, **dict(cfg.model_kwargs))
    return _models[cfg.name]


def batch_for(cfg: StepConfig, model):
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.config.get("img_size", 256)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(cfg.batch, 3, size, size, generator=g)
    is_forget = torch.arange(cfg.batch) % 2 == 0  # 50/50, fixed count per batch
    return images, is_forget


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: variant words after "fast" / "fast_bf16": each changes one knob of the fast step (the CLI flag in brackets)
VARIANT_WORDS = {
    "shared": "share the tokenisation at reference precision (--share_tokenizer)",
    "serial": "the teacher after the student on one stream (--serial_teacher)",
    "unfused": "the VQGAN's GroupNorm + swish with torch's ops (--unfused_tokenizer_norms)",
    "explicit_attn": "MAGE's attention written out (--explicit_attention)",
    "full_embed": "MAE's conv patch embedding of every patch (--full_patch_embed)",
    "autocast_teacher": "the bf16 teacher casting its fp32 weights every call (no pre-cast copy)",
    "unpadded": "the VQGAN's RGB conv over its 3 channels (no zero-padding to 8)",
    "nchw": "the VQGAN encoder in NCHW, not channels_last (--nchw_tokenizer)",
    "plain_blocks": "each ViT residual add and the next LayerNorm as torch's ops (--unfused_block_norms)",
    "split_pool": "a VQGAN level's last residual add and its 2x2 pool as torch's two ops (no fused pass)",
    "fold_clip": "the clip's scale inside the fused AdamW step (opt-in fold_clip: bf16 / fp32, no loss scaling)",
    "half_student": "the student's GEMM weights as bf16 copies the AdamW kernel writes (opt-in half_student_weights)",
    "deferred_bias": "proj's and fc2's biases added in the fused add + LayerNorm, not their GEMMs (defer_branch_bias)",
}


def variant_words(variant: str) -> set:
    """The :data:`VARIANT_WORDS` of ``variant`` (``fast_bf16_nchw_plain_blocks`` -> {"nchw", "plain_blocks"}); ValueError for
    a word the harness does not know, so a misspelt variant never times the default step under another name."""
    rest = variant.split("_", 1)[1] if "_" in variant else ""
    rest = rest[len("bf16"):].lstrip("_") if rest.startswith("bf16") else rest
    words, word = set(), ""
    for part in rest.split("_") if rest else []:
        word = f"{word}_{part}" if word else part
        if word in VARIANT_WORDS:
            words.add(word)
            word = ""
    if word:
        raise ValueError(f"unknown benchmark variant {variant!r}: {word!r} is none of {sorted(VARIANT_WORDS)}")
    return words


def setup_for_variant(cfg: StepConfig, variant: str, capturable: bool = False):
    """The UnlearnSetup of ``variant``: ``reference`` | ``compiled_reference`` | ``fast`` | ``fast_bf16``, the
    fast ones followed by any :data:`VARIANT_WORDS` joined with ``_`` (``fast_bf16_nchw_plain_blocks``)."""
    fast = variant.startswith("fast")
    w = variant_words(variant) if fast else set()
    setup = build_setup(copy.deepcopy(base_model(cfg)), torch.device(cfg.device), lr=1e-5,
                        precision="bf16" if "bf16" in variant else "reference", forget_alpha=cfg.forget_alpha,
                        fast=fast, capturable=capturable, share_tokenizer="shared" in w,
                        overlap_teacher="serial" not in w, fuse_tokenizer_norms="unfused" not in w,
                        sdpa_attention="explicit_attn" not in w, visible_patch_embed="full_embed" not in w,
                        tokenizer_channels_last="nchw" not in w, fuse_block_norms="plain_blocks" not in w)
    setup.half_teacher_weights = "autocast_teacher" not in w
    setup.pad_tokenizer_input = "unpadded" not in w
    setup.fuse_residual_pools = "split_pool" not in w
    setup.fold_clip = "fold_clip" in w
    setup.half_student_weights = "half_student" in w
    setup.defer_branch_bias = "deferred_bias" in w
    return setup


def make_runner(cfg: StepConfig, variant: str) -> Callable[[int], None]:
    """``run(step)`` performs one training step of ``variant`` (see :func:`setup_for_variant`); fast variants
    run the CUDA-graph step on a GPU, fed as the trainer feeds it."""
    dev = torch.device(cfg.device)
    fast = variant.startswith("fast")
    graph = fast and dev.type == "cuda"
    setup = setup_for_variant(cfg, variant, capturable=graph)
    images, is_forget = batch_for(cfg, setup.student)
    if dev.type == "cuda":
        images = images.pin_memory()
    if fast:  # as the trainer feeds the fast steps: the next batch's copy to the GPU beside this step
        batches = DevicePrefetcher(itertools.repeat((images, is_forget)), dev)
    if graph:
        stepper = GraphedUnlearnStep(setup, cfg.batch, int(is_forget.sum()), images.shape[1:], noise_seed=0)
        return lambda step: stepper(next(batches)[0], is_forget, step, 1e-5)
    if fast:
        return lambda step: fast_step(setup, next(batches)[0], is_forget, step)
    if variant == "compiled_reference":  # the frozen front end and the encoders of both models compiled
        for m in (setup.student, setup.teacher):
            m.forward_encoder_task = torch.compile(m.forward_encoder_task)
            if hasattr(m, "vqgan"):
                m.prepare_inputs = torch.compile(m.prepare_inputs)
    set_lr(setup.optimizer, 1e-5)
    return lambda step: reference_step(setup, images, is_forget, step)


def benchmark_steps(benchmark, run: Callable[[int], None], device: str, steps: int, warmup: int) -> float:
    """Time ``run(step)`` with pytest-benchmark: ``warmup`` untimed steps, then ``steps`` synchronised rounds
    (a fresh step number each call); returns the median seconds."""
    counter = iter(range(10 ** 9))
    for _ in range(warmup):
        run(next(counter))
    sync(device)

    def one_step():
        run(next(counter))
        sync(device)

    benchmark.pedantic(one_step, rounds=steps, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


def median_seconds(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> float:
    """Median wall seconds of one synchronised call of ``fn`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_steps(run: Callable[[int], None], device: str, steps: int, warmup: int, start: int = 0) -> float:
    """Median seconds per step over ``steps`` timed steps after ``warmup`` untimed ones."""
    for i in range(warmup):
        run(start + i)
    sync(device)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        run(start + warmup + i)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_seconds(cfg: StepConfig, steps: int, warmup: int) -> float:
    if cfg.name not in _reference_seconds:
        _reference_seconds[cfg.name] = time_steps(make_runner(cfg, "reference"), cfg.device, steps, warmup)
    return _reference_seconds[cfg.name]


#: where each step benchmark appends its row the moment it ends (JSON lines), when set: pytest-benchmark writes its
#: JSON only when the whole session ends, so a group cut short by a time cap would otherwise keep no figure
ROWS_ENV = "UNLEARN_FAST_BENCH_ROWS"


def record_row(name: str, median_s: float, extra_info: dict) -> None:
    """Append ``{"name", "median_s", "extra_info"}`` to the file named by :data:`ROWS_ENV` (nothing if unset)."""
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"name": name, "median_s": median_s, "extra_info": extra_info}) + "\n")


_cpu_peak_reset = False  # whether this process's peak resident memory was reset (Linux /proc/self/clear_refs)


def reset_peak_memory(device: str) -> None:
    """Open a row's peak-memory window: call it after the reference timing, before the row's own steps (earlier
    rows' and the reference's objects collected first, so their memory is not the row's)."""
    global _cpu_peak_reset
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the process's peak resident set
        _cpu_peak_reset = True
    except OSError:
        _cpu_peak_reset = False


def peak_memory_mb(device: str) -> float:
    """The peak since :func:`reset_peak_memory`: on a GPU the CUDA allocator's (tensors only), on the CPU the whole
    process's resident set (Linux; NaN where it cannot be reset)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if _cpu_peak_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_of(device: str) -> str:
    """What :func:`peak_memory_mb` measures on ``device`` (for a row's extra_info)."""
    return "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak resident set (VmHWM)"
