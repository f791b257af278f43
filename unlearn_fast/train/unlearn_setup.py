"""What one unlearning step needs: student, frozen teacher, optimizer, loss scaler and the knobs."""
from __future__ import annotations

import copy
import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
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


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"device must be a torch.device or a name like 'cpu' or 'cuda:0', got {device!r}") from e
    if device.type not in ("cpu", "cuda"):  # the steps, kernels and loss scaler exist for these two
        raise ValueError(f"device {str(device)!r} is not supported: use 'cpu' or 'cuda' / 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available here")
    return device


def _check_model(model, name: str) -> None:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "encoder_parameter_names", None)):
        raise TypeError(f"{name} must be a model from unlearn_fast.create_model (an nn.Module with the I2I "
                        f"protocol, models/adapter.py), got {type(model).__name__}")
    if getattr(model, "family", None) == "palette":  # its batches carry masks: the steps here take images alone
        raise TypeError(f"{name} is a Palette network: it unlearns with build_palette_setup (train/palette_steps.py) "
                        "and palette_train_loop (train/palette_trainer.py), not build_setup / train_loop")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"the {name}'s weights are on the meta device (shapes without values): build it outside "
                         "torch.device('meta'), or load a state dict into it with assign=True first")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:  # fp16 failed inside autocast, bf16 rounded AdamW's updates away, fp64 ignored `precision`
        raise TypeError(f"the {name}'s parameters are {', '.join(dtypes)}: build_setup takes fp32 weights (the "
                        f"optimizer's master copy) and runs the compute in the dtype of precision= ('reference', "
                        f"'bf16' or 'fp32'); pass {name}.float()")


def _check_teacher(teacher, model) -> None:
    _check_model(teacher, "teacher")
    if teacher is model:
        raise ValueError("teacher is the model itself: the teacher must be a separate frozen copy (omit it to "
                         "have one made)")
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    t_shapes = {n: tuple(p.shape) for n, p in teacher.state_dict().items()}
    if shapes != t_shapes:
        diff = sorted(set(shapes.items()) ^ set(t_shapes.items()))[:4]
        raise ValueError(f"teacher ({type(teacher).__name__}) and model ({type(model).__name__}) differ in "
                         f"architecture; first differing state-dict entries: {diff}")


def check_int(value, name: str, low: Optional[int]) -> int:
    """``value`` as an int (a bool or float is a TypeError), >= ``low`` unless ``low`` is None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_real(value, name: str, low: Optional[float], above: bool = False) -> float:
    """``value`` as a float: finite, and >= ``low`` (> ``low`` with ``above``) unless ``low`` is None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or (low is not None and (value <= low if above else value < low)):
        bound = '' if low is None else f" and {'>' if above else '>='} {low:g}"
        raise ValueError(f"{name} must be finite{bound}, got {value}")
    return float(value)


def _check_switch(value, name: str) -> bool:
    # bool("no") is True: a string (or None) would silently switch a knob on or off
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


# model -> {name: weight sum} of its trainable parameters when a build_setup made its teacher (weak: no leak)
_built_from = weakref.WeakKeyDictionary()


def _weight_sums(model: nn.Module, names) -> dict:
    params = dict(model.named_parameters())
    names = [n for n in names if n in params]
    if not names:
        return {}
    dev = params[names[0]].device
    sums = torch.stack([params[n].detach().sum(dtype=torch.float64).to(dev) for n in names])  # one device read
    return dict(zip(names, sums.tolist()))


