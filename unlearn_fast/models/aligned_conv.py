"""A convolution over few input channels (the VQGAN's RGB ``conv_in``) with its channels padded to a multiple of 8.

cuDNN's tensor-core convolutions in half precision want the input channels in multiples of 8; with 3 it falls
back to a generic kernel (``implicit_convolve_sgemm``: 2.5 ms of the MAGE bf16 step's kernels on an H100 for the
two 256² tokenisations, about 17 TFLOP/s). Zero channels in the input and zero input channels in the weight add
exact zeros to every output, so the padded conv computes the same sums, in the order its algorithm picks. Inside
:func:`aligned_input_conv` on a CUDA input under half-precision autocast the fast step takes this form; the
reference-semantics step, fp32 and the CPU keep the plain conv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_switch import KernelSwitch

#: inside ``with aligned_input_conv():`` :func:`input_conv` pads a half-precision CUDA conv's input channels to 8
aligned_input_conv = KernelSwitch("unlearn_fast_aligned_input_conv")
_ALIGN = 8


def _half_autocast_on_cuda() -> bool:
    return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in (torch.float16, torch.bfloat16)


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x [N, C, H, W]`` with zero channels appended up to ``channels``, in x's memory layout."""
    layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
              else torch.contiguous_format)
    out = x.new_zeros((x.shape[0], channels, *x.shape[2:])).contiguous(memory_format=layout)
    out[:, :x.shape[1]] = x
    return out


def input_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; inside :func:`aligned_input_conv`, for a CUDA ``x`` under half autocast whose channels are not
    a multiple of 8, the same conv over channel-padded input and weight (see the module docstring)."""
    c = x.shape[1]
    if not (aligned_input_conv.on() and x.is_cuda and c % _ALIGN and conv.groups == 1
            and conv.padding_mode == "zeros" and _half_autocast_on_cuda()):
        return conv(x)
    padded = -(-c // _ALIGN) * _ALIGN
    dtype = torch.get_autocast_dtype("cuda")  # cast before padding (what the conv would read): fewer bytes
    return F.conv2d(pad_channels(x.to(dtype), padded), pad_channels(conv.weight.to(dtype), padded), conv.bias,
                    conv.stride, conv.padding, conv.dilation)


__all__ = ["aligned_input_conv", "input_conv", "pad_channels"]
