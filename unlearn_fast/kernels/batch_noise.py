"""Fused batch-noise sampling (REFERENCE.md §1.2 step 4): batch moments and counter-based Philox draws.

Math, for an input batch ``x`` (any shape, flattened in C order, ``numel`` elements)::

    mean, std = mean(x), std(x)  over all elements, std unbiased (std of 1 element is nan, as torch)
    normal:   noise[k] = clamp(z[k] * std + mean, low, high),   z[k] ~ N(0, 1)
    uniform:  noise[k] = u[k] ~ U[0, 1)                         (no clamp)
    constant: noise[k] = mean

Moments: each program reduces one block to (count, mean, M2) in fp32 (two passes over registers); the
blocks are combined in fp64 by torch with the parallel form of Chan's formula,
``M2 = Σ_b M2_b + Σ_b n_b (mean_b - mean)^2``. No host sync; results are fp32 0-d tensors.

Philox keying (Triton's Philox4x32-10 as used by ``tl.randn`` / ``tl.rand``), for element k of step s::

    key     = (seed mod 2^64) as two 32-bit words (lo, hi)
    counter = (k, s mod 2^32, 0, 0)           # k = flat element index, k < 2^32
    z[k]    = Box-Muller(cos) of the first two output words    (tl.randn)
    u[k]    = first output word scaled to [0, 1)                (tl.rand)

So a (seed, step, index) triple names one counter: different steps are disjoint counter ranges of the same
key (independent streams), and step s's noise never depends on what ran before (no generator state).
``seed`` and ``step`` may be int64 device tensors; the kernel loads them, so a captured CUDA graph replays
with a new step after ``step_tensor.fill_(s)``.

Dtypes: ``x`` fp32 / fp16 / bf16 / fp64; noise is computed in fp32 and stored in ``out``'s dtype (default
``x``'s). Uniform draws are capped below 1 in that dtype so that rounding never yields 1.0. The noise kernel
is launched without FMA contraction so that ``philox_batch_noise == clamp(philox_standard_normal * std +
mean, low, high)`` holds bit for bit in fp32 (torch rounds the product and the sum separately).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

NOISE_KINDS = ("normal", "uniform", "constant")
_KIND_ID = {"normal": 0, "uniform": 1, "constant": 2}
_STANDARD = 3  # internal kind: z alone (philox_standard_normal)
_MAX_NUMEL = 2 ** 32  # the element index is the counter's first 32-bit word
_MOMENT_BLOCK = 4096
_NOISE_BLOCK = 1024
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# largest value below 1 in each output dtype: keeps U[0, 1) half-open after rounding
_BELOW_ONE = {torch.float32: 1.0 - 2.0 ** -24, torch.float16: 1.0 - 2.0 ** -11, torch.bfloat16: 1.0 - 2.0 ** -8,
              torch.float64: 1.0 - 2.0 ** -24}

IntOrTensor = Union[int, torch.Tensor]


@triton.jit
def _batch_moments_forward_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, numel, BLOCK: tl.constexpr):
    # one block -> (count, mean, M2), fp32
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    count = tl.sum(mask.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / count
    dev = tl.where(mask, x - mean, 0.0)
    tl.store(count_ptr + pid, count)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, tl.sum(dev * dev, axis=0))


@triton.jit
def _philox_batch_noise_forward_kernel(out_ptr, seed_ptr, step_ptr, mean_ptr, std_ptr, numel, low, high,
                                       below_one, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if KIND == 2:  # constant
        v = tl.zeros((BLOCK,), tl.float32) + tl.load(mean_ptr)
    else:
        seed = tl.load(seed_ptr)  # int64 scalar: the Philox key
        step = tl.load(step_ptr)  # int64 scalar
        counter = (step << 32) | offs  # 64-bit offset: low word = element index, high word = step mod 2^32
        if KIND == 1:  # uniform
            v = tl.minimum(tl.rand(seed, counter), below_one)
        else:
            v = tl.randn(seed, counter)
            if KIND == 0:  # normal: affine then clamp; where() keeps NaN like torch.clamp
                v = v * tl.load(std_ptr) + tl.load(mean_ptr)
                v = tl.where(v < low, low, v)
                v = tl.where(v > high, high, v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _check_device(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not _interpreted(_philox_batch_noise_forward_kernel):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 before import), "
                         f"{what} is on {device}")


def _check_input(x) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError("x must have at least one element")
    if x.dtype not in _IN_DTYPES:
        raise ValueError(f"x must be fp32, fp16, bf16 or fp64, got {x.dtype}")
    if x.numel() > _MAX_NUMEL:
        raise ValueError(f"at most 2^32 elements per draw, got {x.numel()}")
    _check_device(x.device, "x")
    return x.detach().contiguous().reshape(-1)


def batch_mean_std(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) over all elements of ``x``, as fp32 0-d tensors on x's device; no host sync."""
    flat = _check_input(x)
    numel = flat.numel()
    n_blocks = triton.cdiv(numel, _MOMENT_BLOCK)
    stats = torch.empty((3, n_blocks), device=flat.device, dtype=torch.float32)  # count, mean, M2 per block
    _batch_moments_forward_kernel[(n_blocks,)](flat, stats[0], stats[1], stats[2], numel, BLOCK=_MOMENT_BLOCK,
                                               num_warps=8)
    count, mean_b, m2_b = stats.double().unbind(0)  # [blocks] each
    mean = (count * mean_b).sum() / numel
    m2 = m2_b.sum() + (count * (mean_b - mean).square()).sum()  # Chan et al., all blocks at once
    std = (m2 / (numel - 1)).sqrt() if numel > 1 else m2 * float("nan")
    return mean.float(), std.float()