def _check_not_trained_since_built(model: nn.Module) -> None:
    """A second build_setup without ``teacher=`` copies the model as it is now: refused once an earlier setup has
    trained it (or other weights were loaded), since the copy would be a partly unlearned teacher (REFERENCE §11)."""
    then = _built_from.get(model)
    if then is not None and _weight_sums(model, then) != then:
        raise ValueError("model has changed since an earlier build_setup made its teacher (it was trained, or other "
                         "weights were loaded): a copy of it now would make the partly unlearned model the teacher. "
                         "Pass teacher= (the earlier setup's .teacher, or the original model), or a fresh model")


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
    tokenizer_channels_last: bool = True     # CUDA fast step: the VQGAN encoder in NHWC (H100: 1.13-1.20x MAGE-B)
    fuse_block_norms: bool = True            # CUDA fast step: ViT residual add + LayerNorm fused (H100 bf16: 1.04-1.14x)
    pad_tokenizer_input: bool = True         # CUDA fast step, half precision: the VQGAN's conv_in over 8 channels
    fuse_residual_pools: bool = True         # CUDA fast step: a VQGAN level's last residual add + its pool fused
    defer_branch_bias: bool = False          # CUDA fast step, fused block norms: proj / fc2 biases added in the
                                             # fused add + LayerNorm (models/fused_blocks.py; A/B until timed)
    half_teacher_weights: bool = True        # fast step, bf16: the teacher's GEMM weights pre-cast (half_teacher.py)
    fold_clip: bool = False                  # fast step, no loss scaling: clip's scale inside fused AdamW (opt-in)
    half_student_weights: bool = False       # fast step, bf16: the student's GEMM weights as optimizer-written bf16
                                             # copies (half_student.py; opt-in until timed)
    trainable: list = field(default_factory=list)
    teacher_stream: Optional[object] = field(default=None, repr=False, compare=False)  # made on first use
    half_teacher: Optional[nn.Module] = field(default=None, repr=False, compare=False)  # half_teacher.py
    half_student: Optional[object] = field(default=None, repr=False, compare=False)  # half_student.py

    @property
    def trainable_params(self):
        return self.trainable

    def __getstate__(self):
        # the side stream and the bf16 teacher copy are caches made on first use: a CUDA stream and the copy's weak
        # reference to its source cannot be pickled, and a deep copy must make its own
        state = dict(self.__dict__)
        state["teacher_stream"] = state["half_teacher"] = state["half_student"] = None
        return state


