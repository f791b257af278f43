"""unlearn_fast/kernels/batch_noise.py: batch moments, the Philox keying, and the noise kinds.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one.

Tolerances:
- batch_mean_std vs torch.mean / torch.std in fp64 on the same values: fp32 block sums combined in fp64 ->
  mean rtol 1e-6, std rtol 1e-5 (5e-5 for the 1000-offset input, where per-block fp32 means lose digits).
- uniform draws vs a pure-Python Philox4x32-10 of the documented (key, counter): exact (integer math, one
  fp32 conversion and one fp32 multiply). Normal draws: 2e-5 absolute (log/cos may differ by ulps).
- philox_batch_noise vs clamp(philox_standard_normal * std + mean): exact (the kernel does not contract to FMA).
  The fp32 -> bf16 store rounds to nearest even when compiled, but truncates under triton 3.8's interpreter
  (its cast_impl passes no rounding mode); the bf16 twin does the same as the kernel on each path.
- Statistics on 1e5 draws: mean within 0.02 (6 standard errors), std within 0.02 of 1.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from unlearn_fast.kernels import (NOISE_KINDS, batch_mean_std, philox_batch_noise,  # noqa: E402
                                  philox_standard_normal)

MASK32 = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds (Salmon et al. 2011), the constants Triton uses, in Python ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def _to_uniform(word: int) -> np.float32:
    """Triton's uint32 -> [0, 1): as int32, fold negatives with ~, times 4.6566127342e-10 in fp32."""
    v = word - (1 << 32) if word >= (1 << 31) else word
    v = ~v if v < 0 else v
    return np.float32(np.float32(v) * np.float32(4.6566127342e-10))


def _documented_draws(seed: int, step: int, count: int):
    """(uniform, normal) for elements 0..count-1 from the keying in the module docstring: element 4g + j takes
    word j of group g's draw (uniform), or normal j of the two Box-Muller pairs (cos, sin) of words (0, 1), (2, 3)."""
    key = (seed & MASK32, (seed >> 32) & MASK32)
    uniform, normal = [], []
    for k in range(count):
        g, j = divmod(k, 4)
        u = [_to_uniform(w) for w in _philox4x32_10((g, step & MASK32, 0, 0), key)]
        uniform.append(u[j])
        radius = math.sqrt(-2.0 * math.log(max(1e-7, float(u[j & 2]))))
        angle = 2 * math.pi * float(u[(j & 2) + 1])
        normal.append(radius * (math.cos(angle) if j % 2 == 0 else math.sin(angle)))
    return torch.tensor(np.array(uniform, dtype=np.float32)), torch.tensor(normal, dtype=torch.float64)


