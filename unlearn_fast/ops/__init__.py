"""Ops: one autograd op per file, each with a plain-PyTorch twin (the oracle and the fallback)."""
from .add_layer_norm import add_layer_norm, add_layer_norm_reference
from .forget_mask import forget_mask
from .group_norm_silu import group_norm_silu, group_norm_silu_reference
from .residual_avg_pool import add_avg_pool2d, add_avg_pool2d_reference
from .multi_map_retain_forget_l2 import (multi_map_retain_forget_l2_loss,
                                         multi_map_retain_forget_l2_loss_reference)
from .retain_forget_l2_loss import (retain_forget_l2_loss, retain_forget_l2_loss_compact,
                                    retain_forget_l2_loss_prenorm, retain_forget_l2_loss_reference)
from .sample_batch_noise import (NOISE_KINDS, batch_mean_std, sample_batch_noise,
                                 sample_batch_noise_reference)

__all__ = ["retain_forget_l2_loss", "retain_forget_l2_loss_compact", "retain_forget_l2_loss_prenorm",
           "retain_forget_l2_loss_reference", "sample_batch_noise", "sample_batch_noise_reference",
           "batch_mean_std", "NOISE_KINDS"]
__all__ += ["multi_map_retain_forget_l2_loss", "multi_map_retain_forget_l2_loss_reference", "forget_mask"]
__all__ += ["group_norm_silu", "group_norm_silu_reference"]
__all__ += ["add_layer_norm", "add_layer_norm_reference"]
__all__ += ["add_avg_pool2d", "add_avg_pool2d_reference"]
