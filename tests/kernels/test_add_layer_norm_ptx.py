"""The fused add + LayerNorm's kernels with the branch's bias (kernels/add_layer_norm.py, ``branch_bias``) compiled
for an H100 (sm_90, offline: tests/helpers.offline_ptx) at a ViT-L row (D = 1024, 4 rows a program): the backward's
third accumulator (the bias gradient beside the norm's two) fits in registers, no local-memory spill, as without
it. Measured (triton 3.8 / 3.6): forward 587 -> 616 / 595 -> 624, backward 808 -> 882 / 819 -> 910 instructions."""
from __future__ import annotations

import pytest

from tests.helpers import offline_ptx, ptx_instructions

BACKWARD = {"gh_ptr": "*bf16", "gs_ptr": "*fp32", "s_ptr": "*fp32", "w_ptr": "*fp32", "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32", "gx_ptr": "*fp32", "gbranch_ptr": "*bf16", "partial_ptr": "*fp32", "n_rows": "i32",
            "D": "i32", "rows_per_program": "i32", "HAS_GS": "constexpr", "HAS_WEIGHT": "constexpr",
            "WRITE_GX": "constexpr", "WRITE_GBRANCH": "constexpr", "GRAD_WEIGHT": "constexpr",
            "GRAD_BIAS": "constexpr", "GRAD_BRANCH_BIAS": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
FORWARD = {"x_ptr": "*fp32", "branch_ptr": "*bf16", "bb_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
           "s_ptr": "*fp32", "h_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "n_rows": "i32", "D": "i32",
           "eps": "fp32", "HAS_BRANCH": "constexpr", "HAS_BRANCH_BIAS": "constexpr", "HAS_WEIGHT": "constexpr",
           "HAS_BIAS": "constexpr", "ROWS": "constexpr", "BLOCK_D": "constexpr"}


@pytest.mark.parametrize("kernel,signature,flag", [
    ("_add_layer_norm_forward_kernel", FORWARD, "HAS_BRANCH_BIAS"),
    ("_add_layer_norm_backward_kernel", BACKWARD, "GRAD_BRANCH_BIAS")])
def test_branch_bias_kernels_compile_for_sm90_without_spilling(kernel, signature, flag):
    common = {k: True for k, v in signature.items() if v == "constexpr"}
    common.update(ROWS=4, BLOCK_D=1024)
    sizes = {}
    for on in (False, True):
        ptx = offline_ptx("unlearn_fast.kernels.add_layer_norm", kernel, signature, dict(common, **{flag: on}),
                          num_warps=8)
        assert ".local" not in ptx, f"{kernel} with {flag}={on} spills to local memory"
        sizes[on] = len(ptx_instructions(ptx))
    print(kernel, sizes)
    assert sizes[False] < sizes[True] < 1.25 * sizes[False]  # the bias's work is there, and small