def build_setup(model: nn.Module, device, lr: float = 1e-4, weight_decay: float = 0.05, precision="reference",
                retain_alpha=1.0, forget_alpha=0.0, noise_type="normal", grad_clip=3.0, accum_iter=1, seed=0,
                rank=0, loss_type=None, baseline_weighting="reference", share_tokenizer=False, fast=False,
                capturable=False, teacher: Optional[nn.Module] = None, overlap_teacher=True,
                fuse_tokenizer_norms=True, sdpa_attention=True, visible_patch_embed=True,
                tokenizer_channels_last=True, fuse_block_norms=True, fold_clip=False,
                half_student_weights=False, defer_branch_bias=False) -> UnlearnSetup:
    """Teacher copy, trainable subset, optimizer and scaler for ``model`` (which becomes the student).

    ``model``: an MAE or MAGE model of :func:`unlearn_fast.create_model` with fp32 weights (Palette networks use
    ``build_palette_setup``). It becomes the student in place: moved to ``device`` ('cpu', 'cuda' or 'cuda:N'), put
    in train mode, and every parameter outside the encoder frozen; the encoder parameters it marks trainable are
    trained (``requires_grad=False`` ones, e.g. MAE's fixed ``pos_embed``, stay frozen).
    ``teacher``: the frozen original (default: a copy of ``model`` made now); same architecture, another object.
    Building again on a model an earlier setup has trained needs ``teacher=`` (a copy would be partly unlearned).
    ``lr`` (> 0): the optimizer's lr until :func:`~unlearn_fast.train.trainer.train_loop`, whose ``lr`` schedule
    then sets it every step; ``weight_decay`` (>= 0): AdamW's, on weights but not biases and norms.
    ``precision``: 'reference' (fp16 autocast student on a GPU, bf16 on the CPU, fp32 teacher, loss scaling),
    'bf16' or 'fp32'. ``retain_alpha`` / ``forget_alpha`` (>= 0): the weights of L_R and L_F (the reference's
    default forget_alpha 0 forgets nothing; the paper uses e.g. 0.2). ``noise_type``: 'normal', 'uniform' or
    'constant'. ``grad_clip``: max global gradient norm (None: no clip). ``accum_iter``: micro-steps per update.
    ``seed``, ``rank``: every step's randomness is drawn from (seed, rank, step). ``loss_type``: None (the paper's
    objective) or a baseline ('max_full_model_loss', 'full_model_noise', 'encoder_noise', 'learn_others'), with
    ``baseline_weighting`` 'reference' or 'corrected'. ``fast``: torch's fused AdamW on a GPU (no effect on the
    CPU); ``capturable``: its state on the GPU, for the CUDA-graph step. The remaining bools are the fast step's A/B
    switches (README, "unlearn_fast's own flags"); each must be True or False.
    """
    device = _check_device(device)
    _check_model(model, "model")
    check_precision(precision)
    if noise_type not in NOISE_KINDS:
        raise ValueError(f"unknown --noise_type {noise_type!r}; valid: {', '.join(NOISE_KINDS)}")
    if loss_type is not None:
        check_loss_type(loss_type)
    check_weighting(baseline_weighting)
    accum_iter, seed, rank = (check_int(v, name, low) for v, name, low in
                              ((accum_iter, "--accum_iter", 1), (seed, "--seed", 0), (rank, "rank", 0)))
    lr = check_real(lr, "--lr", 0.0, above=True)  # lr 0 trains nothing (the CLI refuses it too)
    # a negative weight would ascend its term
    weight_decay, retain_alpha, forget_alpha = (check_real(v, name, 0.0) for v, name in (
        (weight_decay, "--weight_decay"), (retain_alpha, "--retain_alpha"), (forget_alpha, "--forget_alpha")))
    if grad_clip is not None:
        check_real(grad_clip, "--grad_clip (or None: no clipping)", 0.0, above=True)
    switches = {name: _check_switch(value, name) for name, value in dict(
        share_tokenizer=share_tokenizer, fast=fast, capturable=capturable, overlap_teacher=overlap_teacher,
        fuse_tokenizer_norms=fuse_tokenizer_norms, sdpa_attention=sdpa_attention,
        visible_patch_embed=visible_patch_embed, tokenizer_channels_last=tokenizer_channels_last,
        fuse_block_norms=fuse_block_norms, fold_clip=fold_clip, half_student_weights=half_student_weights,
        defer_branch_bias=defer_branch_bias).items()}
    if teacher is not None:
        _check_teacher(teacher, model)
    else:
        _check_not_trained_since_built(model)
    model = model.to(device)
    teacher = make_teacher(model) if teacher is None else teacher.to(device).eval().requires_grad_(False)
    encoder_only = loss_type is None or TRAINS_ENCODER_ONLY[loss_type]
    if encoder_only:
        names = list(model.encoder_parameter_names())
        if not names:
            raise ValueError(f"{type(model).__name__} has no trainable encoder parameter (requires_grad is False on "
                             "all of them): nothing to unlearn; pass a model whose encoder is not frozen")
        freeze_all_but(model, names)
    # whole-model baselines train what the model leaves trainable (not the tokenizer or fixed pos embeds)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_adamw(named, lr, weight_decay, device, fast=switches["fast"], capturable=switches["capturable"])
    _built_from[model] = _weight_sums(model, [n for n, _ in named])
    return UnlearnSetup(student=model, teacher=teacher, optimizer=opt, scaler=make_grad_scaler(precision, device),
                        device=device, precision=precision, retain_alpha=retain_alpha, forget_alpha=forget_alpha,
                        noise_type=noise_type, grad_clip=grad_clip, accum_iter=accum_iter, seed=seed, rank=rank,
                        loss_type=loss_type, baseline_weighting=baseline_weighting,
                        share_tokenizer=switches["share_tokenizer"], overlap_teacher=switches["overlap_teacher"],
                        fuse_tokenizer_norms=switches["fuse_tokenizer_norms"],
                        sdpa_attention=switches["sdpa_attention"], visible_patch_embed=switches["visible_patch_embed"],
                        tokenizer_channels_last=switches["tokenizer_channels_last"],
                        fuse_block_norms=switches["fuse_block_norms"], fold_clip=switches["fold_clip"],
                        half_student_weights=switches["half_student_weights"],
                        defer_branch_bias=switches["defer_branch_bias"], trainable=[p for _, p in named])


_knobs_said = set()  # (knob, reason) pairs already printed in this process


def say_knob_off(setup, knob: str, reason: str) -> None:
    """An opt-in knob of ``setup`` that is on but cannot be honoured: one line, once per (knob, reason), from rank 0
    alone (every rank declines it alike)."""
    if (knob, reason) not in _knobs_said and getattr(setup, "rank", 0) == 0:
        _knobs_said.add((knob, reason))
        print(f"unlearn_fast: {knob} is off for this run: {reason}")
