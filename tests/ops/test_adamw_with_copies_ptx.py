"""The AdamW-with-copies kernel reaches its tensors through integer addresses, which Triton cannot see the alignment
of: without the hint on the converted pointer every access is a 4-byte load or store (measured: 102 scalar loads,
no vector access). Compiled offline for an H100 (sm_90; no GPU needed: Triton's bundled ptxas), the aligned form must
issue 16-byte vector loads and stores for the weights, moments and gradients of a whole chunk, and the unaligned
form none. Runs in a subprocess: the test session's Triton is in interpreter mode (conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unlearn_fast.kernels import adamw_copy as k

sig = {"addresses_ptr": "*i64", "numel_ptr": "*i64", "group_ptr": "*i32", "chunk_tensor_ptr": "*i32",
       "chunk_start_ptr": "*i64", "lr_ptr": "*fp32", "wd_ptr": "*fp32", "coef_ptr": "*fp32", "num_tensors": "i32",
       "beta1": "fp32", "beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32", "eps": "fp32",
       "GRAD_KIND": "constexpr", "COPY_KIND": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"}
for aligned in (True, False):
    src = ASTSource(fn=k._adamw_copy_kernel, signature=sig,
                    constexprs={"GRAD_KIND": 1, "COPY_KIND": 1, "ALIGNED": aligned, "BLOCK": 2048})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    print(int(aligned), len(re.findall(r"ld\.global[^\n]*\.v4", ptx)), len(re.findall(r"st\.global[^\n]*\.v4", ptx)))
"""


def test_aligned_kernel_uses_16_byte_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        if "ptxas" in out.stderr or "No module named 'triton.backends" in out.stderr:
            pytest.skip(f"Triton cannot compile for sm_90 offline here: {out.stderr.strip().splitlines()[-1]}")
        raise AssertionError(out.stderr[-3000:])
    counts = {int(a): (int(ld), int(st)) for a, ld, st in (line.split() for line in out.stdout.split("\n") if line)}
    # a whole chunk at 16 elements per thread: weight, both moments 4 x 16 B each, the bf16 gradient 2 x 16 B
    assert counts[1][0] >= 14 and counts[1][1] >= 14, counts
    assert counts[0] == (0, 0), counts
