"""Where a Triton launcher's tensors may live: on a CUDA device, or anywhere when Triton runs its kernels
in the interpreter (``TRITON_INTERPRET=1``, set before the kernels are defined, as the CPU tests do)."""
from __future__ import annotations

import torch


def interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) was defined under Triton's interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch_device(in_interpreter: bool, device: torch.device, what: str) -> None:
    """ValueError unless a module's kernels can run on ``device``; ``in_interpreter``: :func:`interpreted` of
    one of its kernels, taken when the module is imported (tests may wrap the kernels later); ``what`` names
    the tensors ("x is", "maps are")."""
    if device.type != "cuda" and not in_interpreter:
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 before import), {what} on "
                         f"{device}")


__all__ = ["interpreted", "check_launch_device"]
