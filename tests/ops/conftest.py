"""Fixtures shared by the op tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels; skip where they cannot run (compiled Triton without a GPU)."""
    import unlearn_fast.kernels as kernels
    if not kernels.TRITON_AVAILABLE:
        pytest.skip(f"Triton unavailable: {kernels.TRITON_IMPORT_ERROR}")
    from unlearn_fast.kernels.launch_device import interpreted
    from unlearn_fast.kernels.retain_forget_l2 import _retain_forget_l2_forward_kernel
    if not torch.cuda.is_available() and not interpreted(_retain_forget_l2_forward_kernel):
        pytest.skip("Triton kernels are compiled and there is no GPU")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
