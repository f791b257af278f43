"""The VQGAN encoder's residual add + 2x2 average pool on a GPU, at the four maps that are pooled (batch 64 + 32:
student and teacher tokenisations), bf16, NCHW and channels_last: the fused op against torch's add then
``avg_pool2d``, each replayed from a CUDA graph (kernels alone). Reports milliseconds and the bandwidth over the
fused pass's fewest bytes (read a and b, write the pooled quarter), for the ``split_pool`` A/B of the step.

    python3 benchmarks/profile_residual_pool.py --out /tmp/pool.json

Needs CUDA; without it, says so in one line and exits 1.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from profile_loss_noise import emit, graph_rows, profile_args, save_so_far

SHAPES = ((96, 128, 256), (96, 128, 128), (96, 256, 64), (96, 256, 32))  # (images, channels, side) entering a pool


def _rows(n: int, c: int, side: int, layout: str) -> dict:
    """The fused op and torch's two ops on one pair of random bf16 maps, graph-replayed."""
    from unlearn_fast.ops import add_avg_pool2d
    x, h = (torch.randn(n, c, side, side, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if layout == "nhwc":
        x, h = (t.contiguous(memory_format=torch.channels_last) for t in (x, h))
    cases = {"fused": lambda: add_avg_pool2d(x, h), "torch_add_then_pool": lambda: F.avg_pool2d(x + h, 2, 2)}
    fewest = x.numel() * x.element_size() * 9 // 4  # read two maps, write a quarter of one
    return graph_rows(cases, 20, lambda name: fewest)


def main(argv=None) -> int:
    a = profile_args("profile_residual_pool", argv)
    if a is None:
        return 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n, c, side in SHAPES:
        for layout in ("nchw", "nhwc"):
            report[f"{n}x{c}x{side}x{side} bf16 {layout}"] = _rows(n, c, side, layout)
            torch.cuda.empty_cache()
        save_so_far(report, a.out)
    emit(json.dumps(report, indent=2), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
