"""The student's matmul weights as bf16 copies that the optimizer writes (fast and graphed steps; opt-in knob
``half_student_weights`` until timed on a GPU).

In bf16 mode autocast casts every fp32 Linear / conv weight of the student to bf16 in each forward, autograd casts
each bf16 weight gradient back to fp32, the clip reads and scales the fp32 gradients and torch's fused AdamW reads
them again. Here the fast step runs a copy of the student whose trainable Linear / conv weights and biases are bf16
leaves (``half_teacher.with_half_gemm_weights(trainable=True)``; every other tensor is the student's own), so:
- the forward computes the same bits (autocast rounds fp32 to bf16 as the copy was rounded, and leaves bf16 as it
  is) and the gradients of those weights stay bf16;
- one kernel (ops/adamw_with_copies.py) updates the fp32 weights (the student's own parameters: checkpoints,
  evaluation and resume see them as always) and their moments in torch's optimizer state from the bf16 gradients
  times the clip's coefficient, and writes the new bf16 copies; the other trainable parameters (norms, tokens,
  embeddings) take torch's AdamW step as before.
By bytes for MAE-L (303 M weights) the casts, the clip and the update fall from about 15.7 GB to 9.1 GB a step.
The update is torch's fused AdamW math within a rounding (the clip norm's summation order, exp2 for the bias
corrections); the optimizer state keeps torch's layout (step, exp_avg, exp_avg_sq per parameter).

Used where :func:`half_student_blocker` finds nothing against it: bf16 autocast without loss scaling, one process
(the flat-gradient and DDP steps do not take it), the paper's objective, AdamW with amsgrad and maximize off and one
(betas, eps), on a GPU fused or capturable (the step counts on the device). Elsewhere the step runs as without the
knob and says why once. Gradient accumulation: after a micro-step without an update the copies' gradients move to
the masters' ``.grad`` in fp32 (where ``zero_grad``, checkpoints and the next micro-steps see them); a master's
``.grad`` is always part of its next update.

The copy follows the student as the bf16 teacher copy does (half_teacher.py): weights written in place outside
this update are rounded again before the next forward (not writes through ``.data``, which bump no version
counter); a new student, optimizer, parameter storage, parameter group or trainable set makes a new copy (weights
that require grad outside the optimizer stay fp32 in it; with no Linear / conv weight left to train the knob is
off, said once, until one trains again); each
module runs in its student module's train / eval mode and with its hooks. torch's optimizer hooks see the other
parameters' step (the copied weights are updated by the kernel). A CUDA graph needs its own
:class:`AddressTables` (:meth:`HalfStudent.new_tables`), written after capture.
"""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch
from torch import nn

from ..ops.adamw_with_copies import AddressTables, adamw_with_copies_, grad_sum_of_squares, is_dense
from .half_teacher import (_GEMM_MODULES, _GEMM_PARAMS, refuse_in_capture, tensor_storages, tensor_versions,
                           with_half_gemm_weights)
from .optimizer import clip_coefficient
from .precision import student_dtype
from .unlearn_setup import say_knob_off


ONE_PROCESS_ONLY = "it acts on one process, this run has several: their gradients are reduced in fp32"


def half_student_blocker(setup) -> Optional[str]:
    """None where the knob is on and the half student can serve ``setup``; else why not ("off": the knob)."""
    if not getattr(setup, "half_student_weights", False):
        return "off"
    if not isinstance(setup.student, nn.Module):  # a DDPStudent
        return ONE_PROCESS_ONLY
    if student_dtype(setup.precision, setup.device) != torch.bfloat16 or setup.scaler.is_enabled():
        return "it needs the student in bf16 autocast without loss scaling (--precision bf16)"
    if setup.loss_type is not None:
        return "the baselines run the reference step"
    opt = setup.optimizer
    if not isinstance(opt, torch.optim.AdamW):
        return f"the optimizer is {type(opt).__name__}, the kernel is AdamW's"
    groups = opt.param_groups
    if any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable") for g in groups):
        return "AdamW with amsgrad, maximize or differentiable"
    if any(torch.is_tensor(b) for g in groups for b in g["betas"]) or \
            len({(tuple(g["betas"]), g["eps"]) for g in groups}) != 1:
        return "the parameter groups need one (betas, eps), as floats"
    if setup.device.type == "cuda" and not all(g.get("fused") or g.get("capturable") for g in groups):
        return "on a GPU the optimizer must be fused or capturable (step counts on the device)"
    return None


def half_student_active(setup) -> bool:
    """Whether the fast step runs the half student for ``setup`` (a notice once, from rank 0, when the knob is on but
    cannot be honoured)."""
    reason = half_student_blocker(setup)
    if reason not in (None, "off"):
        say_knob_off(setup, "half_student_weights", reason)
    return reason is None


