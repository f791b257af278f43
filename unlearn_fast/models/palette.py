"""Palette (diffusion inpainting), the official ``Network`` state-dict layout, behind the I2IModel protocol.

``Network`` holds the 6 noise-schedule buffers (``gammas``, ``sqrt_recip_gammas``, ``sqrt_recipm1_gammas``,
``posterior_log_variance_clipped``, ``posterior_mean_coef1/2``), the UNet ``denoise_fn`` and, once
:meth:`Network.attach_teacher` is called, the frozen copy ``teacher_denoise_fn`` (REFERENCE.md §3.1).

The task transform T of §3.2 is the diffusion corruption of the hole: a noise level γ and noise ε per
row. The student always sees the standard ``√γ·y0 + √(1−γ)·ε``; the teacher sees the same for retain rows
and pure ε for forget rows. So the "encoder" call takes ``noise_rows`` (which rows see pure noise)::

    task = model.sample_task(batch, generator)                       # t, gamma, noise
    f_s = student.forward_encoder_features(batch, task)              # 13 maps
    f_t = teacher.forward_encoder_features(batch, task, noise_rows=is_forget)
    loss = palette_unlearn_loss(f_s, f_t, is_forget, forget_alpha)   # unlearn_fast.objective.palette_loss

Images and the known context are in [-1, 1]; ``mask`` is 1 in the hole; ``y_cond`` is the network's
condition (the reference fills the hole with N(0, 1) in the data loader).

Deliberate difference: the attached teacher always stays in eval mode (``train()`` does not reach it).
The official teacher follows ``netG.train()`` and so runs dropout when the config sets it (§8, bug).
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .adapter import I2IModel, TaskDraw
from .registry import register_model
from .state_dict_io import load_state_dict_strict, read_checkpoint, state_dict_mismatch
from .palette_unet import UNet, init_palette_weights

SCHEDULE_BUFFERS = ("gammas", "sqrt_recip_gammas", "sqrt_recipm1_gammas", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
ENCODER_PREFIXES = ("denoise_fn.cond_embed.", "denoise_fn.input_blocks.", "denoise_fn.middle_block.")


class PaletteBatch(NamedTuple):
    """One inpainting batch: ``gt [N, C, H, W]`` in [-1, 1], ``mask [N, 1, H, W]`` (1 = hole), ``y_cond`` like gt."""
    gt: torch.Tensor
    mask: torch.Tensor
    y_cond: torch.Tensor

    def to(self, device) -> "PaletteBatch":
        return PaletteBatch(*(t.to(device, non_blocking=True) for t in self))


def as_palette_batch(inputs: Any) -> PaletteBatch:
    """A :class:`PaletteBatch` from itself, or a dict with the official keys (gt_image, cond_image, mask)."""
    if isinstance(inputs, PaletteBatch):
        return inputs
    if isinstance(inputs, dict):
        for gt_k, cond_k in (("gt_image", "cond_image"), ("gt", "y_cond")):
            if gt_k in inputs and cond_k in inputs and "mask" in inputs:
                return PaletteBatch(inputs[gt_k], inputs["mask"], inputs[cond_k])
        raise ValueError(f"a Palette batch dict needs keys gt_image, cond_image, mask; got {sorted(inputs)}")
    raise TypeError("Palette inputs must be a PaletteBatch(gt, mask, y_cond) or a dict with gt_image, cond_image, "
                    f"mask; got {type(inputs).__name__} (images alone do not say where the hole is)")


# ---- noise schedule --------------------------------------------------------------------------------
BETA_SCHEDULES = ("linear", "quad", "warmup10", "warmup50", "const", "jsd", "cosine")


def make_beta_schedule(schedule: str = "linear", n_timestep: int = 2000, linear_start: float = 1e-6,
                       linear_end: float = 1e-2, cosine_s: float = 8e-3, **_ignored) -> torch.Tensor:
    """β_1..β_T in float64, the official schedules: ``linear`` (linspace), ``quad`` (linspace of square roots,
    squared), ``warmup10`` / ``warmup50`` (linear_end, its first 10 % / 50 % a linspace from linear_start),
    ``const`` (linear_end), ``jsd`` (1/T, 1/(T-1), ..., 1), ``cosine`` (1 - ᾱ_t/ᾱ_{t-1} of ᾱ(t) = cos²(π/2 ·
    (t/T + s)/(1 + s)), at most 0.999)."""
    if n_timestep < 2:
        raise ValueError(f"n_timestep must be >= 2, got {n_timestep}")
    n, lo, hi = int(n_timestep), float(linear_start), float(linear_end)
    betas = None  # numpy float64 as the official code computes them (np.linspace and torch.linspace round apart)
    if schedule == "linear":
        betas = np.linspace(lo, hi, n, dtype=np.float64)
    elif schedule == "quad":
        betas = np.linspace(lo ** 0.5, hi ** 0.5, n, dtype=np.float64) ** 2
    elif schedule in ("warmup10", "warmup50"):
        betas = np.full(n, hi, dtype=np.float64)
        warm = int(n * (0.1 if schedule == "warmup10" else 0.5))
        betas[:warm] = np.linspace(lo, hi, warm, dtype=np.float64)
    elif schedule == "const":
        betas = np.full(n, hi, dtype=np.float64)
    elif schedule == "jsd":
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    if betas is not None:
        return torch.from_numpy(np.ascontiguousarray(betas))
    if schedule == "cosine":  # the official code computes this one with torch
        phase = (torch.arange(n + 1, dtype=torch.float64) / n + cosine_s) / (1 + cosine_s) * math.pi / 2
        alpha_bar = torch.cos(phase).pow(2)
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unsupported beta schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")


def schedule_buffers(betas: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The 6 float32 buffers of the official ``set_new_noise_schedule``, computed in float64."""
    betas = betas.double().cpu()
    alphas = 1.0 - betas
    gammas = torch.cumprod(alphas, 0)
    gammas_prev = torch.cat([gammas.new_ones(1), gammas[:-1]])
    post_var = betas * (1.0 - gammas_prev) / (1.0 - gammas)
    out = dict(gammas=gammas, sqrt_recip_gammas=torch.sqrt(1.0 / gammas),
               sqrt_recipm1_gammas=torch.sqrt(1.0 / gammas - 1),
               posterior_log_variance_clipped=torch.log(post_var.clamp_min(1e-20)),
               posterior_mean_coef1=betas * torch.sqrt(gammas_prev) / (1.0 - gammas),
               posterior_mean_coef2=(1.0 - gammas_prev) * torch.sqrt(alphas) / (1.0 - gammas))
    return {k: v.float() for k, v in out.items()}


