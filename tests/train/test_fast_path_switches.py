"""The fast step's switch table (train/fast_path_switches.py): which fused forms are on for a setup's knobs and
device, and that every switch is restored on exit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unlearn_fast.models.aligned_conv import aligned_input_conv
from unlearn_fast.models.fused_blocks import deferred_branch_bias, fused_block_norms
from unlearn_fast.models.mage_attention import sdpa_attention
from unlearn_fast.models.visible_patches import visible_patch_embed
from unlearn_fast.models.vqgan import channels_last_tokenizer, fused_group_norms, fused_residual_pools
from unlearn_fast.train.fast_path_switches import fast_path_switches

SWITCHES = {"fuse_tokenizer_norms": fused_group_norms, "pad_tokenizer_input": aligned_input_conv,
            "tokenizer_channels_last": channels_last_tokenizer, "sdpa_attention": sdpa_attention,
            "fuse_block_norms": fused_block_norms, "visible_patch_embed": visible_patch_embed,
            "fuse_residual_pools": fused_residual_pools, "defer_branch_bias": deferred_branch_bias}
DEFAULTS = dict(fuse_tokenizer_norms=True, pad_tokenizer_input=True, tokenizer_channels_last=True,
                sdpa_attention=True, fuse_block_norms=True, visible_patch_embed=True, fuse_residual_pools=True,
                defer_branch_bias=False)


def _state():
    return {k: s.on() for k, s in SWITCHES.items()}


@pytest.mark.parametrize("device,knobs,want_on", [
    ("cuda", {}, {"fuse_tokenizer_norms", "pad_tokenizer_input", "sdpa_attention", "visible_patch_embed",
                  "fuse_residual_pools", "tokenizer_channels_last", "fuse_block_norms"}),
    ("cuda", {"tokenizer_channels_last": False, "fuse_block_norms": False, "sdpa_attention": False,
              "fuse_residual_pools": False},
     {"fuse_tokenizer_norms", "pad_tokenizer_input", "visible_patch_embed"}),
    ("cuda", {"defer_branch_bias": True}, {"fuse_tokenizer_norms", "pad_tokenizer_input", "sdpa_attention",
                                           "visible_patch_embed", "fuse_residual_pools", "tokenizer_channels_last",
                                           "fuse_block_norms", "defer_branch_bias"}),
    ("cuda", {"defer_branch_bias": True, "fuse_block_norms": False},  # it lives inside the fused blocks
     {"fuse_tokenizer_norms", "pad_tokenizer_input", "sdpa_attention", "visible_patch_embed", "fuse_residual_pools",
      "tokenizer_channels_last"}),
    ("cpu", {"defer_branch_bias": True}, {"visible_patch_embed"}),
    ("cpu", {}, {"visible_patch_embed"}),
    ("cpu", {"visible_patch_embed": False}, set()),
])
def test_switches_follow_the_knobs_and_the_device(device, knobs, want_on):
    setup = SimpleNamespace(device=torch.device(device), **dict(DEFAULTS, **knobs))
    assert not any(_state().values())
    with fast_path_switches(setup):
        assert {k for k, on in _state().items() if on} == want_on
    assert not any(_state().values())


def test_switches_are_restored_after_an_error():
    setup = SimpleNamespace(device=torch.device("cuda"), **DEFAULTS)
    with pytest.raises(RuntimeError), fast_path_switches(setup):
        raise RuntimeError("step failed")
    assert not any(_state().values())