@pytest.mark.parametrize("seed,step", [(0, 0), (7, 3), (2 ** 40 + 5, 2 ** 31 + 1), (2 ** 64 - 1, 2 ** 32 - 1)])
def test_draws_follow_the_documented_philox_keying(device, seed, step):
    uniform_ref, normal_ref = _documented_draws(seed, step, 48)
    x = torch.zeros(48, device=device)
    u = philox_batch_noise(x, seed, step, kind="uniform")
    assert torch.equal(u.cpu(), uniform_ref)
    z = philox_standard_normal((48,), seed, step, device)
    assert (z.cpu().double() - normal_ref).abs().max().item() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 17), (2, 3, 64, 65), (2, 3, 32, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_batch_mean_std_matches_torch_fp64(device, shape, dtype):
    g = torch.Generator().manual_seed(0)
    # 2*3*64*65 = 24960 elements: 7 blocks, the last one partial; 2*3*32*64 = 3 whole blocks (the unmasked kernel)
    x = (torch.rand(shape, generator=g) * 3 - 0.5).to(dtype)
    mean, std = batch_mean_std(x.to(device))
    assert mean.shape == () and std.shape == () and mean.dtype == std.dtype == torch.float32
    assert mean.device.type == std.device.type == device
    ref = x.double()
    assert_rel(mean, ref.mean(), 1e-6)
    assert_rel(std, ref.std(), 1e-5)


def assert_rel(actual, expected, rtol):
    a, e = float(actual), float(expected)
    assert abs(a - e) <= rtol * abs(e), f"{a} vs {e} (rel err {abs(a - e) / abs(e):.3g} > {rtol})"


@pytest.mark.parametrize("row", [4099, 4096])  # partial blocks, whole blocks
def test_batch_mean_std_is_stable_with_a_large_offset(device, row):
    # a naive E[x^2] - E[x]^2 in fp32 would lose every digit here (std/mean ~ 3e-5)
    g = torch.Generator().manual_seed(1)
    x = 1000.0 + 0.03 * torch.randn(3, row, generator=g)
    mean, std = batch_mean_std(x.to(device))
    assert_rel(mean, x.double().mean(), 1e-6)
    assert_rel(std, x.double().std(), 5e-5)


def test_batch_mean_std_of_one_element(device):
    mean, std = batch_mean_std(torch.tensor([0.25], device=device))
    assert mean.item() == 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about zero degrees of freedom
        assert math.isnan(std.item()) and math.isnan(torch.tensor([0.25]).std().item())  # as torch: 0/0


def test_reproducible_from_seed_step_and_index(device):
    x = torch.rand(4, 3, 11, 13, device=device)
    a = philox_batch_noise(x, 3, 5)
    assert torch.equal(a, philox_batch_noise(x, 3, 5))
    seed_t = torch.tensor(3, device=device)
    step_t = torch.tensor([5], device=device)
    assert torch.equal(a, philox_batch_noise(x, seed_t, step_t))
    assert not torch.equal(a, philox_batch_noise(x, 3, 6))
    assert not torch.equal(a, philox_batch_noise(x, 4, 5))
    # the draw of element k depends on (seed, step, k) alone, not on the shape or the element count
    z_small = philox_standard_normal((10,), 3, 5, device)
    z_big = philox_standard_normal((7, 143), 3, 5, device)
    assert torch.equal(z_small, z_big.reshape(-1)[:10])
    # a big seed as its int64 bit pattern in a tensor gives the same stream as the python int
    big = 2 ** 63 + 12345
    assert torch.equal(philox_standard_normal((20,), big, 1, device),
                       philox_standard_normal((20,), torch.tensor(big - 2 ** 64, device=device), 1, device))


def _store_as(v: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    """fp32 -> dtype as the kernel's store does it (see the module docstring for bf16 under the interpreter)."""
    if dtype == torch.bfloat16 and device == "cpu":
        return (v.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)  # truncation
    return v.to(dtype)


def test_batch_noise_is_affine_clamp_of_standard_normal(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.rand(2, 3, 9, 10, device=device).to(dtype)
        mean, std = batch_mean_std(x)
        noise = philox_batch_noise(x, 11, 2)
        z = philox_standard_normal(x.shape, 11, 2, device)
        twin = _store_as(torch.clamp(z * std + mean, 0.0, 1.0), dtype, device)
        assert noise.dtype == dtype and noise.shape == x.shape
        assert torch.equal(noise, twin), dtype
    # explicit mean/std (numbers and tensors) and a custom clamp range
    x = torch.rand(500, device=device)
    z = philox_standard_normal(x.shape, 1, 9, device)
    twin = torch.clamp(z * 0.7 + 0.1, -0.5, 0.8)
    assert torch.equal(philox_batch_noise(x, 1, 9, mean=0.1, std=0.7, low=-0.5, high=0.8), twin)
    m, s = torch.tensor(0.1, device=device), torch.tensor(0.7, device=device)
    assert torch.equal(philox_batch_noise(x, 1, 9, mean=m, std=s, low=-0.5, high=0.8), twin)


def test_clamping(device):
    x = torch.rand(8, 3, 16, 16, device=device)  # mean ~0.5, std ~0.29: ~8% of the draws leave [0, 1]
    noise = philox_batch_noise(x, 0, 1)
    assert noise.min().item() == 0.0 and noise.max().item() == 1.0
    assert (noise == 0).sum().item() > 50 and (noise == 1).sum().item() > 50
    wide = philox_batch_noise(x, 0, 1, low=-10.0, high=10.0)  # nothing clamped: the interior agrees
    inside = (wide > 0) & (wide < 1)
    assert torch.equal(noise[inside], wide[inside])


def test_draws_look_standard_normal_and_steps_are_independent(device):
    z = philox_standard_normal((100_000,), 2024, 17, device).double().cpu()
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01  # one-sigma mass
    assert abs((z.abs() < 2).double().mean().item() - 0.9545) < 0.005
    other = philox_standard_normal((100_000,), 2024, 18, device).double().cpu()
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 0.02
    shifted = philox_standard_normal((100_001,), 2024, 17, device).double().cpu()[1:]
    assert abs(torch.corrcoef(torch.stack([z, shifted]))[0, 1].item()) < 0.02  # neighbours uncorrelated


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_uniform_range_and_moments(device, dtype):
    x = torch.zeros(50_000, device=device, dtype=dtype)
    u = philox_batch_noise(x, 5, 0, kind="uniform")
    assert u.dtype == dtype
    assert u.min().item() >= 0.0 and u.max().item() < 1.0  # half-open even after rounding to dtype
    assert abs(u.double().mean().item() - 0.5) < 0.01 and abs(u.double().var().item() - 1 / 12) < 0.005


def test_constant_is_the_batch_mean(device):
    x = torch.rand(3, 5, 7, device=device).half()
    c = philox_batch_noise(x, 0, 0, kind="constant")
    mean, _ = batch_mean_std(x)
    assert c.dtype == x.dtype and torch.equal(c, torch.full_like(c, mean.half().item()))
    assert torch.equal(philox_batch_noise(x, 0, 0, kind="constant", mean=0.125), torch.full_like(c, 0.125))


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_out_buffer_is_fully_written(device, kind):
    x = torch.rand(3, 1001, device=device)
    out = torch.full((3, 1001), float("nan"), device=device)
    got = philox_batch_noise(x, 1, 2, kind=kind, out=out)
    assert got is out and not torch.isnan(out).any()
    assert torch.equal(out, philox_batch_noise(x, 1, 2, kind=kind))


def test_rejects_bad_input(device):
    x = torch.rand(4, device=device)
    with pytest.raises(ValueError, match="valid kinds: normal, uniform, constant"):
        philox_batch_noise(x, 0, 0, kind="gaussian")
    with pytest.raises(ValueError, match="at least one element"):
        philox_batch_noise(x[:0], 0, 0)
    with pytest.raises(ValueError, match="fp32, fp16, bf16 or fp64"):
        batch_mean_std(torch.ones(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="step must be in \\[0, 2\\^32\\)"):
        philox_batch_noise(x, 0, 2 ** 32)
    with pytest.raises(ValueError, match="seed must be in \\[0, 2\\^64\\)"):
        philox_batch_noise(x, -1, 0)
    with pytest.raises(TypeError, match="seed must be a python int"):
        philox_batch_noise(x, 1.5, 0)
    with pytest.raises(ValueError, match="step must be a python int or a 1-element integer tensor"):
        philox_batch_noise(x, 0, torch.tensor([1.0], device=device))
    with pytest.raises(ValueError, match="step is on meta"):
        philox_batch_noise(x, 0, torch.tensor(1, device="meta"))
    with pytest.raises(ValueError, match="out must be a contiguous float tensor"):
        philox_batch_noise(x, 0, 0, out=torch.empty(5, device=device))
    with pytest.raises(ValueError, match="mean must be a scalar"):
        philox_batch_noise(x, 0, 0, mean=torch.zeros(2, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graph_replays_with_a_new_step(device):
    if device != "cuda":
        pytest.skip("kernels are interpreted")
    x = torch.rand(2, 3, 32, 32, device="cuda")
    step_t = torch.zeros((), dtype=torch.int64, device="cuda")
    out = torch.empty_like(x)
    philox_batch_noise(x, 7, step_t, out=out)  # warm-up compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        philox_batch_noise(x, 7, step_t, out=out)
    for step in (3, 4, 3):
        step_t.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, philox_batch_noise(x, 7, step))
