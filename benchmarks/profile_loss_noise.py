"""Where the time of the fused loss / noise ops goes on a GPU: host overhead vs kernels.

    python3 benchmarks/profile_loss_noise.py --out /tmp/profile.txt

For each op (fused loss forward+backward at 64x129x768 fp32, batch noise at 64x3x256x256) it reports:
- ``eager_ms``: median wall time of one synchronised call, as ``bench_loss_noise.py`` measures it;
- ``graph_ms``: the same call captured once in a CUDA graph and replayed (no Python, no launch overhead):
  what the kernels alone cost, i.e. the op's floor inside the CUDA-graph step; ``graph_GB_per_s`` and
  ``of_3_TB_per_s``: that time over the fewest bytes the op must move (the ">= 80 % of bandwidth" target);
- the torch.profiler table of the eager call (CUDA kernels and CPU ops), to name the overhead.
Needs CUDA; prints a one-line reason and exits 0 without it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _median_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def _graph_ms(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _median_ms(g.replay, reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="write the report here too")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_loss_noise: no CUDA device; nothing to profile")
        return 0
    from unlearn_fast.ops import retain_forget_l2_loss, sample_batch_noise
    from unlearn_fast.ops.backend import choose_backend

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(64, 129, 768, device=dev, generator=g).requires_grad_(True)
    guide, ng = torch.randn_like(x), torch.randn_like(x)
    is_forget = torch.arange(64, device=dev) % 2 == 0
    grad_out = torch.ones((), device=dev)

    def loss_step():
        r, f = retain_forget_l2_loss(x, guide, ng, is_forget)
        (gx,) = torch.autograd.grad(r + 0.2 * f, x, grad_out)
        return gx

    images = torch.rand(64, 3, 256, 256, device=dev)
    step = torch.zeros((), dtype=torch.int64, device=dev)

    def noise_step():
        return sample_batch_noise(images, seed=0, step=step)

    lines, results = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "backend": choose_backend(torch.device(dev), "retain_forget_l2_loss")}
    # the fewest bytes each op must move, as bench_loss_noise.py counts them (20 B and 8 B per fp32 element)
    ops = (("loss_fwd_bwd_64x129x768_fp32", loss_step, x.numel() * 20),
           ("noise_64x3x256x256", noise_step, images.numel() * 8))
    for name, fn, nbytes in ops:
        res = {"eager_ms": _median_ms(fn)}
        try:
            res["graph_ms"] = _graph_ms(fn)
            res["graph_GB_per_s"] = nbytes / (res["graph_ms"] * 1e-3) / 1e9
            res["of_3_TB_per_s"] = res["graph_GB_per_s"] / 3000.0  # the lent H100's measured copy bandwidth
        except Exception as e:  # an op that cannot be captured is itself a finding
            res["graph_error"] = f"{type(e).__name__}: {e}"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        results[name] = res
        lines += [f"== {name}: {json.dumps(res)}", table]
    text = json.dumps(results, indent=2) + "\n" + "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
