"""Seeded randomness: every draw comes from generators derived from (seed, rank, step, purpose).

No wall-clock reseeding (the reference reseeds from time.time() every step, REFERENCE.md §1.4): a run is
reproducible and a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import numbers

import torch

PURPOSES = ("task", "noise", "dropout", "baseline", "data")


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from the base seed and any labels (stable across processes and Python versions)."""
    # integers of any type (numpy ints included) hash like python ints
    parts = tuple(int(p) if isinstance(p, numbers.Integral) and not isinstance(p, bool) else p for p in parts)
    h = hashlib.blake2b(repr((int(seed),) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def philox_noise_key(seed: int, rank: int) -> int:
    """The key of the counter-based noise of one rank: ranks draw independent noise, as the reference's
    per-rank generators (seed + rank) do; the step and the element index are the Philox counter."""
    return derive_seed(seed, rank, "philox_noise")


def step_generator(seed: int, rank: int, step: int, purpose: str, device) -> torch.Generator:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}")
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(seed, rank, step, purpose))
    return g


def seed_step_globals(seed: int, rank: int, step: int) -> None:
    """Seed the global CPU/CUDA generators for this step (dropout and any draw inside a module)."""
    torch.manual_seed(derive_seed(seed, rank, step, "dropout"))