def _phase_schedule(beta_schedule: Dict[str, Any], phase: str) -> Dict[str, Any]:
    # the official config nests {"train": {...}, "test": {...}}; a flat dict is accepted too
    if phase in beta_schedule and isinstance(beta_schedule[phase], dict):
        return beta_schedule[phase]
    if any(isinstance(v, dict) for v in beta_schedule.values()):
        raise ValueError(f"beta_schedule has no phase {phase!r}: {sorted(beta_schedule)}")
    return beta_schedule


# ---- the §3.2 inputs ---------------------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 1, 1)


def draw_noise_level(gammas: torch.Tensor, n: int, generator: Optional[torch.Generator] = None,
                     device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``t ~ randint(1, T)`` and ``γ ~ U(γ_{t−1}, γ_t)`` per row: ``(t [N] int64, gamma [N] fp32)``."""
    dev = generator.device if generator is not None else (device or gammas.device)
    t = torch.randint(1, gammas.shape[0], (n,), generator=generator, device=dev).to(gammas.device)
    u = torch.rand((n, 1), generator=generator, device=dev).to(gammas.device)
    g_prev, g_t = gammas[t - 1].view(n, 1), gammas[t].view(n, 1)
    return t, ((g_t - g_prev) * u + g_prev).view(n)


def q_sample(y_0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The standard corruption ``√γ·y0 + √(1−γ)·ε`` (``gamma [N]``)."""
    g = _rows(gamma)
    return g.sqrt() * y_0 + (1 - g).sqrt() * noise


def noisy_region_input(batch: PaletteBatch, gamma: torch.Tensor, noise: torch.Tensor,
                       noise_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The UNet input ``cat[y_cond, y_t·mask + (1−mask)·y0]`` ``[N, 2C, H, W]``.

    ``y_t`` is ``q_sample`` for every row, except rows in ``noise_rows`` (bool [N]), which get the reference's
    ``y_noisy`` with s = −1: ε up to its rounding (``c·ε + (1−c)·ε``, 1 ulp off ε in some pixels), computed in the
    reference's order so the teacher sees its bits; with s = +1 the formula is ``q_sample`` bit for bit.
    """
    gt, mask, y_cond = batch
    if noise_rows is None:
        y_t = q_sample(gt, gamma, noise)
    else:
        forget = noise_rows.to(device=gt.device, dtype=torch.bool)
        s = _rows(torch.where(forget, -1.0, 1.0).to(gt.dtype))  # the reference's label s
        g = _rows(gamma)
        c = (1 - g).sqrt()
        y_t = g.sqrt() * gt * (1 + s) / 2 + c * noise + (1 - c) * noise * (1 - s) / 2
    return torch.cat([y_cond, y_t * mask + (1.0 - mask) * gt], dim=1)


def palette_unlearn_inputs(gt: torch.Tensor, mask: torch.Tensor, y_cond: torch.Tensor, is_forget: torch.Tensor,
                           gammas: torch.Tensor, generator: Optional[torch.Generator] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of §3.2: ``(student_input, teacher_input [N, 2C, H, W], gamma [N])``.

    Draws t, γ, then ε (in that order) from ``generator``. The student sees the standard corruption on
    every row; the teacher sees it on retain rows and pure ε in the hole of forget rows.
    """
    batch = PaletteBatch(gt, mask, y_cond)
    _, gamma, noise = _draw_task(gammas, gt, generator)
    return (noisy_region_input(batch, gamma, noise), noisy_region_input(batch, gamma, noise, is_forget), gamma)


def _draw_task(gammas: torch.Tensor, gt: torch.Tensor, generator: Optional[torch.Generator]):
    n = gt.shape[0]
    t, gamma = draw_noise_level(gammas.to(gt.device), n, generator, gt.device)
    dev = generator.device if generator is not None else gt.device
    noise = torch.randn(gt.shape, generator=generator, device=dev, dtype=gt.dtype).to(gt.device)
    return t, gamma, noise


# ---- the model -------------------------------------------------------------------------------------
class Network(nn.Module, I2IModel):
    """Palette's ``models.network.Network``: schedule buffers + ``denoise_fn`` (+ ``teacher_denoise_fn``)."""

    family = "palette"
    image_range = (-1.0, 1.0)

    def __init__(self, unet: Dict[str, Any], beta_schedule: Dict[str, Any], phase: str = "train",
                 module_name: str = "guided_diffusion", init_weights: bool = True):
        super().__init__()
        if module_name not in ("guided_diffusion",):
            raise ValueError(f"only the guided_diffusion UNet is implemented, got module_name={module_name!r}")
        self.config = dict(unet=dict(unet), beta_schedule=copy.deepcopy(beta_schedule))
        self.set_noise_schedule(make_beta_schedule(**_phase_schedule(beta_schedule, phase)))
        self.denoise_fn = UNet(**unet)
        if init_weights and not self.denoise_fn.cond_embed[0].weight.is_meta:
            init_palette_weights(self.denoise_fn)

    # ---- schedule ---------------------------------------------------------------------------------
    def set_noise_schedule(self, betas: torch.Tensor) -> None:
        for name, value in schedule_buffers(betas).items():
            if name in self._buffers:
                self._buffers[name] = value.to(self._buffers[name].device)
            else:
                self.register_buffer(name, value)

    @property
    def num_timesteps(self) -> int:
        return int(self.gammas.shape[0])

    # ---- teacher ----------------------------------------------------------------------------------
    @property
    def has_teacher(self) -> bool:
        return "teacher_denoise_fn" in self._modules

    def attach_teacher(self) -> nn.Module:
        """``teacher_denoise_fn`` = a frozen eval-mode deep copy of ``denoise_fn`` (call after loading)."""
        if self.has_teacher:
            raise ValueError("a teacher is already attached")
        teacher = copy.deepcopy(self.denoise_fn)
        teacher.requires_grad_(False)
        self.teacher_denoise_fn = teacher.eval()
        return teacher

    def train(self, mode: bool = True) -> "Network":
        super().train(mode)
        if self.has_teacher:
            self.teacher_denoise_fn.eval()  # the reference's teacher follows train() (bug); ours never does
        return self

    # ---- the task ----------------------------------------------------------------------------------
    def prepare_inputs(self, images: Any) -> PaletteBatch:
        return as_palette_batch(images)

    def sample_task(self, images: Any, generator: Optional[torch.Generator] = None) -> TaskDraw:
        """``t [N]``, ``gamma [N]`` and ``noise`` ε like gt, drawn in the reference's order (t, γ, ε)."""
        gt = images if torch.is_tensor(images) else as_palette_batch(images).gt
        t, gamma, noise = _draw_task(self.gammas, gt, generator)
        return TaskDraw(t=t, gamma=gamma, noise=noise)

    def task_input(self, inputs: Any, task: TaskDraw, noise_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet input ``[N, 2C, H, W]`` for this draw (``noise_rows``: rows whose hole is pure ε)."""
        return noisy_region_input(as_palette_batch(inputs), task["gamma"], task["noise"], noise_rows)

    def forward_encoder_features(self, inputs: Any, task: TaskDraw, noise_rows: Optional[torch.Tensor] = None
                                 ) -> List[torch.Tensor]:
        """E(T(x)): the 13 feature maps ``[N, C_k, H_k, W_k]`` of ``denoise_fn`` (decoder skipped)."""
        return self.denoise_fn(self.task_input(inputs, task, noise_rows), task["gamma"], return_feat=True)

    @torch.no_grad()
    def teacher_encoder_features(self, inputs: Any, task: TaskDraw, noise_rows: Optional[torch.Tensor] = None
                                 ) -> List[torch.Tensor]:
        """The attached teacher's maps (no grad); ``noise_rows=is_forget`` gives the §3.2 teacher view."""
        if not self.has_teacher:
            raise ValueError("no teacher attached; call model.attach_teacher() after loading the checkpoint")
        return self.teacher_denoise_fn(self.task_input(inputs, task, noise_rows), task["gamma"], return_feat=True)

    def forward_encoder_task(self, inputs, task, prenorm: bool = False):
        raise NotImplementedError(
            "Palette's encoder output is a list of 13 feature maps of different sizes, and the loss takes a "
            "mean per map; use forward_encoder_features(inputs, task, noise_rows=...) with "
            "unlearn_fast.objective.palette_loss.palette_unlearn_loss")

    def encoder_parameter_names(self) -> List[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(ENCODER_PREFIXES)]

    # ---- full UNet (baselines, sampling) ---------------------------------------------------------
    def predict_noise(self, inputs: Any, task: TaskDraw, noise_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ε̂ ``[N, C, H, W]`` from the full UNet on this draw's input."""
        return self.denoise_fn(self.task_input(inputs, task, noise_rows), task["gamma"])

    def forward(self, inputs: Any, task: TaskDraw, noise_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.predict_noise(inputs, task, noise_rows)

    def forward_outputs(self, inputs: Any, task: TaskDraw) -> torch.Tensor:
        return self.predict_noise(inputs, task)

    def task_target(self, inputs: Any, task: TaskDraw) -> torch.Tensor:
        return task["noise"]

    def task_loss_terms(self, inputs: Any, task: TaskDraw, target: Optional[torch.Tensor] = None):
        """Palette's training loss per element: ``((mask·ε̂ − mask·ε)² [N, C·H·W], ones)``; summed per class and
        divided by the number of elements this gives the reference's whole-batch ``weighted_mse``."""
        batch = as_palette_batch(inputs)
        return self.task_loss_terms_of_outputs(self.predict_noise(batch, task), batch, task, target)

    def task_loss_terms_of_outputs(self, outputs: torch.Tensor, inputs: Any, task: TaskDraw,
                                   target: Optional[torch.Tensor] = None):
        mask = as_palette_batch(inputs).mask
        target = task["noise"] if target is None else target
        sq = (mask * outputs - mask * target).float().pow(2).flatten(1)  # [N, C·H·W]
        return sq, torch.ones_like(sq)

    def noisy_task_target(self, target: torch.Tensor, generator: Optional[torch.Generator] = None):
        raise NotImplementedError(
            "Palette's NOISY LABEL baseline changes the input, not the target: use "
            "predict_noise(inputs, task, noise_rows=is_forget) with palette_loss.palette_noisy_label_loss")


# ---- checkpoints ------------------------------------------------------------------------------------
def load_palette_checkpoint(model: Network, path_or_state: Union[str, os.PathLike, Dict[str, torch.Tensor]],
                            ignore_teacher_keys: Optional[bool] = None, require_schedule: bool = True) -> Network:
    """Load an official ``{epoch}_Network.pth`` (a plain state dict) strictly into ``model``.

    - A ``module.`` prefix (DDP) is stripped.
    - The file's schedule buffers replace the model's, whatever their length (as in the reference).
    - ``ignore_teacher_keys``: None = drop ``teacher_denoise_fn.*`` keys iff ``model`` has no teacher (what
      ``unlearn.py`` does before it makes the teacher); True / False to force.
    - ``require_schedule=False`` keeps the model's schedule when the file has none (``_ema.pth`` files).
    Any other missing, unexpected or shape-mismatched key raises a ValueError that lists them.
    """
    if isinstance(path_or_state, dict):
        state, where = path_or_state, "state dict"
    else:
        where = os.fspath(path_or_state)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"Palette checkpoint not found: {where}")
        state = read_checkpoint(where)
        if not isinstance(state, dict):
            raise ValueError(f"{where}: expected a plain state dict, got {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if ignore_teacher_keys is None:
        ignore_teacher_keys = not model.has_teacher
    if ignore_teacher_keys:
        state = {k: v for k, v in state.items() if not k.startswith("teacher_denoise_fn.")}

    present = [k for k in SCHEDULE_BUFFERS if k in state]
    if present:
        lengths = {tuple(state[k].shape) for k in present}
        if len(present) != len(SCHEDULE_BUFFERS) or len(lengths) != 1 or len(next(iter(lengths))) != 1:
            raise ValueError(f"{where}: the schedule buffers must be all 6, 1-D and of one length; "
                             f"found {[(k, tuple(state[k].shape)) for k in present]}")
        for k in SCHEDULE_BUFFERS:
            model._buffers[k] = state[k].to(model._buffers[k].device, torch.float32).clone()
    elif require_schedule:
        raise ValueError(f"{where}: no noise-schedule buffers ({', '.join(SCHEDULE_BUFFERS)}); an "
                         "{epoch}_Network_ema.pth file holds denoise_fn.* only: pass require_schedule=False")
    else:
        state = dict(state, **{k: model._buffers[k] for k in SCHEDULE_BUFFERS})

    parts = state_dict_mismatch(model.state_dict(), state)
    if parts:
        hint = (" (the model has a teacher the file lacks: load first, then attach_teacher())"
                if any(k.startswith("teacher_denoise_fn.") for k in model.state_dict() if k not in state) else "")
        raise ValueError(f"{where} does not match the model{hint}: " + "; ".join(parts))
    load_state_dict_strict(model, state, where)  # a meta-built Network takes the tensors (assign)
    return model


def save_palette_checkpoint(model: Network, path: Union[str, os.PathLike]) -> None:
    """Write ``{epoch}_Network.pth``: the plain state dict on CPU (buffers, denoise_fn, teacher if attached)."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.fspath(path))


# ---- registered sizes -------------------------------------------------------------------------------
PLACES2_UNET = dict(in_channel=6, out_channel=3, inner_channel=64, channel_mults=[1, 2, 4, 8], attn_res=[16],
                    num_head_channels=32, res_blocks=2, dropout=0.0, image_size=256)
PLACES2_SCHEDULE = dict(schedule="linear", n_timestep=2000, linear_start=1e-6, linear_end=0.01)
MICRO_UNET = dict(in_channel=6, out_channel=3, inner_channel=32, channel_mults=[1, 2], attn_res=[2],
                  num_head_channels=16, res_blocks=1, dropout=0.0, image_size=32)
MICRO_SCHEDULE = dict(schedule="linear", n_timestep=10, linear_start=1e-4, linear_end=0.2)


def _merged(defaults: Dict[str, Any], override: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out = dict(defaults)
    out.update(override or {})
    return out


@register_model
def palette(unet: Optional[Dict[str, Any]] = None, beta_schedule: Optional[Dict[str, Any]] = None,
            **kwargs) -> Network:
    """A Palette Network from the official config's ``unet`` / ``beta_schedule`` dicts (defaults: Places2)."""
    return Network(_merged(PLACES2_UNET, unet), beta_schedule or dict(train=PLACES2_SCHEDULE), **kwargs)


@register_model
def palette_places2(unet: Optional[Dict[str, Any]] = None, beta_schedule: Optional[Dict[str, Any]] = None,
                    **kwargs) -> Network:
    """``config/inpainting_places2_unlearn.json``: 62.6 M parameters, 256², linear 2000 steps 1e-6 -> 1e-2."""
    return Network(_merged(PLACES2_UNET, unet), beta_schedule or dict(train=PLACES2_SCHEDULE), **kwargs)


@register_model
def palette_micro(unet: Optional[Dict[str, Any]] = None, beta_schedule: Optional[Dict[str, Any]] = None,
                  **kwargs) -> Network:
    """Tiny Palette for tests and demos: 32², inner 32, two levels (5 feature maps), 10 diffusion steps."""
    return Network(_merged(MICRO_UNET, unet), beta_schedule or dict(train=MICRO_SCHEDULE), **kwargs)
