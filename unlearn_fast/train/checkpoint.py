"""Checkpoints in the reference layout (REFERENCE.md §1.7, §11), written atomically.

``checkpoint-{epoch}.pth`` = ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` like the official
trainer, with ``args`` a plain dict so ``torch.load(weights_only=True)`` works, plus ``'unlearn_fast'``
(step position for exact resume). Beside it, the trained parameters alone as safetensors. Official
checkpoints that pickle an ``argparse.Namespace`` still load (allow-listed).

``checkpoint-last.pth`` (``--save_every_steps``) is the newest state, mid-epoch or at an epoch end; its
top-level ``epoch`` is the last *finished* epoch (-1 for none) so a reference-style loader restarts the
unfinished epoch, while ``'unlearn_fast'`` holds the exact position (see ``train_loop``).

Both files are written whole or not at all (``unlearn_fast.atomic_files``): a crash or a kill leaves either
the old or the new file, never a torn one; a write that fails (disk full, ...) raises ``OutputWriteError``
naming the file.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Dict, Optional

import torch
from torch import nn

from ..atomic_files import atomic_save, atomic_save_safetensors
from ..models.state_dict_io import CheckpointError, read_checkpoint, state_dict_mismatch, unusable_tensors


def load_checkpoint_file(path: str) -> dict:
    """A checkpoint dictionary (see :func:`read_checkpoint`); CheckpointError when the file holds anything else."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def model_state_from(ckpt: dict, path: str = "") -> dict:
    """The model state dict of a checkpoint: ``ckpt['model']`` or the dict itself."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {path!r} has no model state dict")
    return state


_POSITION_TABLES = ("pos_embed", "decoder_pos_embed")


def _what_fits(model: nn.Module, state: dict) -> str:
    """The conclusion a mismatch leads to, said first: the image size an MAE's position tables were made for,
    or the registered models whose state dict the file fits (each built on the meta device: no memory)."""
    own = model.state_dict()
    shapes_differ = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if (own.keys() == state.keys() and shapes_differ and set(shapes_differ) <= set(_POSITION_TABLES)
            and isinstance(patch, int)):
        grid = math.isqrt(max(state["pos_embed"].shape[1] - 1, 0))
        if grid * grid == state["pos_embed"].shape[1] - 1:
            return f"its position tables are for {grid * patch}-pixel images: pass --input_size {grid * patch}"
    from ..models import create_model, list_models
    fits = []
    for name in list_models():
        try:
            with torch.device("meta"):
                candidate = create_model(name).state_dict()
        except Exception:  # a model that cannot be built without arguments fits nothing here
            continue
        if candidate.keys() == state.keys() and all(tuple(v.shape) == tuple(state[k].shape)
                                                     for k, v in candidate.items()):
            fits.append(name)
    if fits:
        return f"the file fits --model {' / '.join(fits[:3])} (at its default --input_size)"
    return "is --model the architecture this checkpoint was trained with?"


def load_model_state(model: nn.Module, state: dict, path: str = "", strict: bool = True) -> None:
    """Strict load with one readable message listing missing, unexpected and mis-shaped keys (non-strict:
    only mis-shaped keys are errors)."""
    parts = state_dict_mismatch(model.state_dict(), state)
    if not strict:
        parts = [p for p in parts if "shape mismatches" in p]
    if parts:
        fits = _what_fits(model, state)
        if fits.startswith("its position tables"):  # the grid diagnosis again, in tokens: said once is enough
            parts = [p for p in parts if not p.startswith("position tables for")]
        raise CheckpointError(f"checkpoint {path!r} does not fit model {type(model).__name__}: "
                              f"{fits}; " + "; ".join(parts))
    unusable = unusable_tensors(state)
    if unusable:
        raise CheckpointError(f"checkpoint {path!r}: {unusable}")
    model.load_state_dict(state, strict=strict)


def args_as_dict(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v))
            for k, v in dict(args).items()}


# a fresh torch GradScaler's state (init_scale 2**16, growth 2, backoff 0.5, interval 2000): what a run without loss
# scaling (CPU, --precision bf16 / fp32) saves, because the reference's loader loads 'scaler' into an enabled
# GradScaler, which refuses the empty state of a disabled one
FRESH_SCALER_STATE = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 0}


def save_unlearn_checkpoint(output_dir: str, epoch: int, model: nn.Module, optimizer, scaler, args,
                            trainable_names, position: Optional[dict] = None, tag: Optional[str] = None,
                            safetensors: bool = True, optimizer_layout: Optional[list] = None) -> str:
    """``checkpoint-{tag or epoch}.pth`` (+ ``.safetensors`` of the trained parameters unless
    ``safetensors=False``). ``optimizer_layout``: see :func:`optimizer_state_in_layout`. Returns the .pth path."""
    name = f"checkpoint-{tag if tag is not None else epoch}"
    path = os.path.join(output_dir, name + ".pth")
    obj = {"model": model.state_dict(), "optimizer": optimizer_state_in_layout(model, optimizer, optimizer_layout),
           "epoch": int(epoch), "scaler": scaler.state_dict() or dict(FRESH_SCALER_STATE), "args": args_as_dict(args),
           "unlearn_fast": dict(position or {})}
    atomic_save(obj, path)
    if safetensors:
        params = dict(model.named_parameters())
        atomic_save_safetensors({n: params[n] for n in trainable_names if n in params},
                                os.path.join(output_dir, name + ".safetensors"))
    return path


def optimizer_group_names(named_params, weight_decay: float = 0.05) -> list:
    """Names of the trainable parameters in each AdamW group, in optimizer index order (no-decay group first,
    as timm's ``add_weight_decay`` that the reference uses)."""
    from .optimizer import param_groups_weight_decay
    named = [(n, p) for n, p in named_params if p.requires_grad]
    name_of = {id(p): n for n, p in named}
    return [[name_of[id(p)] for p in g["params"]] for g in param_groups_weight_decay(named, weight_decay)]


def remap_optimizer_state(saved: dict, saved_group_names: list, own_group_names: list,
                          allow_new: bool = False) -> Optional[dict]:
    """An optimizer ``state_dict`` over the parameters ``saved_group_names`` (names per group, in index order)
    re-indexed for an optimizer over ``own_group_names``, or None if the layouts do not correspond.
    ``allow_new``: names of ``own_group_names`` that ``saved`` lacks get an index and no state (every saved
    name must still have a place).

    The official trainer's AdamW holds every trainable parameter of the model (decoder and MLM head too,
    which never get a gradient and so have no state), while encoder unlearning here optimizes only the
    encoder: an official ``checkpoint-N.pth`` needs this re-indexing to continue, and ours the reverse
    (``allow_new``) so that the official loader reads it."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(own_group_names):
        return None
    if [len(g.get("params", ())) for g in groups] != [len(names) for names in saved_group_names]:
        return None
    index_of = {n: i for g, names in zip(groups, saved_group_names) for i, n in zip(g["params"], names)}
    if allow_new and not set(index_of) <= {n for names in own_group_names for n in names}:
        return None  # a saved parameter's state would be lost
    new_state, new_groups, k = {}, [], 0
    for group, names in zip(groups, own_group_names):
        indices = []
        for name in names:
            if name not in index_of:
                if not allow_new:
                    return None
            elif index_of[name] in state:
                new_state[k] = state[index_of[name]]
            indices.append(k)
            k += 1
        new_groups.append({**{key: v for key, v in group.items() if key != "params"}, "params": indices})
    return {"state": new_state, "param_groups": new_groups}


def optimizer_state_in_layout(model: nn.Module, optimizer, layout: Optional[list]) -> dict:
    """``optimizer.state_dict()`` re-indexed for ``layout`` (names per AdamW group, e.g. every trainable parameter
    of the model before the encoder-only freeze: the official trainer's optimizer, which its ``misc.load_model``
    loads the file into); as is without a layout, or when the optimizer's parameters do not fit it."""
    state = optimizer.state_dict()
    if layout is None:
        return state
    name_of = {id(p): n for n, p in model.named_parameters()}
    own = [[name_of.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if any(n is None for names in own for n in names) or own == [list(names) for names in layout]:
        return state
    return remap_optimizer_state(state, own, layout, allow_new=True) or state


def accumulated_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Gradients summed but not yet applied (an epoch whose length is not a multiple of --accum_iter
    carries its last micro-steps into the next epoch, as the reference does): saved so a resume is exact."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def restore_accumulated_grads(model: nn.Module, ckpt: dict) -> None:
    pos = ckpt.get("unlearn_fast")
    grads = (pos.get("accumulated_grads") if isinstance(pos, dict) else None) or {}
    if not isinstance(grads, dict):
        raise CheckpointError(f"the accumulated gradients in the checkpoint are a {type(grads).__name__}, not a dict")
    params = dict(model.named_parameters())
    for name, g in grads.items():
        if name not in params or not torch.is_tensor(g) or params[name].shape != g.shape:
            raise CheckpointError(f"accumulated gradient {name!r} in the checkpoint does not fit the model")
        params[name].grad = g.to(params[name].device, params[name].dtype).clone()


def _whole_number(value, what: str, path: str, least: int = 0) -> int:
    """``value`` as an int >= ``least`` (an int, an integral float, a digit string or a one-element tensor),
    else a CheckpointError naming ``path``."""
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < least):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its {what} is {value!r}, not a whole number "
                              f">= {least}")
    return int(value)


def resume_position(ckpt: dict, path: str = "") -> dict:
    """Where a checkpoint continues: its saved ``'unlearn_fast'`` position plus ``start_epoch`` and
    ``start_step_in_epoch`` (an official or epoch-end file: the start of the epoch after ``ckpt['epoch']``).
    A position that is not whole numbers >= 0 (a damaged or hand-edited file) is a CheckpointError naming
    ``path``: a negative epoch would otherwise train with a negative lr."""
    pos = ckpt.get("unlearn_fast")
    if pos is not None and not isinstance(pos, dict):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its 'unlearn_fast' entry is a "
                              f"{type(pos).__name__}, not the saved position")
    pos = dict(pos or {})
    if "next_epoch" in pos:
        pos["start_epoch"] = _whole_number(pos["next_epoch"], "'unlearn_fast' next_epoch", path)
    else:  # the reference's 'epoch' is the last finished one (-1: none)
        pos["start_epoch"] = _whole_number(ckpt.get("epoch", -1), "'epoch'", path, least=-1) + 1
    pos["start_step_in_epoch"] = _whole_number(pos.get("step_in_epoch", 0), "'unlearn_fast' step_in_epoch", path)
    for key in ("steps_per_epoch", "seed", "epoch_steps"):
        if pos.get(key) is not None:
            pos[key] = _whole_number(pos[key], f"'unlearn_fast' {key}", path)
    sums = pos.get("epoch_sums")
    if sums is not None and not (isinstance(sums, (list, tuple)) and len(sums) == 3
                                 and all(isinstance(v, (int, float)) for v in sums)):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its 'unlearn_fast' epoch_sums is {sums!r}, "
                              "not three numbers")
    lr_sum = pos.get("epoch_lr_sum")
    if lr_sum is not None and (isinstance(lr_sum, bool) or not isinstance(lr_sum, (int, float))):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its 'unlearn_fast' epoch_lr_sum is {lr_sum!r}")
    return pos
