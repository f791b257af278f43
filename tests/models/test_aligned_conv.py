"""The VQGAN's RGB conv over channels padded to 8 (models/aligned_conv.py): zero channels add exact zeros, so the
padded conv equals the plain one up to summation order (fp32, 1e-6 relative), in NCHW and channels_last; the
switch acts only on a CUDA input under half autocast, so the CPU and the reference step keep the plain conv."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_fast.models.aligned_conv import aligned_input_conv, input_conv, pad_channels


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c_in,target", [(3, 8), (1, 8), (5, 16)])
def test_padded_conv_equals_the_plain_conv(channels_last, c_in, target):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 16, 3, padding=1, bias=c_in != 3)
    x = torch.randn(2, c_in, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xp = pad_channels(x, target)
    assert xp.shape == (2, target, 9, 7) and torch.equal(xp[:, :c_in], x) and not xp[:, c_in:].any()
    # one channel is both layouts at once: NCHW is kept then
    assert xp.is_contiguous(memory_format=torch.channels_last) == (channels_last and c_in > 1)
    got = F.conv2d(xp, pad_channels(conv.weight, target), conv.bias, conv.stride, conv.padding)
    want = conv(x)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6


def test_switch_keeps_the_plain_conv_off_a_gpu():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 5, 5)
    calls = []
    conv.register_forward_hook(lambda *a: calls.append(1))
    with aligned_input_conv(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = input_conv(conv, x)
    assert calls == [1]  # the module itself ran (no padded form on the CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(out, conv(x))
    assert not aligned_input_conv.on()
