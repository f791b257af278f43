"""What one unlearning step needs: student, frozen teacher, optimizer, loss scaler and the knobs."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..objective import TRAINS_ENCODER_ONLY, check_loss_type, check_weighting
from ..ops import NOISE_KINDS
from .optimizer import build_adamw
from .precision import check_precision, make_grad_scaler


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of the model before unlearning (never the partly unlearned student)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def freeze_all_but(model: nn.Module, names) -> None:
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


@dataclass
class UnlearnSetup:
    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str = "reference"
    retain_alpha: float = 1.0
    forget_alpha: float = 0.0
    noise_type: str = "normal"
    grad_clip: Optional[float] = 3.0
    accum_iter: int = 1
    seed: int = 0
    rank: int = 0
    loss_type: Optional[str] = None          # None: the paper's objective; else a baseline
    baseline_weighting: str = "reference"
    share_tokenizer: bool = False            # share prepare_inputs between student and teacher (see §11)
    overlap_teacher: bool = True             # CUDA: the teacher's pass on a side stream (teacher_stream.py)
    fuse_tokenizer_norms: bool = True        # CUDA fast step: VQGAN GroupNorm + swish as one kernel
    sdpa_attention: bool = True              # CUDA fast step: MAGE attention as scaled_dot_product_attention
    visible_patch_embed: bool = True         # fast step: MAE embeds the visible patches alone (one GEMM)
    tokenizer_channels_last: bool = False    # CUDA fast step: the VQGAN encoder in NHWC (opt-in, untimed)
    fuse_block_norms: bool = False           # CUDA fast step: ViT residual add + LayerNorm fused (opt-in, untimed)
    pad_tokenizer_input: bool = True         # CUDA fast step, half precision: the VQGAN's conv_in over 8 channels
    fuse_residual_pools: bool = True         # CUDA fast step: a VQGAN level's last residual add + its pool fused
    half_teacher_weights: bool = True        # fast step, bf16: the teacher's GEMM weights pre-cast (half_teacher.py)
    trainable: list = field(default_factory=list)
    teacher_stream: Optional[object] = field(default=None, repr=False, compare=False)  # made on first use
    half_teacher: Optional[nn.Module] = field(default=None, repr=False, compare=False)  # half_teacher.py

    @property
    def trainable_params(self):
        return self.trainable


def build_setup(model: nn.Module, device, lr: float = 1e-4, weight_decay: float = 0.05, precision="reference",
                retain_alpha=1.0, forget_alpha=0.0, noise_type="normal", grad_clip=3.0, accum_iter=1, seed=0,
                rank=0, loss_type=None, baseline_weighting="reference", share_tokenizer=False, fast=False,
                capturable=False, teacher: Optional[nn.Module] = None, overlap_teacher=True,
                fuse_tokenizer_norms=True, sdpa_attention=True, visible_patch_embed=True,
                tokenizer_channels_last=False, fuse_block_norms=False) -> UnlearnSetup:
    """Teacher copy, trainable subset, optimizer and scaler for ``model`` (which becomes the student)."""
    device = torch.device(device)
    check_precision(precision)
    if noise_type not in NOISE_KINDS:
        raise ValueError(f"unknown --noise_type {noise_type!r}; valid: {', '.join(NOISE_KINDS)}")
    if loss_type is not None:
        check_loss_type(loss_type)
    check_weighting(baseline_weighting)
    if accum_iter < 1:
        raise ValueError(f"--accum_iter must be >= 1, got {accum_iter}")
    model = model.to(device)
    teacher = make_teacher(model) if teacher is None else teacher.to(device).eval().requires_grad_(False)
    encoder_only = loss_type is None or TRAINS_ENCODER_ONLY[loss_type]
    if encoder_only:
        freeze_all_but(model, model.encoder_parameter_names())
    # whole-model baselines train what the model leaves trainable (not the tokenizer or fixed pos embeds)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_adamw(named, lr, weight_decay, device, fast=fast, capturable=capturable)
    return UnlearnSetup(student=model, teacher=teacher, optimizer=opt, scaler=make_grad_scaler(precision, device),
                        device=device, precision=precision, retain_alpha=retain_alpha, forget_alpha=forget_alpha,
                        noise_type=noise_type, grad_clip=grad_clip, accum_iter=accum_iter, seed=seed, rank=rank,
                        loss_type=loss_type, baseline_weighting=baseline_weighting, share_tokenizer=share_tokenizer,
                        overlap_teacher=bool(overlap_teacher), fuse_tokenizer_norms=bool(fuse_tokenizer_norms),
                        sdpa_attention=bool(sdpa_attention), visible_patch_embed=bool(visible_patch_embed),
                        tokenizer_channels_last=bool(tokenizer_channels_last), fuse_block_norms=bool(fuse_block_norms),
                        trainable=[p for _, p in named])
