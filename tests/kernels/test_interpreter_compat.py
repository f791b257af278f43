"""unlearn_fast/kernels/interpreter_compat.py: the kernels under Triton's interpreter on a current numpy.

Triton < 3.7's interpreter made a kernel's runtime scalar a Python int with int(array) on a one-element
array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
loop over a runtime bound then failed under TRITON_INTERPRET=1 (torch 2.11 / triton 3.6 / numpy 2.4: 560
tests of the suite). Compiled kernels never take that path; on a GPU the kernel below runs compiled.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from unlearn_fast.kernels import TRITON_AVAILABLE  # noqa: E402  (imports the kernels: the patch is applied)
from unlearn_fast.kernels.interpreter_compat import patch_interpreter_index  # noqa: E402
from unlearn_fast.kernels.launch_device import interpreted  # noqa: E402


@triton.jit(do_not_specialize=["n"])
def _sum_in_blocks_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):  # a runtime bound: the interpreter asks n for its int (__index__)
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def test_a_loop_over_a_runtime_bound_runs():
    if not TRITON_AVAILABLE:
        pytest.skip("unlearn_fast.kernels could not import Triton")
    device = "cpu" if interpreted(_sum_in_blocks_kernel) else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton kernels are compiled (TRITON_INTERPRET is not 1) and there is no CUDA GPU")
    x = torch.arange(37, dtype=torch.float32, device=device)
    out = torch.zeros(1, device=device)
    _sum_in_blocks_kernel[(1,)](x, out, 37, BLOCK=8)  # 5 blocks, the last one partial
    assert out.item() == sum(range(37))


def test_the_patch_is_applied_once():
    # applied (or found not needed) when unlearn_fast.kernels was imported: a second call changes nothing
    assert patch_interpreter_index() is False