def _holds_gemm_weights(student: nn.Module, optimizer) -> bool:
    """Whether a copy would hold anything: a trainable Linear / conv weight or bias that the optimizer updates."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return any(isinstance(m, _GEMM_MODULES) and t is not None and t.requires_grad and id(t) in held
               for m in student.modules() for n, t in m._parameters.items() if n in _GEMM_PARAMS)


class HalfStudent:
    """The bf16-weight copy of ``student`` (:attr:`module`), its (master, copy) pairs in the optimizer's order, and
    what the update needs: each master's parameter group, device arrays for the groups' lr and weight decay,
    and the eager steps' :class:`AddressTables`."""

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16):
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        # weights that require grad outside the optimizer (unfrozen mid-run) stay the student's own fp32 tensors in
        # the copy, their gradients on them and never applied, as without the copy: not copied while marked frozen
        outside = [p for p in student.parameters() if p.requires_grad and id(p) not in group_of]
        for p in outside:
            p.requires_grad_(False)
        try:
            module = with_half_gemm_weights(student, dtype, trainable=True)
        finally:
            for p in outside:
                p.requires_grad_(True)
        pairs = module._half_gemm_pairs
        if not pairs:
            raise ValueError("the student has no trainable Linear / conv weight: nothing to keep in bf16")
        gapped = [i for i, (m, _) in enumerate(pairs) if not is_dense(m)]
        if gapped:
            raise ValueError(f"{len(gapped)} trainable Linear / conv weights of the student are views with gaps or "
                             "overlaps (not dense): the AdamW kernel walks each weight as one run of memory; "
                             "turn half_student_weights off for this model")
        self.module = module
        self.masters: List[nn.Parameter] = [m for m, _ in pairs]
        self.copies: List[nn.Parameter] = [c for _, c in pairs]
        self.groups = [group_of[id(m)] for m in self.masters]
        ids = {id(m) for m in self.masters}
        self.others = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in ids]
        self.source, self.optimizer = weakref.ref(student), weakref.ref(optimizer)
        self.storages, self.versions = tensor_storages(self.masters), tensor_versions(self.masters)
        self.signature = _training_signature(student, optimizer)
        dev = self.masters[0].device
        self.lrs = torch.zeros(len(optimizer.param_groups), dtype=torch.float32, device=dev)
        self.weight_decays = torch.zeros_like(self.lrs)
        self.one = torch.ones((), dtype=torch.float32, device=dev)
        self.tables = self.new_tables()

    def new_tables(self) -> AddressTables:
        return AddressTables([m.numel() for m in self.masters], self.groups, self.masters[0].device)

    def follows(self, student: nn.Module, optimizer) -> bool:
        """Still a copy of what trains: the same student and optimizer, the weights in the same storage, the same
        parameter groups and the same trainable set (a weight frozen or a group added since: a new copy)."""
        return (self.source() is student and self.optimizer() is optimizer
                and tensor_storages(self.masters) == self.storages
                and _training_signature(student, optimizer) == self.signature)

    def follow_modes(self, student: nn.Module) -> None:
        """Every module of the copy in its student module's train / eval mode (a submodule may differ)."""
        for a, b in zip(student.modules(), self.module.modules()):
            if b.training != a.training:
                b.training = a.training

    def take_gradients(self) -> None:
        """Move the copies' bf16 gradients onto the masters' ``.grad`` in fp32 (added to what is there): between
        micro-steps of an accumulation the gradient lives where ``zero_grad`` and checkpoints see it, and adds up
        in fp32 as autocast's fp32 gradients do."""
        for m, c in zip(self.masters, self.copies):
            if c.grad is not None:
                if m.grad is None:
                    m.grad = _laid_out_as(c.grad.float(), m)
                else:
                    m.grad.add_(c.grad)
                c.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Round the masters into the copies again (they were written outside :func:`half_student_update`)."""
        for c, m in zip(self.copies, self.masters):
            c.copy_(m)
        self.versions = tensor_versions(self.masters)


def _training_signature(student: nn.Module, optimizer) -> tuple:
    """What a copy depends on beyond storage: each group's parameters and every parameter's requires_grad."""
    return (tuple(tuple(id(p) for p in g["params"]) for g in optimizer.param_groups),
            tuple(p.requires_grad for p in student.parameters()))


def _laid_out_as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only when they differ: the kernel walks both in one memory order)."""
    if t.stride() == like.stride() or t.numel() <= 1:
        return t
    return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device).copy_(t)


