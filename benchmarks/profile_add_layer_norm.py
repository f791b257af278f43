"""The fused residual add + LayerNorm (``ops.add_layer_norm``) on a GPU against torch's add, fp32 LayerNorm and
cast under bf16 autocast (what a ViT block runs without it), at the encoders' shapes, forward and forward +
backward, each replayed from a CUDA graph (kernels alone). Reports milliseconds and, forward, the bandwidth over
the fewest bytes (read the fp32 stream and the bf16 branch, write the fp32 sum and the bf16 norm), to decide
whether ``--fused_block_norms`` becomes the default.

    python3 benchmarks/profile_add_layer_norm.py --out /tmp/aln.json

Needs CUDA; without it, says so in one line and exits 1.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from profile_loss_noise import emit, graph_rows, profile_args

# (rows, tokens, width): MAE-L's student batch (1 + 49 visible tokens), MAGE-B's (129 kept tokens)
SHAPES = ((64, 50, 1024), (64, 129, 768))


def _torch_block_pair(x, branch, w, b):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s = x + branch
        return s, F.layer_norm(s, (x.shape[-1],), w, b, 1e-6).to(torch.bfloat16)  # the next Linear's cast


def _fused(x, branch, w, b):
    from unlearn_fast.ops import add_layer_norm
    return add_layer_norm(x, branch, w, b, 1e-6, out_dtype=torch.bfloat16)


def _cases(n, t, d):
    x = torch.randn(n, t, d, device="cuda", requires_grad=True)
    branch = torch.randn(n, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(d, device="cuda") + 0.5).requires_grad_(True)
    b = torch.randn(d, device="cuda").requires_grad_(True)
    g_s, g_h = torch.randn_like(x), torch.randn_like(branch)
    cases = {}
    for name, fn in (("fused", _fused), ("torch", _torch_block_pair)):
        def forward(fn=fn):
            with torch.no_grad():
                return fn(x, branch, w, b)

        def forward_backward(fn=fn):
            s, h = fn(x, branch, w, b)
            return torch.autograd.grad((s, h), (x, branch, w, b), (g_s, g_h))
        cases[f"{name}_forward"] = forward
        cases[f"{name}_forward_backward"] = forward_backward
    return cases, x.numel() * (4 + 2 + 4 + 2)


def main(argv=None) -> int:
    a = profile_args("profile_add_layer_norm", argv)
    if a is None:
        return 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n, t, d in SHAPES:
        cases, forward_bytes = _cases(n, t, d)
        report[f"{n}x{t}x{d} fp32 stream + bf16 branch"] = graph_rows(
            cases, 50, lambda name: forward_bytes if name.endswith("_forward") else None)
    emit(json.dumps(report, indent=2), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
