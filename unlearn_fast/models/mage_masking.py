"""MAGE's task transform: one mask rate per batch and the drop / mask sets (REFERENCE.md §1.2 b).

Reference: ``rate ~ truncnorm(loc mu=0.55, scale std=0.25) on [min=0.5, max=1.0]`` from scipy with numpy's
global RNG; ``num_dropped = ceil(L * min)``, ``num_masked = ceil(L * rate)``; per row, the positions with
the smallest uniform noise are dropped (``num_dropped`` of them) and masked (``num_masked``), so
drop ⊆ all; a redraw loop (with a host sync) fixes counts broken by ties.

Here (deliberate, documented differences):
- the rate is drawn from a torch ``generator`` by the inverse CDF of the truncated normal
  (``mu + std * ndtri(Φ(a) + u (Φ(b) - Φ(a)))``, float64): the same distribution, seeded, no scipy;
- the sets come from the ranks of ONE argsort of the noise per row: rank < count gives exact counts even
  with ties, without a redraw loop; nothing syncs the host (the masked count stays a device tensor).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def truncnorm_mean(mu: float, std: float, low: float, high: float) -> float:
    """Mean of N(mu, std^2) truncated to [low, high] (closed form; 0.694 for MAGE's 0.55/0.25/[0.5, 1])."""
    a, b = (low - mu) / std, (high - mu) / std
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    return mu + std * (pdf(a) - pdf(b)) / (_std_normal_cdf(b) - _std_normal_cdf(a))


def sample_mask_rate(mu: float, std: float, low: float, high: float,
                     generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """One rate ~ N(mu, std^2) truncated to [low, high], as a 0-d float64 tensor on the generator's device."""
    if not (std > 0 and low < high):
        raise ValueError(f"need std > 0 and low < high, got std={std}, low={low}, high={high}")
    dev = generator.device if generator is not None else (device if device is not None else "cpu")
    u = torch.rand((), generator=generator, device=dev, dtype=torch.float64)
    phi_a, phi_b = _std_normal_cdf((low - mu) / std), _std_normal_cdf((high - mu) / std)  # host floats: no copy
    x = torch.special.ndtri(phi_a + u * (phi_b - phi_a))
    return (mu + std * x).clamp(low, high)  # the clamp only guards float rounding at the ends


def _std_normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def num_dropped_tokens(seq_len: int, mask_ratio_min: float) -> int:
    return int(math.ceil(seq_len * mask_ratio_min))


def drop_and_mask_sets(noise: torch.Tensor, num_dropped: int, mask_rate: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """From uniform ``noise [N, L]``: (token_drop_mask, token_all_mask), bool [N, L].

    Row i drops its ``num_dropped`` smallest-noise positions and masks its ``ceil(L * mask_rate)`` smallest
    (the counts are exact; drop ⊆ all as long as num_masked >= num_dropped).
    """
    n, seq_len = noise.shape
    if not 0 <= num_dropped <= seq_len:
        raise ValueError(f"num_dropped={num_dropped} is outside [0, {seq_len}]")
    order = torch.argsort(noise, dim=1)  # [N, L] positions by increasing noise
    rank_pos = torch.arange(seq_len, device=noise.device)  # rank of the position order[:, r] is r
    num_masked = torch.ceil(seq_len * mask_rate.to(device=noise.device, dtype=torch.float64)).long()
    num_masked = torch.maximum(num_masked, torch.full_like(num_masked, num_dropped))
    drop = torch.zeros(n, seq_len, dtype=torch.bool, device=noise.device)
    drop.scatter_(1, order, (rank_pos < num_dropped).expand(n, seq_len))
    all_ = torch.zeros_like(drop).scatter_(1, order, (rank_pos < num_masked).expand(n, seq_len))
    return drop, all_


def sample_mage_masks(batch: int, seq_len: int, *, mask_ratio_min: float = 0.5, mask_ratio_max: float = 1.0,
                      mask_ratio_mu: float = 0.55, mask_ratio_std: float = 0.25,
                      generator: Optional[torch.Generator] = None, device=None) -> dict:
    """Everything random in one MAGE training step's masking, on ``device`` (default: the generator's).

    Returns ``{'token_drop_mask': bool [N, L], 'token_all_mask': bool [N, L], 'mask_rate': 0-d float64,
    'num_dropped': int}``.
    """
    if batch < 1 or seq_len < 1:
        raise ValueError(f"need batch >= 1 and seq_len >= 1, got {batch}, {seq_len}")
    if not 0.0 <= mask_ratio_min <= mask_ratio_max <= 1.0:
        raise ValueError(f"need 0 <= mask_ratio_min <= mask_ratio_max <= 1, got {mask_ratio_min}, {mask_ratio_max}")
    gen_dev = generator.device if generator is not None else (device if device is not None else "cpu")
    rate = sample_mask_rate(mask_ratio_mu, mask_ratio_std, mask_ratio_min, mask_ratio_max, generator, gen_dev)
    noise = torch.rand(batch, seq_len, generator=generator, device=gen_dev)  # [N, L]
    k = num_dropped_tokens(seq_len, mask_ratio_min)
    drop, all_ = drop_and_mask_sets(noise, k, rate)
    out_dev = device if device is not None else gen_dev
    return dict(token_drop_mask=drop.to(out_dev), token_all_mask=all_.to(out_dev), mask_rate=rate.to(out_dev),
                num_dropped=k)


__all__ = ["truncnorm_mean", "sample_mask_rate", "num_dropped_tokens", "drop_and_mask_sets", "sample_mage_masks"]
