"""Red-team checks of the idle-flag notices (cli/flag_scope.py) where the precision mode makes a flag moot, and the
MAE fast step end to end at a mask ratio that leaves no patch visible (the visible-patch GEMM used to crash)."""
from __future__ import annotations

import argparse

import pytest
import torch

from unlearn_fast.cli.flag_scope import FLAG_SCOPES, idle_flags
from unlearn_fast.cli.main import main

from tests.helpers import make_class_tree, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


def _ns(precision, **set_flags):
    ns = argparse.Namespace(**{flag: set_flags.get(flag, False) for flag in FLAG_SCOPES})
    ns.precision = precision
    return ns


@pytest.mark.parametrize("flag,family,device,precision,idle", [
    ("share_tokenizer", "mage", "cpu", "reference", False),  # fp32 teacher vs bf16 student: the flag decides
    ("share_tokenizer", "mage", "cpu", "bf16", True),        # same precision: shared anyway
    ("share_tokenizer", "mage", "cuda", "fp32", True),
    ("explicit_attention", "mage", "cuda", "bf16", False),
    ("explicit_attention", "mage", "cuda", "fp32", True),    # SDPA only takes half-precision q, k, v
    ("full_patch_embed", "mae", "cpu", "fp32", False),
])
def test_idle_at_precision(flag, family, device, precision, idle):
    lines = idle_flags(_ns(precision, **{flag: True}), family, device, "fast")
    assert (lines != []) == idle
    if idle:
        assert lines[0].startswith(f"--{flag} has no effect") and f"--precision {precision}" in lines[0]


def test_full_patch_embed_on_a_gpu_in_fp32_follows_the_tf32_settings(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert idle_flags(_ns("fp32", full_patch_embed=True), "mae", "cuda", "fast") != []
    assert idle_flags(_ns("bf16", full_patch_embed=True), "mae", "cuda", "fast") == []
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert idle_flags(_ns("fp32", full_patch_embed=True), "mae", "cuda", "fast") == []


def test_cli_mae_fast_step_with_no_visible_patch(tmp_path, capsys):
    data = make_class_tree(tmp_path / "train", ("cat", "bird"), 2, seed=3)
    pre = save_random_pretrained(tmp_path / "pretrained.pth")
    argv = ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", str(data), "--forget_classes",
            "cat", "--retain_classes", "bird", "--num_image_per_class", "2", "--batch_size", "4", "--epochs", "1",
            "--num_workers", "0", "--output_dir", str(tmp_path / "out"), "--no_progress", "--device", "cpu",
            "--resume", str(pre), "--mask_ratio", "0.99", "--step", "fast", "--precision", "bf16"]
    assert main(argv) == 0
    assert "step 'fast'" in capsys.readouterr().out
