"""The forget target's input: noise with the batch's statistics (REFERENCE.md §1.2 step 4).

- ``normal``:   clamp(randn * std + mean, low, high); one *unbiased* std and one mean over every element
                of the whole batch (two scalars that mix forget and retain images and all channels).
- ``uniform``:  U[0, 1), no clamp.
- ``constant``: the batch mean everywhere.

Two ways to draw:

- ``generator=`` (or nothing): the reference semantics with a ``torch.Generator`` (the test oracle, and
  what the eager reference-semantics step uses).
- ``seed=, step=``: counter-based Philox draws keyed by (seed, step, element index), fused on CUDA
  (moments, their fp64 combine, then draws + affine + clamp: three launches, nothing else); the noise of
  step k does not depend on what ran before, and ``step`` may be a device tensor so a captured CUDA graph
  replays with a new step. On the CPU the same keying is done with a ``torch.Generator`` seeded from
  (seed, step): reproducible, but not the same numbers as the GPU stream (unless
  ``UNLEARN_FAST_BACKEND=triton`` forces the Triton kernels, which on the CPU need ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Tuple, Union

import torch

from .backend import choose_backend, eager_under_compile, triton_kernels

NOISE_KINDS = ("normal", "uniform", "constant")


def _check_kind(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")


def _check_key(value, name: str, bits: int):
    """``seed`` / ``step`` as the Philox key and counter take them, checked the same way on every backend:
    a python (or numpy) integer in [0, 2^bits), or a 1-element integer tensor (its value is not read here: it
    may live on the GPU, and is taken mod 2^bits there)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an int or a 1-element integer tensor, got {value.dtype} of shape "
                             f"{tuple(value.shape)}")
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}") from None
    if not 0 <= value < 2 ** bits:
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {value}")
    return value


@eager_under_compile
def batch_mean_std(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over all elements, as fp32 0-d tensors (fp64 accumulation on CPU)."""
    if not torch.is_tensor(images) or images.numel() == 0:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a non-empty tensor, got {got}")
    if not images.is_floating_point():  # refused on every backend (the Triton kernels take no integers)
        raise TypeError(f"images must be floating point, got {images.dtype}")
    x = images.detach()
    if choose_backend(x.device, "batch_mean_std") == "triton":  # CUDA, or forced (CPU: Triton's interpreter)
        return triton_kernels().batch_mean_std(x)
    acc = x.double() if x.device.type == "cpu" else x.float()
    return acc.mean().float(), acc.std().float()


def sample_batch_noise_reference(images: torch.Tensor, kind: str = "normal",
                                 generator: Optional[torch.Generator] = None,
                                 low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """The reference formulas with torch's generator."""
    _check_kind(kind)
    x = images.detach()
    if kind == "uniform":
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    mean = x.mean()
    if kind == "constant":
        return torch.zeros_like(x) + mean
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.clamp(z * x.std() + mean, low, high)


def _cpu_generator(seed: int, step: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    # splitmix-style mixing so that nearby (seed, step) pairs give unrelated streams
    g.manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63))
    return g


@eager_under_compile
def sample_batch_noise(images: torch.Tensor, kind: str = "normal", generator: Optional[torch.Generator] = None,
                       *, seed: Optional[int] = None, step: Union[int, torch.Tensor, None] = None,
                       low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Noise shaped like ``images [N, C, H, W]`` with the batch's statistics (see module docstring).

    ``low/high``: the image range the normal noise is clamped to ([0, 1] for MAE/MAGE inputs).
    ``seed``: an int in [0, 2^64); ``step``: an int in [0, 2^32) (or 1-element integer tensors), on every backend.
    """
    _check_kind(kind)
    if not torch.is_tensor(images) or images.numel() == 0:
        raise ValueError("images must be a non-empty tensor")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    if not all(isinstance(v, numbers.Real) or (torch.is_tensor(v) and v.numel() == 1) for v in (low, high)):
        raise TypeError(f"low and high must be numbers, got {type(low).__name__} and {type(high).__name__}")
    low, high = float(low), float(high)  # python or numpy numbers, or 1-element tensors: the kernels take floats
    if not low <= high:
        raise ValueError(f"the clamp range must have low <= high, got low={low}, high={high}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            hint = (" (the counter-based draw takes keywords: sample_batch_noise(images, kind, seed=..., step=...))"
                    if isinstance(generator, numbers.Integral) else "")
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}{hint}")
        if generator.device.type != images.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {images.device}")
    if seed is None:
        if step is not None:
            raise ValueError("step= needs seed=")
        return sample_batch_noise_reference(images, kind, generator, low, high)
    if generator is not None:
        raise ValueError("pass either generator= or seed=/step=, not both")
    seed = _check_key(seed, "seed", 64)
    step = _check_key(0 if step is None else step, "step", 32)
    x = images.detach()
    if choose_backend(x.device, "sample_batch_noise") == "triton":
        # three launches (moments, combine, draws); python-int seed/step travel as kernel arguments
        return triton_kernels().philox_batch_noise(x, seed, step, kind=kind, low=low, high=high)
    seed, step = (int(v.item()) % 2 ** bits if torch.is_tensor(v) else v  # CPU path: the sync is harmless
                  for v, bits in ((seed, 64), (step, 32)))
    g = _cpu_generator(seed, step, x.device)
    return sample_batch_noise_reference(x, kind, g, low, high)
