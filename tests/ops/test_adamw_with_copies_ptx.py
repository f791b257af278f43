"""The AdamW-with-copies kernel reaches its tensors through integer addresses, whose alignment Triton cannot see:
without the hint on the converted pointer every access is a 4-byte load or store (measured: no vector access at
all). Compiled offline for an H100 (sm_90, tests/helpers.offline_ptx), the aligned form must issue 16-byte vector
loads and stores for the weights, moments and gradients of a whole chunk, and the unaligned form none."""
from __future__ import annotations

import re

from tests.helpers import offline_ptx

SIGNATURE = {"addresses_ptr": "*i64", "numel_ptr": "*i64", "group_ptr": "*i32", "chunk_tensor_ptr": "*i32",
             "chunk_start_ptr": "*i64", "lr_ptr": "*fp32", "wd_ptr": "*fp32", "coef_ptr": "*fp32",
             "num_tensors": "i32", "beta1": "fp32", "beta2": "fp32", "log2_beta1": "fp32", "log2_beta2": "fp32",
             "eps": "fp32", "GRAD_KIND": "constexpr", "COPY_KIND": "constexpr", "ALIGNED": "constexpr",
             "BLOCK": "constexpr"}


def _vector_accesses(aligned: bool):
    ptx = offline_ptx("unlearn_fast.kernels.adamw_copy", "_adamw_copy_kernel", SIGNATURE,
                      {"GRAD_KIND": 1, "COPY_KIND": 1, "ALIGNED": aligned, "BLOCK": 2048}, num_warps=4)
    return len(re.findall(r"ld\.global[^\n]*\.v4", ptx)), len(re.findall(r"st\.global[^\n]*\.v4", ptx))


def test_aligned_kernel_uses_16_byte_accesses():
    # a whole chunk at 16 elements per thread: weight and both moments 4 x 16 B each, the bf16 gradient 2 x 16 B
    loads, stores = _vector_accesses(True)
    assert loads >= 14 and stores >= 14, (loads, stores)
    assert _vector_accesses(False) == (0, 0)
