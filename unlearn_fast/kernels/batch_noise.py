"""Fused batch-noise sampling (REFERENCE.md §1.2 step 4): batch moments and counter-based Philox draws.

Math, for an input batch ``x`` (any shape, flattened in C order, ``numel`` elements)::

    mean, std = mean(x), std(x)  over all elements, std unbiased (std of 1 element is nan, as torch)
    normal:   noise[k] = clamp(z[k] * std + mean, low, high),   z[k] ~ N(0, 1)
    uniform:  noise[k] = u[k] ~ U[0, 1)                         (no clamp)
    constant: noise[k] = mean

Moments: each program reduces one block to (mean, M2) in fp32 (two passes over registers; its count n_b is
implied by the block size); one more single-program kernel combines the blocks in fp64, in a fixed order
(deterministic), with the parallel form of Chan's formula, ``mean = Σ_b n_b mean_b / n``,
``M2 = Σ_b M2_b + Σ_b n_b (mean_b - mean)^2``, and writes fp32 mean and std. No host sync; results are fp32
0-d tensors. A draw is three launches (moments, combine, Philox) and nothing else.

Philox keying (Triton's Philox4x32-10 as used by ``tl.randn4x`` / ``tl.rand4x``), for element k = 4g + j of
step s::

    key     = (seed mod 2^64) as two 32-bit words (lo, hi)
    counter = (g, s mod 2^32, 0, 0)           # g = k // 4, the group of four consecutive elements
    z[k]    = value j of the four Box-Muller normals of the four output words    (tl.randn4x; compiled for a
              GPU with the hardware's cos / sin approximations, within 1e-5: _normal_pair_approx)
    u[k]    = output word j scaled to [0, 1)                                      (tl.rand4x)

So a (seed, step, index) triple names one counter: different steps are disjoint counter ranges of the same
key (independent streams), and step s's noise never depends on what ran before (no generator state).
``seed`` and ``step`` may be integer device tensors; the kernel loads them, so a captured CUDA graph replays
with a new step after ``step_tensor.fill_(s)``. Python ints are passed as kernel arguments instead (their
32-bit words as int32 bit patterns, so the kernel is compiled once and never specialised on the value): no
per-call device write, the same 64-bit key and counter, so the same numbers as the tensor form.

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

from .launch_device import check_launch_device, interpreted

NOISE_KINDS = ("normal", "uniform", "constant")
_KIND_ID = {"normal": 0, "uniform": 1, "constant": 2}
_STANDARD = 3  # internal kind: z alone (philox_standard_normal)
_MAX_NUMEL = 2 ** 32  # the element index is the counter's first 32-bit word
_MOMENT_BLOCK = 4096
_NOISE_BLOCK = 1024
_COMBINE_BLOCK = 4096  # lanes of the one-program combine: 3 dependent load rounds per pass at 38.5 M elements
# (batch 256 at 224²: 9.4 k blocks), not 10 (1024 lanes: its latency-bound loop, not bandwidth)
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# largest value below 1 in each output dtype: keeps U[0, 1) half-open after rounding
_BELOW_ONE = {torch.float32: 1.0 - 2.0 ** -24, torch.float16: 1.0 - 2.0 ** -11, torch.bfloat16: 1.0 - 2.0 ** -8,
              torch.float64: 1.0 - 2.0 ** -24}

IntOrTensor = Union[int, torch.Tensor]


@triton.jit
def _batch_moments_forward_kernel(x_ptr, partial_ptr, numel, n_blocks, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    # one block -> (mean, M2) in fp32, stored at partial[0, pid] and partial[1, pid]; its count is implied.
    # EVEN (numel a multiple of BLOCK, as 3·224²·N and 3·256²·N are): no masks, so two block reductions, not three
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        x = tl.load(x_ptr + offs).to(tl.float32)
        mean = tl.sum(x, axis=0) / BLOCK
        dev = x - mean
    else:
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(numel - pid.to(tl.int64) * BLOCK, BLOCK).to(tl.float32)  # as the combine counts it
        mean = tl.sum(x, axis=0) / count
        dev = tl.where(mask, x - mean, 0.0)
    tl.store(partial_ptr + pid, mean)
    tl.store(partial_ptr + n_blocks + pid, tl.sum(dev * dev, axis=0))


@triton.jit(do_not_specialize=["numel", "n_blocks"])
def _batch_moments_combine_kernel(partial_ptr, mean_ptr, std_ptr, numel, n_blocks, BLOCK: tl.constexpr,
                                  RBLOCK: tl.constexpr):
    # one program: Chan's parallel combine of all blocks in fp64, fixed order (deterministic)
    lanes = tl.arange(0, RBLOCK)
    total = tl.cast(numel, tl.float64)
    acc = tl.zeros((RBLOCK,), tl.float64)
    for start in range(0, n_blocks, RBLOCK):
        b = start + lanes
        ok = b < n_blocks
        count = tl.minimum(numel - b.to(tl.int64) * BLOCK, BLOCK).to(tl.float64)  # the block's element count
        mean_b = tl.load(partial_ptr + b, mask=ok, other=0.0).to(tl.float64)
        acc += tl.where(ok, count * mean_b, 0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros((RBLOCK,), tl.float64)
    for start in range(0, n_blocks, RBLOCK):
        b = start + lanes
        ok = b < n_blocks
        count = tl.minimum(numel - b.to(tl.int64) * BLOCK, BLOCK).to(tl.float64)
        mean_b = tl.load(partial_ptr + b, mask=ok, other=0.0).to(tl.float64)
        m2_b = tl.load(partial_ptr + n_blocks + b, mask=ok, other=0.0).to(tl.float64)
        shift = mean_b - mean
        acc += tl.where(ok, m2_b + count * (shift * shift), 0.0)
    m2 = tl.sum(acc, axis=0)
    var = m2 / tl.maximum(total - 1.0, 1.0)
    std = tl.where(total > 1.0, tl.sqrt(var), float("nan"))  # std of one element is nan, as torch
    tl.store(mean_ptr, mean.to(tl.float32))
    tl.store(std_ptr, std.to(tl.float32))


@triton.jit
def _approx(x, INSTRUCTION: tl.constexpr):
    """One of the GPU's approximate fp32 functions (a single special-function-unit instruction)."""
    return tl.inline_asm_elementwise(INSTRUCTION, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _normal_pair_approx(u1, u2):
    """``tl.randn4x``'s Box-Muller pair ``(r cos t, r sin t)``, ``r = sqrt(-2 ln max(u1, 1e-7))``, ``t = 2 pi u2``,
    with the hardware's cos / sin approximations in place of libdevice's exact ones (the draw was compute-bound at
    52 % of bandwidth on the H100, run 3; the kernel's sm_90 PTX as launched falls from 1152 to 435 instructions per
    thread of 8 elements, the exact functions' large-argument reduction, never taken for angles below 2 pi, among
    them). The angle is taken as ``2 pi (u2 - 1/2)`` in [-pi, pi), where the approximations' absolute error is about
    2^-20.5, with both results negated (cos(t - pi) = -cos t, sin(t - pi) = -sin t): z within 1e-5 of the exact pair
    (r <= 5.7; fp32 roundings of the angle and radius included). The logarithm stays exact: the hardware's lg2 has
    an absolute error near 1, which r = sqrt(-2 ln u1) would magnify for u1 near 1."""
    u1 = tl.maximum(1.0e-7, u1)
    radius = tl.sqrt(-2.0 * tl.log(u1))
    angle = 6.283185307179586 * (u2 - 0.5)
    return -radius * _approx(angle, "cos.approx.f32 $0, $1;"), -radius * _approx(angle, "sin.approx.f32 $0, $1;")


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo"])
def _philox_batch_noise_forward_kernel(out_ptr, seed_ptr, step_ptr, mean_ptr, std_ptr, seed_lo, seed_hi, step_lo,
                                       mean_value, std_value, numel, low, high, below_one, KIND: tl.constexpr,
                                       SEED_IN_MEMORY: tl.constexpr, STEP_IN_MEMORY: tl.constexpr,
                                       MEAN_IN_MEMORY: tl.constexpr, STD_IN_MEMORY: tl.constexpr,
                                       APPROX_MATH: tl.constexpr, BLOCK: tl.constexpr):
    # seed/step/mean/std come from device memory (graph-capturable tensors) or from scalar arguments (python
    # numbers: no per-call device write); seed_lo/seed_hi/step_lo are the int32 bit patterns of the words
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if MEAN_IN_MEMORY:
        mean = tl.load(mean_ptr).to(tl.float32)
    else:
        mean = mean_value
    if KIND == 2:  # constant
        v = tl.zeros((BLOCK,), tl.float32) + mean
    else:
        if SEED_IN_MEMORY:
            seed = tl.load(seed_ptr).to(tl.int64)  # the Philox key
        else:
            seed = (seed_hi.to(tl.int64) << 32) | (seed_lo.to(tl.int64) & 0xFFFFFFFF)
        if STEP_IN_MEMORY:
            step = tl.load(step_ptr).to(tl.int64)
        else:
            step = step_lo.to(tl.int64) & 0xFFFFFFFF
        # one Philox draw yields four values: element 4g + j takes value j of group g's draw (a draw per element
        # would run Philox four times as often and keep a quarter); the 64-bit offset's low word is the group
        # index, its high word the step mod 2^32
        groups = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        counter = (step << 32) | groups
        if KIND == 1:
            r0, r1, r2, r3 = tl.rand4x(seed, counter)
        elif APPROX_MATH:  # compiled for a GPU: the same uniforms, Box-Muller by the hardware's approximations
            r0, r1, r2, r3 = tl.rand4x(seed, counter)
            r0, r1 = _normal_pair_approx(r0, r1)
            r2, r3 = _normal_pair_approx(r2, r3)
        else:
            r0, r1, r2, r3 = tl.randn4x(seed, counter)
        v = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # [r0, r1, r2, r3] per group, in order
        if KIND == 1:  # uniform
            v = tl.minimum(v, below_one)
        else:
            if KIND == 0:  # normal: affine then clamp; where() keeps NaN like torch.clamp
                if STD_IN_MEMORY:
                    std = tl.load(std_ptr).to(tl.float32)
                else:
                    std = std_value
                v = v * std + mean
                v = tl.where(v < low, low, v)
                v = tl.where(v > high, high, v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


_IN_INTERPRETER = interpreted(_philox_batch_noise_forward_kernel)  # fixed when triton defines the kernels
# the hardware cos / sin (inline PTX) where the kernel is compiled for an NVIDIA GPU; exact functions elsewhere
_APPROX_MATH = not _IN_INTERPRETER and getattr(torch.version, "hip", None) is None


def _check_device(device: torch.device, what: str) -> None:
    check_launch_device(_IN_INTERPRETER, device, f"{what} is")


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


def _block_moments(flat: torch.Tensor) -> torch.Tensor:
    """One launch: [2, blocks] fp32, the (mean, M2) of each _MOMENT_BLOCK-element block of ``flat``."""
    numel = flat.numel()
    n_blocks = triton.cdiv(numel, _MOMENT_BLOCK)
    partial = torch.empty((2, n_blocks), device=flat.device, dtype=torch.float32)  # [mean; M2] per block
    _batch_moments_forward_kernel[(n_blocks,)](flat, partial, numel, n_blocks, BLOCK=_MOMENT_BLOCK,
                                               EVEN=numel % _MOMENT_BLOCK == 0, num_warps=8)
    return partial


def _combine_moments(partial: torch.Tensor, numel: int, mean: torch.Tensor, std: torch.Tensor,
                     rblock: int = _COMBINE_BLOCK) -> None:
    """One launch: the fp64 combine of :func:`_block_moments` into fp32 ``mean`` and ``std`` (``rblock``:
    lanes per loop step, overridable for tests of the loop)."""
    _batch_moments_combine_kernel[(1,)](partial, mean, std, numel, partial.shape[1], BLOCK=_MOMENT_BLOCK,
                                        RBLOCK=rblock, num_warps=8 if rblock >= 4096 else 4)


def _batch_mean_std_into(flat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Two launches: per-block (mean, M2), then the fp64 combine writing fp32 ``mean`` and ``std``."""
    _combine_moments(_block_moments(flat), flat.numel(), mean, std)


def batch_mean_std(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) over all elements of ``x``, as fp32 0-d tensors on x's device; no host sync."""
    flat = _check_input(x)
    mean = torch.empty((), device=flat.device, dtype=torch.float32)
    std = torch.empty((), device=flat.device, dtype=torch.float32)
    _batch_mean_std_into(flat, mean, std)
    return mean, std


def _key_words(value: IntOrTensor, name: str, device: torch.device, bits: int):
    """``(tensor, lo, hi)``: a 1-element integer device tensor (the kernel loads it: graph-capturable), or, for a
    python int, None and its low/high 32-bit words as int32 bit patterns (kernel arguments: no device write)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a python int or a 1-element integer tensor, got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, x on {device}")
        return value.detach(), 0, 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a python int or an integer tensor, got {type(value).__name__}")
    if not 0 <= value < 2 ** bits:
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {value}")
    as_int32 = lambda w: w - 2 ** 32 if w >= 2 ** 31 else w  # noqa: E731  (always an i32 kernel argument)
    return None, as_int32(value & 0xFFFFFFFF), as_int32(value >> 32)


def _scalar_value(value, name: str, device: torch.device):
    """``(tensor, number)``: a 1-element device tensor (loaded by the kernel, converted to fp32 there) or a
    python number passed as an fp32 kernel argument."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, x on {device}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number, got {value.dtype}")
        return value.detach(), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    return None, float(value)


def _launch_noise(out: torch.Tensor, seed, step, mean, std, kind_id: int, low: float, high: float):
    """One launch. ``seed/step``: results of :func:`_key_words`; ``mean/std``: of :func:`_scalar_value`."""
    numel = out.numel()
    grid = (triton.cdiv(numel, _NOISE_BLOCK),)
    below_one = _BELOW_ONE[out.dtype]
    (seed_t, seed_lo, seed_hi), (step_t, step_lo, _), (mean_t, mean_v), (std_t, std_v) = seed, step, mean, std
    # unused pointers still need a valid argument: ``out`` stands in
    # no FMA contraction: z * std + mean rounds like torch's two separate ops (see the module docstring)
    _philox_batch_noise_forward_kernel[grid](
        out, out if seed_t is None else seed_t, out if step_t is None else step_t,
        out if mean_t is None else mean_t, out if std_t is None else std_t, seed_lo, seed_hi, step_lo, mean_v, std_v,
        numel, float(low), float(high), below_one, KIND=kind_id, SEED_IN_MEMORY=seed_t is not None,
        STEP_IN_MEMORY=step_t is not None, MEAN_IN_MEMORY=mean_t is not None, STD_IN_MEMORY=std_t is not None,
        APPROX_MATH=_APPROX_MATH, BLOCK=_NOISE_BLOCK, num_warps=4, enable_fp_fusion=False)
    return out


def philox_batch_noise(x: torch.Tensor, seed: IntOrTensor, step: IntOrTensor, kind: str = "normal",
                       mean=None, std=None, low: float = 0.0, high: float = 1.0,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Noise shaped like ``x``, reproducible from (seed, step, flat element index); see the module docstring.

    ``mean/std``: numbers or 0-d tensors; default :func:`batch_mean_std` of x (``std`` is used by ``normal`` only).
    ``low/high``: clamp range of ``normal``. ``out``: optional contiguous float buffer shaped like x.
    Device work: ``normal``/``constant`` with batch statistics 3 launches (moments, combine, draws), else 1.
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
    seed_w = _key_words(seed, "seed", dev, 64)
    step_w = _key_words(step, "step", dev, 32)
    mean_s = _scalar_value(0.0 if mean is None else mean, "mean", dev)
    std_s = _scalar_value(1.0 if std is None else std, "std", dev)
    if kind != "uniform" and (mean is None or (kind == "normal" and std is None)):
        batch_mean = torch.empty((), device=dev, dtype=torch.float32)
        batch_std = torch.empty((), device=dev, dtype=torch.float32)
        _batch_mean_std_into(flat, batch_mean, batch_std)
        mean_s = (batch_mean, 0.0) if mean is None else mean_s
        std_s = (batch_std, 0.0) if std is None else std_s
    if kind == "uniform":  # reads neither
        mean_s = std_s = (None, 0.0)
    elif kind == "constant":
        std_s = (None, 0.0)
    return _launch_noise(out, seed_w, step_w, mean_s, std_s, _KIND_ID[kind], low, high)


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
    seed_w = _key_words(seed, "seed", device, 64)
    step_w = _key_words(step, "step", device, 32)
    return _launch_noise(out, seed_w, step_w, (None, 0.0), (None, 1.0), _STANDARD, 0.0, 0.0)


__all__ = ["NOISE_KINDS", "batch_mean_std", "philox_batch_noise", "philox_standard_normal"]
