"""Where the time of the fused loss / noise ops goes on a GPU: host overhead vs kernels.

    python3 benchmarks/profile_loss_noise.py --out /tmp/profile.txt

For each op (fused loss forward+backward at 64x129x768 fp32, batch noise at 64x3x256x256) it reports:
- ``eager_ms``: median wall time of one synchronised call, as ``bench_loss_noise.py`` measures it;
- ``graph_ms``: the same call captured once in a CUDA graph and replayed (no Python, no launch overhead):
  what the kernels alone cost, i.e. the op's floor inside the CUDA-graph step; ``graph_GB_per_s`` and
  ``of_3_TB_per_s``: that time over the fewest bytes the op must move (the ">= 80 % of bandwidth" target);
- the torch.profiler table of the eager call (CUDA kernels and CPU ops), to name the overhead.
Needs CUDA; without it, says so in one line and exits 1.
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


def graph_replay_ms(fn, reps=50):
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


def kernel_bandwidth() -> dict:
    """The Triton kernels alone (kernel layer, no autograd or scalar ops), graph-replayed, at the step's size and
    4x it, each beside a plain device copy of the same bytes (what the card's memory gives a kernel of that
    size: launch and tail effects included). ``of_3_TB_per_s`` is the target's measure, ``of_copy`` the
    kernel against the copy."""
    from unlearn_fast.kernels import batch_noise, retain_forget_l2 as rf

    out, dev = {}, "cuda"
    for batch in (64, 256):
        x = torch.randn(batch, 129, 768, device=dev)
        guide, ng = torch.randn_like(x), torch.randn_like(x)
        is_forget = torch.arange(batch, device=dev) % 2 == 0
        grad = torch.randn_like(x)
        one = torch.ones((), device=dev)
        images = torch.rand(batch, 3, 256, 256, device=dev)
        step = torch.zeros((), dtype=torch.int64, device=dev)
        cases = {  # name: (call, bytes moved, bytes read by the copy it is compared with)
            "loss_forward (read latent + guide, write grad)":
                (lambda: rf.retain_forget_l2_loss_forward(x, guide, ng, is_forget), x.numel() * 12),
            "loss_backward (read grad, write grad)":
                (lambda: rf.retain_forget_l2_backward(grad, is_forget, one, one, 1.0), x.numel() * 8),
            "noise_moments (read images)": (lambda: batch_noise.batch_mean_std(images), images.numel() * 4),
            "noise_draw (write noise)":
                (lambda: batch_noise.philox_standard_normal(images.shape, 0, step, device=images.device),
                 images.numel() * 4),
        }
        for name, (fn, nbytes) in cases.items():
            src = torch.empty(nbytes // 8, dtype=torch.float32, device=dev)  # a copy moving nbytes in all
            dst = torch.empty_like(src)
            ms, copy_ms = graph_replay_ms(fn), graph_replay_ms(lambda: dst.copy_(src))
            gbs = nbytes / (ms * 1e-3) / 1e9
            out[f"{name}, batch {batch}"] = {"graph_ms": ms, "MB": nbytes / 1e6, "GB_per_s": gbs,
                                              "of_3_TB_per_s": gbs / 3000.0, "copy_ms": copy_ms,
                                              "of_copy": copy_ms / ms}
    return out


def graph_rows(cases: dict, reps: int, nbytes=None) -> dict:
    """{case: {"ms"[, "GB_per_s"]} or {"error"}} of each callable replayed from a CUDA graph; ``nbytes(case)``,
    where given and not None, the fewest bytes the case moves. A case that fails (cannot be captured, refused
    configuration) is recorded, not raised: it is itself a finding."""
    rows = {}
    for name, fn in cases.items():
        try:
            ms = graph_replay_ms(fn, reps=reps)
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
            continue
        rows[name] = {"ms": ms}
        moved = nbytes(name) if nbytes is not None else None
        if moved is not None:
            rows[name]["GB_per_s"] = moved / (ms * 1e-3) / 1e9
    return rows


def profile_args(name: str, argv):
    """The parsed ``--out`` of a GPU profile script, or None (after one line on stderr saying so: the caller exits 1)
    without a CUDA device."""
    p = argparse.ArgumentParser(prog=name)
    p.add_argument("--out", default=None, help="write the report here too")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU and this machine has none; nothing profiled", file=sys.stderr)
        return None
    return a


def save_so_far(report: dict, out) -> None:
    """Write ``report`` to ``out`` (when given) after each shape: a run cut short by its time cap keeps what it
    measured."""
    if out:
        with open(out, "w") as fh:
            fh.write(json.dumps(report, indent=2))


def emit(text: str, out) -> None:
    """Print the report, and write it to ``out`` when given."""
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text)


def main(argv=None) -> int:
    a = profile_args("profile_loss_noise", argv)
    if a is None:
        return 1
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
            res["graph_ms"] = graph_replay_ms(fn)
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
    results["kernels"] = kernel_bandwidth()
    text = json.dumps(results, indent=2) + "\n" + "\n".join(lines)
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
