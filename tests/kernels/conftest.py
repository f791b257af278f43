"""Run the Triton kernel tests on the CPU through Triton's interpreter when there is no GPU.

Triton picks interpreted or compiled mode when a ``@triton.jit`` function is *defined*, and its own helpers
(``tl.sum``, ``tl.zeros``, ``tl.randn``, ...) are defined when ``triton`` is first imported. So
TRITON_INTERPRET=1 must be set before anything imports triton. Importing torch does not import triton
(checked with torch 2.14 / triton 3.8), nor does importing unlearn_fast, except ``unlearn_fast.kernels``
(``unlearn_fast.kernels.extension`` included, as it lives in that package). This conftest is loaded when
pytest reaches tests/kernels, so a test module collected earlier that imports triton at module level breaks
interpretation; that is detected below and reported as a failure with the fix, rather than run wrongly.
With a CUDA GPU the tests run compiled on the GPU (TRITON_INTERPRET is left alone).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

_TRITON_IMPORTED_BEFORE = "triton" in sys.modules
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreting_helpers() -> bool:
    import triton.language as tl
    return type(tl.sum).__name__ != "JITFunction"  # InterpretedFunction in interpreter mode


def kernel_device() -> str:
    """'cuda' when the kernels are compiled for a GPU, 'cpu' under the interpreter."""
    try:
        import unlearn_fast.kernels as kernels
    except Exception as e:  # the package itself must never fail to import
        pytest.fail(f"unlearn_fast.kernels failed to import: {e}")
    if not kernels.TRITON_AVAILABLE:
        pytest.skip(f"Triton unavailable: {kernels.TRITON_IMPORT_ERROR}")
    from unlearn_fast.kernels.launch_device import interpreted as _interpreted
    from unlearn_fast.kernels.retain_forget_l2 import _retain_forget_l2_forward_kernel
    if _interpreted(_retain_forget_l2_forward_kernel) and _interpreting_helpers():
        return "cpu"
    if not _interpreted(_retain_forget_l2_forward_kernel) and torch.cuda.is_available():
        return "cuda"
    if _TRITON_IMPORTED_BEFORE and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("triton was imported (by a test module collected before tests/kernels) before this conftest "
                    "could set TRITON_INTERPRET=1, so the kernels cannot be interpreted; run with "
                    "TRITON_INTERPRET=1 in the environment, or keep triton imports out of module level")
    pytest.skip("Triton kernels are compiled (TRITON_INTERPRET is not 1) and there is no CUDA GPU")


@pytest.fixture(scope="session")
def device() -> str:
    return kernel_device()
