"""Palette unlearning steps (REFERENCE.md §3.2–3.4): reference-semantics eager, fast, and the EMA.

    setup = build_palette_setup(network, "cuda", approach_from_flags(fix_decoder=1), forget_alpha=0.1)
    out = palette_fast_step(setup, batch, is_forget_cpu, step)        # StepOutput(loss, retain, forget)

The approach comes from the reference flags of ``unlearn.py`` (§3.3 table)::

    fix_decoder max_loss learn_noise learn_others   approach         trains
         1         0         0           0          ours             encoder (cond_embed, input_blocks, middle)
         1         0         1           0          random_encoder   encoder
         0         0         0           1          retain_label     whole UNet
         0         0         1           0          noisy_label      whole UNet
         0         1         0           0          max_loss         whole UNet

All-zero flags run the NOISY LABEL loss in the reference code too (same branch of ``Network.forward``), so
they map to ``noisy_label``. Other combinations are not paper approaches and are refused.

Both steps: fp32 (``precision="bf16"`` is an opt-in), teacher on the whole batch (its retain rows see the
standard corruption, its forget rows pure ε; one forward serves both), ``Adam(denoise_fn params, lr 5e-5,
weight_decay 0)``, no clipping, no scaler, then the EMA. Draws (t, γ, ε, baseline noise, dropout) come from
generators seeded by (seed, rank, step). The reference-semantics step keeps the reference's costs: the
masked-copy loss, ``loss.item()`` per step, a single-tensor Adam and a Python-loop EMA that allocates. The
fast step: the fused feature loss (one read per map), no host sync, a foreach/fused Adam and an in-place
foreach EMA of the parameters that train.

Deliberate difference: the EMA starts from the loaded weights. The reference copies ``netG_EMA`` in the
model's constructor, before ``unlearn.py`` loads ``--ckpt`` into ``netG`` only, so its EMA starts from the
random initialisation (inferred from the code).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..models.palette import SCHEDULE_BUFFERS, Network, as_palette_batch
from ..models.state_dict_io import load_state_dict_strict
from ..objective.palette_loss import (palette_max_loss, palette_noisy_label_loss, palette_random_encoder_loss,
                                      palette_retain_label_loss, palette_unlearn_loss_terms,
                                      palette_unlearn_loss_terms_reference)
from ..objective.unlearn_objective import UnlearnLoss
from .seeding import seed_step_globals, step_generator
from .step_reference import StepOutput, check_finite

PALETTE_PRECISIONS = ("fp32", "bf16")
APPROACHES = ("ours", "random_encoder", "retain_label", "noisy_label", "max_loss")
ENCODER_ONLY = frozenset({"ours", "random_encoder"})
WITH_TEACHER = frozenset({"ours", "random_encoder", "retain_label"})  # the reference: iff fix_decoder or learn_others
_FLAG_TABLE = {  # (fix_decoder, max_loss, learn_noise, learn_others) -> approach
    (1, 0, 0, 0): "ours", (1, 0, 1, 0): "random_encoder", (0, 0, 0, 1): "retain_label",
    (0, 0, 1, 0): "noisy_label", (0, 0, 0, 0): "noisy_label", (0, 1, 0, 0): "max_loss",
}


def approach_flags(approach: str) -> str:
    """The reference flags that select ``approach`` (``--fix_decoder 1 --learn_noise 1``; ``no flags`` for none)."""
    names = ("fix_decoder", "max_loss", "learn_noise", "learn_others")
    key = next(k for k, v in _FLAG_TABLE.items() if v == approach and any(k))
    return " ".join(f"--{n} 1" for n, v in zip(names, key) if v)


def approach_from_flags(fix_decoder: int = 0, max_loss: int = 0, learn_noise: int = 0, learn_others: int = 0) -> str:
    """The approach the reference flags select (module docstring table); a ValueError for any other combination."""
    flags = dict(fix_decoder=fix_decoder, max_loss=max_loss, learn_noise=learn_noise, learn_others=learn_others)
    for name, value in flags.items():
        if value not in (0, 1):
            raise ValueError(f"--{name} must be 0 or 1, got {value!r}")
    key = tuple(int(v) for v in flags.values())
    if key not in _FLAG_TABLE:
        given = " ".join(f"--{k} {int(v)}" for k, v in flags.items())
        raise ValueError(
            f"unsupported flag combination ({given}). The paper's approaches are: Ours --fix_decoder 1; "
            "RANDOM ENCODER --fix_decoder 1 --learn_noise 1; RETAIN LABEL --learn_others 1; "
            "NOISY LABEL --learn_noise 1; MAX LOSS --max_loss 1 (REFERENCE.md §3.3)")
    return _FLAG_TABLE[key]


# ---- EMA ---------------------------------------------------------------------------------------------
class PaletteEMA:
    """``netG_EMA``: a frozen copy of ``denoise_fn``, ``ema = decay·ema + (1 − decay)·param`` after every step.

    :meth:`update` works in place on the ``tracked`` parameters (the ones that train) with two foreach
    kernels; :meth:`update_reference` is the reference's loop over every parameter, allocating a new
    tensor each. Untracked parameters never change, so their EMA equals them in both (up to one rounding
    of ``x·d + (1−d)·x`` in the loop)."""

    def __init__(self, denoise_fn: nn.Module, decay: float = 0.9999, tracked: Optional[List[str]] = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(denoise_fn).eval().requires_grad_(False)
        src = dict(denoise_fn.named_parameters())
        dst = dict(self.module.named_parameters())
        names = list(src) if tracked is None else [n for n in src if n in set(tracked)]
        self._all = [(dst[n], src[n]) for n in src]
        self._ema = [dst[n] for n in names]  # the Parameter objects: valid even after .data is reassigned
        self._src = [src[n] for n in names]

    @torch.no_grad()
    def update(self) -> None:
        if self._ema:
            torch._foreach_mul_(self._ema, self.decay)
            torch._foreach_add_(self._ema, self._src, alpha=1.0 - self.decay)

    @torch.no_grad()
    def update_reference(self) -> None:
        for ema_p, p in self._all:
            ema_p.data = ema_p.data * self.decay + (1 - self.decay) * p.data

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{epoch}_Network_ema.pth``: ``denoise_fn.*`` only, on CPU (the reference's EMA has no buffers)."""
        return {f"denoise_fn.{k}": v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor], what: str = "EMA state") -> None:
        """Copy a ``{epoch}_Network_ema.pth`` into the EMA in place (the tracked Parameter objects stay valid).
        A ``module.`` prefix is stripped and schedule buffers are ignored; any other mismatch is a ValueError."""
        inner = {}
        for k, v in state.items():
            k = k[len("module."):] if k.startswith("module.") else k
            if k in SCHEDULE_BUFFERS:
                continue
            if not k.startswith("denoise_fn."):
                raise ValueError(f"{what}: unexpected key {k!r} (an EMA file holds denoise_fn.* only)")
            inner[k[len("denoise_fn."):]] = v
        load_state_dict_strict(self.module, inner, what)


