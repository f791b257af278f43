"""Which of the models' fused forms the fast step turns on, from the setup's knobs and the device.

Each form computes what the official module computes (up to summation order) and is chosen for the extent of one
step by a context-local switch (models/kernel_switch.py); the reference-semantics step enters none of them.

| switch (module)                              | on when                               | knob (CLI)                      |
|----------------------------------------------|---------------------------------------|---------------------------------|
| fused_group_norms (models.vqgan)             | CUDA                                  | --unfused_tokenizer_norms: off  |
| aligned_input_conv (models.aligned_conv)     | CUDA, half autocast                   | pad_tokenizer_input (A/B only)  |
| fused_residual_pools (models.vqgan)          | CUDA                                  | fuse_residual_pools (A/B only)  |
| channels_last_tokenizer (models.vqgan)       | CUDA                                  | --nchw_tokenizer: off           |
| sdpa_attention (models.mage_attention)       | CUDA, half inputs                     | --explicit_attention: off       |
| fused_block_norms (models.fused_blocks)      | CUDA                                  | --unfused_block_norms: off      |
| deferred_branch_bias (models.fused_blocks)   | CUDA, with fused_block_norms          | defer_branch_bias (A/B only)    |
| visible_patch_embed (models.visible_patches) | where the GEMM rounds as the conv     | --full_patch_embed: off         |
"""
from __future__ import annotations

import contextlib

from ..models.aligned_conv import aligned_input_conv
from ..models.fused_blocks import deferred_branch_bias, fused_block_norms
from ..models.mage_attention import sdpa_attention
from ..models.visible_patches import visible_patch_embed
from ..models.vqgan import channels_last_tokenizer, fused_group_norms, fused_residual_pools


def fast_path_switches(setup) -> contextlib.ExitStack:
    """A context that sets every switch of the table above for ``setup`` (and restores them on exit)."""
    cuda = setup.device.type == "cuda"
    stack = contextlib.ExitStack()
    for switch, on in ((fused_group_norms, setup.fuse_tokenizer_norms and cuda),
                       (aligned_input_conv, setup.pad_tokenizer_input and cuda),
                       (fused_residual_pools, setup.fuse_residual_pools and cuda),
                       (channels_last_tokenizer, setup.tokenizer_channels_last and cuda),
                       (sdpa_attention, setup.sdpa_attention and cuda),
                       (fused_block_norms, setup.fuse_block_norms and cuda),
                       (deferred_branch_bias, setup.defer_branch_bias and setup.fuse_block_norms and cuda),
                       (visible_patch_embed, setup.visible_patch_embed)):
        stack.enter_context(switch(on))
    return stack


__all__ = ["fast_path_switches"]
