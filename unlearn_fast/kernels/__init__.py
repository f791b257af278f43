"""Triton kernels (the lowest layer: they know no models). See each module's docstring for the math.

Importing this package never fails: without a usable Triton, ``TRITON_AVAILABLE`` is False, the reason is in
``TRITON_IMPORT_ERROR`` and the functions raise RuntimeError when called. The kernels run on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set before this package is imported: Triton picks
compiled or interpreted kernels when they are defined).
"""
from __future__ import annotations

TRITON_IMPORT_ERROR = None

try:
    from .interpreter_compat import patch_interpreter_index
    patch_interpreter_index()  # before any kernel runs: triton < 3.7's interpreter on numpy >= 2.4
    from .batch_noise import NOISE_KINDS, batch_mean_std, philox_batch_noise, philox_standard_normal
    from .retain_forget_l2 import (MAX_NORM_D, MAX_ROWS, rank_within_class, retain_forget_l2_backward, retain_forget_l2_forward,
                                   retain_forget_l2_loss_forward)
    from .multi_map_l2 import multi_map_l2_forward, multi_map_l2_scale
    from .group_norm_silu import group_norm_silu_forward
    from .add_layer_norm import MAX_LAYER_NORM_D, add_layer_norm_backward, add_layer_norm_forward
    from .residual_avg_pool import add_avg_pool2d_forward
    from .adamw_copy import ADAMW_KINDS, ADAMW_ROLES, adamw_copy_update, grad_sum_of_squares
    TRITON_AVAILABLE = True
except Exception as e:  # no triton, or a broken install: the ops fall back to their PyTorch twins
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    NOISE_KINDS = ("normal", "uniform", "constant")
    MAX_NORM_D = MAX_ROWS = MAX_LAYER_NORM_D = 0
    ADAMW_KINDS, ADAMW_ROLES = {}, ()

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"unlearn_fast.kernels: Triton is unavailable ({TRITON_IMPORT_ERROR})")

    batch_mean_std = philox_batch_noise = philox_standard_normal = retain_forget_l2_forward = _unavailable
    retain_forget_l2_loss_forward = retain_forget_l2_backward = rank_within_class = _unavailable
    multi_map_l2_forward = multi_map_l2_scale = group_norm_silu_forward = _unavailable
    add_layer_norm_forward = add_layer_norm_backward = add_avg_pool2d_forward = _unavailable
    adamw_copy_update = grad_sum_of_squares = _unavailable

__all__ = ["TRITON_AVAILABLE", "TRITON_IMPORT_ERROR", "NOISE_KINDS", "MAX_NORM_D", "MAX_ROWS", "batch_mean_std",
           "philox_batch_noise", "philox_standard_normal", "retain_forget_l2_forward", "retain_forget_l2_loss_forward",
           "retain_forget_l2_backward", "rank_within_class",
           "multi_map_l2_forward", "multi_map_l2_scale", "group_norm_silu_forward"]
__all__ += ["MAX_LAYER_NORM_D", "add_layer_norm_forward", "add_layer_norm_backward"]
__all__ += ["add_avg_pool2d_forward"]
__all__ += ["ADAMW_KINDS", "ADAMW_ROLES", "adamw_copy_update", "grad_sum_of_squares"]