def _as_key(value: IntOrTensor, name: str, device: torch.device, bits: int) -> torch.Tensor:
    """An int64 [1] device tensor holding seed/step (the kernel loads it: graph-capturable)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a python int or a 1-element integer tensor, got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, x on {device}")
        return value.reshape(1).to(torch.int64)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a python int or an integer tensor, got {type(value).__name__}")
    if not 0 <= value < 2 ** bits:
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {value}")
    signed = value - 2 ** 64 if value >= 2 ** 63 else value  # same 64 bits, as int64
    return torch.full((1,), signed, dtype=torch.int64, device=device)


def _as_scalar(value, name: str, device: torch.device) -> torch.Tensor:
    """A fp32 [1] device tensor from a python number or a 1-element tensor (no host sync)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, x on {device}")
        return value.detach().reshape(1).to(torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def _launch_noise(out: torch.Tensor, seed_t, step_t, mean_t, std_t, kind_id: int, low: float, high: float):
    numel = out.numel()
    grid = (triton.cdiv(numel, _NOISE_BLOCK),)
    below_one = _BELOW_ONE[out.dtype]
    # no FMA contraction: z * std + mean rounds like torch's two separate ops (see the module docstring)
    _philox_batch_noise_forward_kernel[grid](out, seed_t, step_t, mean_t, std_t, numel, float(low), float(high),
                                             below_one, KIND=kind_id, BLOCK=_NOISE_BLOCK, num_warps=4,
                                             enable_fp_fusion=False)
    return out


def philox_batch_noise(x: torch.Tensor, seed: IntOrTensor, step: IntOrTensor, kind: str = "normal",
                       mean=None, std=None, low: float = 0.0, high: float = 1.0,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Noise shaped like ``x``, reproducible from (seed, step, flat element index); see the module docstring.

    ``mean/std``: numbers or 0-d tensors; default :func:`batch_mean_std` of x (``std`` is used by ``normal`` only).
    ``low/high``: clamp range of ``normal``. ``out``: optional contiguous float buffer shaped like x.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    flat = _check_input(x)
    dev = flat.device
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=dev)
    elif (not torch.is_tensor(out) or out.shape != x.shape or out.device != dev or not out.is_contiguous()
          or out.dtype not in _IN_DTYPES):
        raise ValueError("out must be a contiguous float tensor with x's shape and device")
    seed_t = _as_key(seed, "seed", dev, 64)
    step_t = _as_key(step, "step", dev, 32)
    if kind != "uniform" and (mean is None or (kind == "normal" and std is None)):
        batch_mean, batch_std = batch_mean_std(flat)
        mean = batch_mean if mean is None else mean
        std = batch_std if std is None else std
    mean_t = _as_scalar(0.0 if mean is None else mean, "mean", dev)
    std_t = _as_scalar(1.0 if std is None else std, "std", dev)
    return _launch_noise(out, seed_t, step_t, mean_t, std_t, _KIND_ID[kind], low, high)


def philox_standard_normal(shape: Sequence[int], seed: IntOrTensor, step: IntOrTensor,
                           device: Union[str, torch.device]) -> torch.Tensor:
    """The z of :func:`philox_batch_noise` (mean 0, std 1, no clamp), fp32, for the plain-PyTorch twin:
    ``philox_batch_noise(x, ...) == clamp(philox_standard_normal(x.shape, ...) * std + mean, low, high)``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        if s < 0:
            raise ValueError(f"shape must be non-negative, got {shape}")
        numel *= s
    if numel > _MAX_NUMEL:
        raise ValueError(f"at most 2^32 elements per draw, got {numel}")
    _check_device(device, "the requested device")
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    seed_t = _as_key(seed, "seed", device, 64)
    step_t = _as_key(step, "step", device, 32)
    return _launch_noise(out, seed_t, step_t, out, out, _STANDARD, 0.0, 0.0)  # mean/std pointers unused


__all__ = ["NOISE_KINDS", "batch_mean_std", "philox_batch_noise", "philox_standard_normal"]