# ---- setup -------------------------------------------------------------------------------------------
@dataclass
class PaletteSetup:
    network: Network
    optimizer: torch.optim.Optimizer
    ema: Optional[PaletteEMA]
    approach: str
    forget_alpha: float
    device: torch.device
    seed: int = 0
    rank: int = 0
    trained_names: List[str] = field(default_factory=list)  # denoise_fn parameter names the loss reaches
    precision: str = "fp32"


def build_palette_setup(network: Network, device, approach: str = "ours", forget_alpha: float = 0.1,
                        lr: float = 5e-5, weight_decay: float = 0.0, ema_decay: Optional[float] = 0.9999,
                        seed: int = 0, rank: int = 0, fast: bool = True, precision: str = "fp32",
                        teacher_state: Optional[Dict[str, torch.Tensor]] = None,
                        betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, amsgrad: bool = False,
                        maximize: bool = False) -> PaletteSetup:
    """Move ``network`` (already loaded) to ``device``, attach the teacher the approach needs, build Adam over
    the ``denoise_fn`` parameters (the reference's optimizer is made before the teacher exists) and the EMA.
    ``fast`` picks a fused (CUDA) / foreach (CPU) Adam; otherwise torch's single-tensor Adam, the reference's
    (torch 1.13) default, whose first moment torch >= 2 updates with ``lerp``: the same step up to rounding.
    ``precision``: ``fp32`` (the reference) or ``bf16`` (opt-in: both UNets under bf16 autocast).
    ``teacher_state``: the teacher's weights (``denoise_fn`` keys, no prefix) when resuming: the original model
    stored in the checkpoint, never a copy of the partly unlearned ``network`` (§11). ``betas``, ``eps``,
    ``amsgrad``, ``maximize``: Adam's, from the config's ``optimizers[0]`` (the reference passes it all to Adam)."""
    if precision not in PALETTE_PRECISIONS:
        raise ValueError(f"unknown Palette precision {precision!r}; valid: {', '.join(PALETTE_PRECISIONS)}")
    if approach not in APPROACHES:
        raise ValueError(f"unknown Palette approach {approach!r}; valid: {', '.join(APPROACHES)}")
    if not isinstance(network, Network):
        raise TypeError(f"expected a Palette Network, got {type(network).__name__}")
    if not math.isfinite(forget_alpha) or forget_alpha < 0:
        raise ValueError(f"--forget_alpha must be finite and >= 0, got {forget_alpha}")
    if not lr > 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    if teacher_state is not None and approach not in WITH_TEACHER:
        raise ValueError(f"teacher weights were given, but the approach {approach!r} uses no teacher")
    device = torch.device(device)
    network = network.to(device)
    if approach in WITH_TEACHER and not network.has_teacher:
        network.attach_teacher()
    if teacher_state is not None:
        load_state_dict_strict(network.teacher_denoise_fn, teacher_state, "teacher weights")
    network.train()
    params = [p for p in network.denoise_fn.parameters() if p.requires_grad]
    kind = dict(fused=True) if fast and device.type == "cuda" else dict(foreach=bool(fast))
    optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                 amsgrad=amsgrad, maximize=maximize, **kind)
    all_names = [n for n, _ in network.denoise_fn.named_parameters()]
    if approach in ENCODER_ONLY:
        trained = [n[len("denoise_fn."):] for n in network.encoder_parameter_names()]
    else:
        trained = all_names
    ema = None if ema_decay is None else PaletteEMA(network.denoise_fn, ema_decay, tracked=trained)
    return PaletteSetup(network, optimizer, ema, approach, float(forget_alpha), device, int(seed), int(rank), trained,
                        precision)


