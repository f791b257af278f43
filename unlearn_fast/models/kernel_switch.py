"""An on/off switch for a model's fused GPU path, set for the extent of a ``with`` block.

The fast unlearning step turns the fused forms on (the VQGAN's GroupNorm + swish, MAGE's attention); the
reference-semantics step leaves them off, so the baseline keeps the official ops. The switch is context-local
(a ``contextvars.ContextVar``): nested blocks restore the outer value, and other threads are not affected.
"""
from __future__ import annotations

import contextlib
import contextvars


class KernelSwitch:
    """``with switch(enabled): ...`` sets it for the block; ``switch.on()`` reads it (off by default)."""

    def __init__(self, name: str):
        self._value = contextvars.ContextVar(name, default=False)

    def on(self) -> bool:
        return self._value.get()

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True):
        token = self._value.set(bool(enabled))
        try:
            yield
        finally:
            self._value.reset(token)


__all__ = ["KernelSwitch"]
