"""Where the GPU time of one whole unlearning step goes: kernel time by category and the top kernels.

    python3 benchmarks/profile_step.py --out /tmp/profile_step.txt [--configs gpu_mage_base,gpu_mae_large]
        [--variants reference,fast_bf16]

For each configuration and variant, the eager form of the step (the reference step, or the fast eager step
at the variant's precision: the CUDA-graph step replays the same kernels) is run for a few warm-up steps,
then ``--steps`` steps under torch.profiler. It writes the summed CUDA kernel time per step split into
categories (convolution, GEMM, attention, normalisation, unlearn_fast's Triton kernels, elementwise/other),
the rate of the GEMM kernels (the profiler's FLOP count of the matrix-product ops over the GEMM kernels' time)
and the top kernels, so a step that misses its target names what bounds it. Needs CUDA; without it, says so in
one line and exits 1 (a misspelt --configs / --variants entry is named first, exit 2).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys

import torch

from step_harness import GPU_CONFIGS, batch_for, setup_for_variant, variant_words
from unlearn_fast.train.lr_schedule import set_lr
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_reference import reference_step

# first matching rule wins; kernel names differ across cuDNN / cuBLAS / CUTLASS versions, so substrings
CATEGORIES = [
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("convolution", ("conv", "implicit_gemm", "wgrad", "dgrad", "winograd", "nchwToNhwc", "nhwcToNchw")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "matmul", "splitK", "nvjet")),  # nvjet: cuBLASLt's sm90
    ("normalisation", ("group_norm", "layer_norm", "GroupNorm", "LayerNorm", "norm_kernel", "welford")),
    ("unlearn_fast triton", ("_retain_forget", "_batch_moments", "_philox", "_noise", "_multi_map", "_finalize",
                             "_rank_within")),
    ("reduction", ("reduce_kernel", "Reduce")),
]


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
GEMM_FLOPS_KEY = "__gemm_flops__"
BF16_PEAK_TFLOPS = 798  # 8192^3 bf16 matmul on the lent H100 (device KINDS.md, 2026-11-13)


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "elementwise/other"


def variant_problem(variant: str):
    """None for a variant this script profiles (``reference``, ``fast``, ``fast_bf16``, either fast one followed by
    :data:`step_harness.VARIANT_WORDS`), else what is wrong with it."""
    if variant == "reference":
        return None
    if variant not in ("fast", "fast_bf16") and not variant.startswith("fast_"):
        return f"unknown variant {variant!r}: reference, fast, fast_bf16 or one of those + _<word>"
    try:
        variant_words(variant)
    except ValueError as e:
        return str(e)
    return None


def eager_runner(cfg, variant: str):
    dev = torch.device(cfg.device)
    fast = variant.startswith("fast")
    setup = setup_for_variant(cfg, variant)  # the benchmark's variants, suffixes included (_nchw, _unfused, ...)
    set_lr(setup.optimizer, 1e-5)
    images, is_forget = batch_for(cfg, setup.student)
    if dev.type == "cuda":
        images = images.pin_memory()  # as the benchmarks (and a DataLoader with pin_memory) feed it
    step_fn = fast_step if fast else reference_step
    return lambda step: step_fn(setup, images, is_forget, step)


def kernel_times(run, steps: int, warmup: int = 3):
    """{kernel name: (total microseconds per step, calls per step)} over ``steps`` profiled steps."""
    for i in range(warmup):
        run(i)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_flops=True) as prof:
        for i in range(steps):
            run(warmup + i)
        torch.cuda.synchronize()
    out = {}
    gemm_flops = 0
    for ev in prof.key_averages():
        if ev.key in GEMM_OPS:  # CPU-side matrix-product ops carry the FLOPs of the GEMM kernels they launch
            gemm_flops += getattr(ev, "flops", 0) or 0
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        # kernels only: a CPU op's device time repeats the time of the kernels it launched, and so does a GPU-side
        # user annotation ("Optimizer.step#AdamW.step": 4.0 ms counted twice in run 2's MAE-L profile)
        annotation = getattr(ev, "is_user_annotation", False) or ev.key.startswith(("Optimizer.", "ProfilerStep#"))
        if us and not annotation and getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out[ev.key] = (us / steps, ev.count / steps)
    out[GEMM_FLOPS_KEY] = (gemm_flops / steps, 0.0)
    return out


def report(name: str, times) -> dict:
    times = dict(times)
    gemm_flops = times.pop(GEMM_FLOPS_KEY, (0.0, 0.0))[0]
    by_cat = collections.defaultdict(float)
    for k, (us, _) in times.items():
        by_cat[category(k)] += us
    total = sum(by_cat.values())
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:30]
    lines = [f"== {name}: {total / 1e3:.2f} ms of kernels per step, {sum(c for _, c in times.values()):.0f} launches"]
    lines += [f"   {cat:22s} {us / 1e3:8.2f} ms  {100 * us / max(total, 1e-9):5.1f} %"
              for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    gemm_us = by_cat.get("gemm", 0.0)
    gemm_tflops = gemm_flops / (gemm_us * 1e-6) / 1e12 if gemm_us and gemm_flops else 0.0
    lines.append(f"   GEMM rate: {gemm_flops / 1e12:.2f} TFLOP per step of matrix products in "
                 f"{gemm_us / 1e3:.2f} ms of GEMM kernels = {gemm_tflops:.0f} TFLOP/s "
                 f"({100 * gemm_tflops / BF16_PEAK_TFLOPS:.0f} % of {BF16_PEAK_TFLOPS} TFLOP/s, the bf16 matrix "
                 "product measured on this kind of H100)")
    lines.append("   top kernels (ms per step, calls per step):")
    lines += [f"   {us / 1e3:8.3f} {calls:6.0f}  {category(k):20s} {k[:110]}" for k, (us, calls) in top]
    print("\n".join(lines), flush=True)
    return {"name": name, "kernel_ms_per_step": total / 1e3, "gemm_tflop_per_step": gemm_flops / 1e12,
            "gemm_tflops": gemm_tflops,
            "by_category_ms": {c: v / 1e3 for c, v in by_cat.items()},
            "top": [{"kernel": k, "ms": us / 1e3, "calls": calls} for k, (us, calls) in top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="text report; a .json with the same numbers is written beside it")
    ap.add_argument("--configs", default="gpu_mage_base,gpu_mae_large")
    ap.add_argument("--variants", default="reference,fast,fast_bf16")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    # names checked before anything runs: a misspelt variant raised inside the loop after the profiles before it
    # (and one without "fast" profiled the reference step under its name)
    for cfg_name in args.configs.split(","):
        if cfg_name not in GPU_CONFIGS:
            ap.error(f"unknown --configs entry {cfg_name!r}; valid: {', '.join(GPU_CONFIGS)}")
    for variant in args.variants.split(","):
        problem = variant_problem(variant)
        if problem:
            ap.error(f"--variants: {problem}")
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU and this machine has none; nothing measured", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True  # as the benchmarks and the reference trainer
    results = []
    with open(args.out, "w") as f, contextlib.redirect_stdout(f):
        for cfg_name in args.configs.split(","):
            for variant in args.variants.split(","):
                results.append(report(f"{cfg_name} {variant}",
                                      kernel_times(eager_runner(GPU_CONFIGS[cfg_name], variant), args.steps)))
                torch.cuda.empty_cache()
                # each profile on disk as it ends: a cap that stops the script keeps the ones before
                f.flush()
                with open(args.out.rsplit(".", 1)[0] + ".json", "w") as js:
                    json.dump(results, js, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
