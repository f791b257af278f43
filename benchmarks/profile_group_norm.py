"""The fused GroupNorm + swish of the VQGAN on a GPU, at the tokenizer's own shapes: NCHW, channels_last with each
``groups_per_program`` and flat or 3-D tiles at the 128-channel maps (the encoder's costliest), and torch's GroupNorm + SiLU + cast under bf16 autocast, each replayed
from a CUDA graph (kernels alone). Reports milliseconds and the bandwidth over the fewest bytes (read x twice:
statistics then output, write the output once), to tune the channels_last kernel's tile
(``kernels/group_norm_silu_nhwc._NHWC_SECTOR_BYTES``, flat tiles) and to see whether NHWC costs the norm anything.

    python3 benchmarks/profile_group_norm.py --out /tmp/gn.json

Needs CUDA; without it, says so in one line and exits 1.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from profile_loss_noise import emit, graph_rows, profile_args, save_so_far

# (images, channels, side): the encoder's four widest maps at batch 64 + 32 (student and teacher tokenisations)
SHAPES = ((96, 128, 256), (96, 128, 128), (96, 256, 64), (96, 512, 16))
GROUPS = 32


def _cases(x, weight, bias):
    from unlearn_fast.kernels.group_norm_silu import group_norm_silu_forward
    cases = {"nchw": lambda: group_norm_silu_forward(x, GROUPS, weight, bias, 1e-6, True, torch.bfloat16)}
    cl = x.contiguous(memory_format=torch.channels_last)
    cases["nhwc_default"] = lambda: group_norm_silu_forward(cl, GROUPS, weight, bias, 1e-6, True, torch.bfloat16)
    gpp = 1
    while x.shape[1] == 128 and gpp <= GROUPS:  # the sweep at the widest maps (4 channels per group), where it counts
        for flat in (True, False):  # flat tiles (16-byte accesses) or 3-D ones (8-byte at 4 bf16 channels)
            cases[f"nhwc_gpp{gpp}_{'flat' if flat else '3d'}"] = (lambda g, f: lambda: group_norm_silu_forward(
                cl, GROUPS, weight, bias, 1e-6, True, torch.bfloat16, groups_per_program=g, flat_tiles=f))(gpp, flat)
        gpp *= 2

    def torch_ops():  # what the reference step runs under bf16 autocast: fp32 norm, SiLU, cast for the next conv
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-6)).to(torch.bfloat16)
    cases["torch_group_norm_silu"] = torch_ops
    return cases


def main(argv=None) -> int:
    a = profile_args("profile_group_norm", argv)
    if a is None:
        return 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n, c, side in SHAPES:
        x = torch.randn(n, c, side, side, device="cuda", dtype=torch.bfloat16)
        weight, bias = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        nbytes = x.numel() * x.element_size() * 3
        report[f"{n}x{c}x{side}x{side} bf16"] = graph_rows(_cases(x, weight, bias), 20, lambda name: nbytes)
        del x
        torch.cuda.empty_cache()
        save_so_far(report, a.out)
    emit(json.dumps(report, indent=2), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