# ---- the loss of one batch ------------------------------------------------------------------------------
def palette_step_loss(setup: PaletteSetup, batch, is_forget: torch.Tensor, step: int, fused: bool = True
                      ) -> UnlearnLoss:
    """The approach's loss for this batch (device tensors; ``is_forget [N]`` bool). Seeds this step's draws."""
    net, dev = setup.network, setup.device
    seed_step_globals(setup.seed, setup.rank, step)  # dropout
    task = net.sample_task(batch.gt, step_generator(setup.seed, setup.rank, step, "task", dev))  # t, γ, ε
    # bf16 (opt-in): the UNets under autocast; the losses accumulate in fp32 either way
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16"):
        return _approach_loss(setup, batch, is_forget, task, step, fused)


def _approach_loss(setup: PaletteSetup, batch, is_forget, task, step: int, fused: bool) -> UnlearnLoss:
    net, alpha, dev, kind = setup.network, setup.forget_alpha, setup.device, setup.approach
    if kind in ENCODER_ONLY:
        with torch.no_grad():
            f_t = net.teacher_encoder_features(batch, task, noise_rows=is_forget)  # forget rows: pure ε
        f_s = net.forward_encoder_features(batch, task)  # standard corruption on every row
        if kind == "ours":
            terms = palette_unlearn_loss_terms if fused else palette_unlearn_loss_terms_reference
            return terms(f_s, f_t, is_forget, alpha)
        g = step_generator(setup.seed, setup.rank, step, "baseline", dev)
        return palette_random_encoder_loss(f_s, f_t, is_forget, alpha, generator=g)
    if kind == "retain_label":
        with torch.no_grad():
            eps_t = net.teacher_denoise_fn(net.task_input(batch, task), task["gamma"])  # [N, C, H, W]
        eps_s = net.predict_noise(batch, task)
        g = step_generator(setup.seed, setup.rank, step, "baseline", dev)
        return palette_retain_label_loss(eps_s, eps_t, is_forget, alpha, generator=g)
    if kind == "noisy_label":  # forget rows see pure ε in the hole and learn to return it
        eps_s = net.predict_noise(batch, task, noise_rows=is_forget)
        return palette_noisy_label_loss(eps_s, task["noise"], batch.mask, is_forget, alpha)
    return palette_max_loss(net.predict_noise(batch, task), task["noise"], batch.mask, is_forget, alpha)


def _to_device(setup: PaletteSetup, batch: Any, is_forget: torch.Tensor):
    batch = as_palette_batch(batch).to(setup.device)
    return batch, is_forget.to(setup.device, torch.bool, non_blocking=True)


def palette_reference_step(setup: PaletteSetup, batch: Any, is_forget: torch.Tensor, step: int,
                           update_ema: bool = True) -> StepOutput:
    """One step with the reference's semantics and costs (see the module docstring). ``update_ema``: whether
    this step updates the EMA (the trainer applies the config's ema_start / ema_iter, as the reference)."""
    batch, is_forget = _to_device(setup, batch, is_forget)
    setup.optimizer.zero_grad(set_to_none=False)  # torch 1.13's default
    out = palette_step_loss(setup, batch, is_forget, step, fused=False)
    check_finite(out.loss.item(), step)  # the reference's loss.item() every step
    out.loss.backward()
    setup.optimizer.step()
    if setup.ema is not None and update_ema:
        setup.ema.update_reference()
    return StepOutput(out.loss.detach(), out.retain.detach(), out.forget.detach())


def palette_fast_step(setup: PaletteSetup, batch: Any, is_forget_cpu: torch.Tensor, step: int,
                      update_ema: bool = True) -> StepOutput:
    """One step, same math, no host sync (the trainer reads the losses back every N steps)."""
    batch, is_forget = _to_device(setup, batch, is_forget_cpu)
    out = palette_step_loss(setup, batch, is_forget, step, fused=True)
    out.loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.ema is not None and update_ema:
        setup.ema.update()
    return StepOutput(out.loss.detach(), out.retain.detach(), out.forget.detach())


__all__ = ["PALETTE_PRECISIONS", "APPROACHES", "ENCODER_ONLY", "WITH_TEACHER", "approach_from_flags", "approach_flags",
           "PaletteEMA",
           "PaletteSetup", "build_palette_setup", "palette_step_loss", "palette_reference_step", "palette_fast_step"]