def step_student(setup) -> nn.Module:
    """The student module the fast step runs: the half student where :func:`half_student_active` (made on first
    use, kept on the setup, refreshed when its weights were written elsewhere), else ``setup.student``."""
    if not half_student_active(setup):
        return setup.student
    half = setup.half_student
    changed = "the student's weights, trainable set or optimizer"
    if half is None or not half.follows(setup.student, setup.optimizer):
        copying = _holds_gemm_weights(setup.student, setup.optimizer)  # (every Linear / conv frozen mid-run: none)
        if half is not None or copying:
            refuse_in_capture("a new bf16 student copy", changed)
        if half is not None:
            half.take_gradients()  # a pending accumulation stays with the masters
        setup.half_student = None  # the old copy's memory goes before the new one is made
        if not copying:  # checked again each step (no copy made) until a Linear / conv weight trains again
            say_knob_off(setup, "half_student_weights",
                         "no trainable Linear / conv weight is in the optimizer: nothing to keep in bf16")
            return setup.student
        setup.half_student = half = HalfStudent(setup.student, setup.optimizer)
    elif tensor_versions(half.masters) != half.versions:
        refuse_in_capture("re-rounding the bf16 student copy", changed)
        half.refresh()
    half.follow_modes(setup.student)
    return half.module


def _state_of(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> dict:
    """``p``'s AdamW state, made as torch's AdamW makes it on a parameter's first step."""
    state = optimizer.state[p]
    if not state:
        on_device = group.get("capturable") or group.get("fused")
        state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                         else torch.tensor(0.0, dtype=torch.float32))
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def half_student_take_gradients(setup) -> None:
    """After a micro-step without an update (``fast_step(update=False)``): the copies' gradients onto the masters'
    ``.grad`` (fp32), where the next micro-steps add to them and ``zero_grad`` clears them, as without the copy."""
    if setup.half_student is not None and half_student_active(setup):
        setup.half_student.take_gradients()


@torch.no_grad()
def half_student_update(setup, tables: Optional[AddressTables] = None) -> None:
    """The update after a backward through the half student: clip over all gradients, the kernel for the copied
    weights, torch's AdamW step for the others, then every gradient None. No host sync (CUDA-graph capturable).
    A copied weight's gradient is its copy's (bf16) plus what its master's ``.grad`` holds (fp32: micro-steps of an
    accumulation, a gradient left by another step), one AdamW step for both as without the copy.
    ``tables``: a CUDA graph's own (None: the eager steps')."""
    half, opt = setup.half_student, setup.optimizer
    tables = half.tables if tables is None else tables
    present = [i for i, (m, c) in enumerate(zip(half.masters, half.copies)) if c.grad is not None or m.grad is not None]
    if len(present) != len(half.copies):  # weights outside the loss: torch's AdamW leaves them alone, so here too
        tables = None  # the twin, on the ones that have a gradient
    if any(half.masters[i].grad is not None for i in present):
        half.take_gradients()  # fp32 on the masters: the kernel reads them there
        grads = [half.masters[i].grad for i in present]
    else:
        grads = [_laid_out_as(half.copies[i].grad, half.masters[i]) for i in present]
    masters = [half.masters[i] for i in present]
    states = [_state_of(opt, m, opt.param_groups[half.groups[i]]) for m, i in zip(masters, present)]
    others = [p.grad for p in half.others if p.grad is not None]
    coef = half.one
    if setup.grad_clip is not None:  # clip_grad_norm_'s coefficient over both sets of gradients
        squares = grad_sum_of_squares(grads, tables).to(half.one.device)
        if others:
            squares = squares + torch.stack(torch._foreach_norm(others, 2.0)).float().pow(2).sum()
        coef = clip_coefficient(squares.sqrt(), setup.grad_clip)
        if others:
            torch._foreach_mul_(others, coef)
    for i, g in enumerate(opt.param_groups):
        if torch.is_tensor(g["lr"]):
            half.lrs[i].copy_(g["lr"])
        else:
            half.lrs[i].fill_(float(g["lr"]))
        half.weight_decays[i].fill_(float(g["weight_decay"]))
    group0 = opt.param_groups[0]
    adamw_with_copies_(masters, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       [s["step"] for s in states], grads, [half.copies[i] for i in present],
                       [half.groups[i] for i in present], half.lrs, half.weight_decays, group0["betas"],
                       group0["eps"], coef, tables)
    for m in masters:
        m.grad = None  # updated above: torch's step below must not take them again
    for c in half.copies:
        c.grad = None
    opt.step()  # the other parameters (and the optimizer's hooks, as every step without the copy)
    setup.scaler.update()  # no loss scaling here: a no-op, kept as optimizer_update's order
    opt.zero_grad(set_to_none=True)
    half.versions = tensor_versions(half.masters)  # the twin writes in place: not an outside change


__all__ = ["half_student_blocker", "half_student_active", "HalfStudent", "step_student", "half_student_update",
           "half_student_take_gradients"]
