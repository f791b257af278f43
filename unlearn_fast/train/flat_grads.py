"""Gradients in one flat buffer, averaged over ranks by one explicit all-reduce: DDP without its reducer.

DDP all-reduces gradients from autograd hooks during the backward pass; those hooks cannot live in a
CUDA graph. Here every trainable parameter's ``.grad`` is a view into ONE fp32 buffer (set up once, never
set to None again), so a step splits into three parts that each rank runs in the same order:

1. forward + backward: autograd accumulates into the views, i.e. into the buffer;
2. :meth:`FlatGrads.all_reduce_mean_`: one collective over the buffer, the mean over ranks (multiplied by
   1/world then summed, as DDP's default hook), on the loss-scaled gradients exactly where DDP reduces them;
3. the update (:func:`flat_grads_update`): unscale, clip, step, scaler update, then the buffer is zeroed.

The graphed step (:mod:`step_graphed`) captures parts 1 and 3 as two CUDA graphs; :func:`split_fast_step`
runs the same split eagerly (any device, gloo included), which is what the CPU tests check against DDP.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistContext
from .step_fast import fast_step
from .step_reference import StepOutput, optimizer_update
from .unlearn_setup import UnlearnSetup


class FlatGrads:
    """One contiguous buffer holding the gradients of ``named_params`` (``[(name, param)]``, all trainable,
    one device and dtype); :meth:`attach` makes each ``param.grad`` a view of its slice.

    The first backward after construction runs with the views detached (``.grad`` None) so that
    :meth:`attach` can check that every parameter received a gradient, as DDP (without
    ``find_unused_parameters``) requires: a zero gradient in the buffer would otherwise let AdamW apply
    weight decay and momentum to a parameter that a plain step leaves alone.
    """

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]]):
        named = list(named_params)
        if not named:
            raise ValueError("FlatGrads needs at least one trainable parameter")
        first = named[0][1]
        for name, p in named:
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError(f"FlatGrads: parameter {name!r} does not require a gradient (pass trainable ones)")
            if p.device != first.device or p.dtype != first.dtype:
                raise ValueError(f"FlatGrads: parameter {name!r} is {p.dtype} on {p.device}, the first one is "
                                 f"{first.dtype} on {first.device}; one buffer needs one device and dtype")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.checked = False  # every parameter seen to receive a gradient (first backward)
        self.attach()  # gradients from before (e.g. a restored accumulation) move into the buffer

    def is_attached(self) -> bool:
        return all(p.grad is v for p, v in zip(self.params, self.views))

    def attach(self) -> None:
        """Make every ``.grad`` its view (a gradient already there is added into the view first)."""
        for name, p, v in zip(self.names, self.params, self.views):
            if p.grad is v:
                continue
            if p.grad is not None:
                if p.grad.shape != p.shape:
                    raise ValueError(f"gradient of {name!r} has shape {tuple(p.grad.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                v.add_(p.grad.detach())
            p.grad = v

    def detach_for_check(self) -> None:
        """Before the first backward: ``.grad`` None (the buffer keeps its values), so :meth:`attach_checked`
        can see which parameters the backward reached."""
        for p in self.params:
            p.grad = None

    def attach_checked(self) -> None:
        """After the first backward: raise if a parameter got no gradient, then :meth:`attach`."""
        missing = [n for n, p in zip(self.names, self.params) if p.grad is None]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"trainable parameters without a gradient in the loss: {shown}. The flat-buffer "
                             "all-reduce (like DDP without find_unused_parameters) needs every trainable "
                             "parameter in the loss")
        self.attach()
        self.checked = True

    def zero_(self) -> None:
        self.buffer.zero_()

    def all_reduce_mean_(self, ctx: Optional[DistContext]) -> None:
        """The buffer becomes the mean over ranks. Capturable in a CUDA graph with NCCL >= 2.9.6 when every
        rank captures it. A single process (``ctx`` None or not enabled) leaves it as it is."""
        if ctx is None or not ctx.enabled:
            return
        if ctx.world_size > 1:
            self.buffer.mul_(1.0 / ctx.world_size)  # before the sum, as DDP's bucket copy does
        dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM)


def flat_grads_update(setup: UnlearnSetup, flat: FlatGrads) -> None:
    """:func:`optimizer_update` (unscale, clip, step, scaler update) on the flat gradients, then zero the
    buffer and give the parameters their views back (``optimizer_update`` ends with ``zero_grad(None)``)."""
    optimizer_update(setup)
    flat.zero_()
    flat.attach()


def split_fast_step(setup: UnlearnSetup, flat: FlatGrads, ctx: Optional[DistContext], images: torch.Tensor,
                    is_forget_cpu: torch.Tensor, step: int, update: bool = True,
                    noise_seed: Optional[int] = None) -> StepOutput:
    """:func:`fast_step` split as the graphed multi-rank step runs it, eagerly: forward + backward into
    the flat buffer, then (on ``update``) the all-reduce over ranks and the optimizer update.

    ``setup.student`` must not be a DDP module with an active reducer (a
    :class:`~unlearn_fast.train.distributed.DDPStudent` after ``use_flat_grads()``, or a plain model).
    With ``accum_iter > 1`` the micro-steps before an update only accumulate (no collective), as DDP's
    ``no_sync``.
    """
    if setup.half_student_weights:
        raise ValueError("split_fast_step reduces fp32 gradients in one flat buffer; half_student_weights (bf16 "
                         "weight copies with bf16 gradients) is for the single-process fast and graphed steps")
    if getattr(setup.student, "reducer_active", False):
        raise ValueError("split_fast_step needs the student without DDP's reducer: call "
                         "DDPStudent.use_flat_grads() first (else the gradients would be all-reduced twice)")
    first = not flat.checked
    if first:
        flat.detach_for_check()
    elif not flat.is_attached():
        flat.attach()
    out = fast_step(setup, images, is_forget_cpu, step, update=False, noise_seed=noise_seed)
    if first:
        flat.attach_checked()
    if update:
        flat.all_reduce_mean_(ctx)
        flat_grads_update(setup, flat)
    return out


def trainable_named_parameters(model: nn.Module):
    """``[(name, param)]`` of the trainable parameters, in the order the optimizer holds them."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


__all__ = ["FlatGrads", "flat_grads_update", "split_fast_step", "trainable_named_parameters"]
