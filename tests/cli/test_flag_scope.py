"""The fast path's A/B flags name themselves when they cannot act on a run (wrong model family, no GPU, the
reference step, a precision that makes them moot) instead of silently doing nothing; a flag that acts stays
quiet. Also the MAE fast step end to end at a mask ratio that leaves no patch visible."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from unlearn_fast.cli.flag_scope import FLAG_SCOPES, idle_flags
from unlearn_fast.cli.main import main
from unlearn_fast.cli.unlearn_args import build_parser

from tests.helpers import make_class_tree, only_run_dir, save_random_pretrained, tf32_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _ns(precision="reference", **set_flags):
    ns = argparse.Namespace(**{flag: set_flags.get(flag, False) for flag in FLAG_SCOPES})
    ns.precision = precision
    return ns


def _cli_argv(tmp_path, *extra):
    """A one-epoch mae_micro run on two tiny classes, on the CPU."""
    data = make_class_tree(tmp_path / "train", ("cat", "bird"), 2, seed=3)
    pre = save_random_pretrained(tmp_path / "pretrained.pth")
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", str(data), "--forget_classes",
            "cat", "--retain_classes", "bird", "--num_image_per_class", "2", "--batch_size", "4", "--epochs", "1",
            "--num_workers", "0", "--output_dir", str(tmp_path / "out"), "--no_progress", "--device", "cpu",
            "--resume", str(pre), *extra]


def test_every_scoped_flag_is_a_cli_flag():
    for baseline in (False, True):
        dests = {a.dest for a in build_parser(baseline=baseline)._actions}
        assert set(FLAG_SCOPES) <= dests


@pytest.mark.parametrize("flag,family,device,mode,idle", [
    ("nchw_tokenizer", "mage", "cuda", "graphed", False),
    ("nchw_tokenizer", "mae", "cuda", "graphed", True),    # no tokenizer
    ("nchw_tokenizer", "mage", "cpu", "fast", True),       # a GPU-only switch
    ("unfused_block_norms", "mae", "cuda", "fast", False),
    ("unfused_block_norms", "palette", "cuda", "fast", True),
    ("explicit_attention", "mage", "cuda", "reference", True),      # the reference step has the official form
    ("full_patch_embed", "mae", "cpu", "fast", False),
    ("full_patch_embed", "mage", "cpu", "fast", True),
    ("share_tokenizer", "mage", "cpu", "fast", False),
    ("serial_teacher", "mae", "cpu", "fast", True),
    ("serial_teacher", "palette", "cuda", "graphed", False),
    ("fold_clip", "mae", "cpu", "fast", True),             # torch's fused AdamW of the fold: CUDA here
    ("half_student_weights", "mae", "cpu", "reference", True),
])
def test_idle_flags(flag, family, device, mode, idle):
    lines = idle_flags(_ns(**{flag: True}), family, device, mode)
    assert (lines != []) == idle
    if idle:
        assert lines[0].startswith(f"--{flag} has no effect")
    assert idle_flags(_ns(), family, device, mode) == []  # nothing set, nothing said


def test_cli_names_a_flag_that_cannot_act(tmp_path, capsys):
    assert main(_cli_argv(tmp_path, "--nchw_tokenizer", "--full_patch_embed")) == 0
    out = capsys.readouterr().out
    assert "--nchw_tokenizer has no effect on this run (it acts on MAGE models, a CUDA device" in out
    assert "--full_patch_embed has no effect" not in out  # MAE on the fast step: it acts


@pytest.mark.parametrize("old,off", [("channels_last_tokenizer", "nchw_tokenizer"),
                                     ("fused_block_norms", "unfused_block_norms")])
def test_retired_opt_in_flags_are_accepted_and_name_the_default(old, off):
    args = build_parser().parse_args([f"--{old}"])
    assert getattr(args, old) and not getattr(args, off)
    assert idle_flags(args, "mage", "cuda", "graphed") == [f"--{old} is the default now (--{off} turns it off)"]


@pytest.mark.parametrize("flag,family,device,precision,idle", [
    ("share_tokenizer", "mage", "cpu", "reference", False),  # fp32 teacher vs bf16 student: the flag decides
    ("share_tokenizer", "mage", "cpu", "bf16", True),        # same precision: shared anyway
    ("share_tokenizer", "mage", "cuda", "fp32", True),
    ("explicit_attention", "mage", "cuda", "bf16", False),
    ("explicit_attention", "mage", "cuda", "fp32", True),    # SDPA only takes half-precision q, k, v
    ("full_patch_embed", "mae", "cpu", "fp32", False),
    ("fold_clip", "mae", "cuda", "reference", True),         # GradScaler's grad_scale is taken
    ("fold_clip", "mae", "cuda", "fp32", False),
    ("half_student_weights", "mage", "cuda", "reference", True),
    ("half_student_weights", "mae", "cpu", "fp32", True),
    ("half_student_weights", "mae", "cpu", "bf16", False),   # the CPU runs the update's twin
])
def test_idle_at_precision(flag, family, device, precision, idle):
    lines = idle_flags(_ns(precision, **{flag: True}), family, device, "fast")
    assert (lines != []) == idle
    if idle:
        assert lines[0].startswith(f"--{flag} has no effect") and f"--precision {precision}" in lines[0]


def test_full_patch_embed_on_a_gpu_in_fp32_follows_the_tf32_settings():
    with tf32_settings(matmul=False, cudnn=True):
        assert idle_flags(_ns("fp32", full_patch_embed=True), "mae", "cuda", "fast") != []
        assert idle_flags(_ns("bf16", full_patch_embed=True), "mae", "cuda", "fast") == []
    with tf32_settings(matmul=True, cudnn=True):
        assert idle_flags(_ns("fp32", full_patch_embed=True), "mae", "cuda", "fast") == []


def test_cli_mae_fast_step_with_no_visible_patch(tmp_path, capsys):
    assert main(_cli_argv(tmp_path, "--mask_ratio", "0.99", "--step", "fast", "--precision", "bf16")) == 0
    assert "step 'fast'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, family, named", [
    (["--mask_ratio", "0.5"], "mage", ["--mask_ratio "]),
    (["--mask_ratio_min", "0.3", "--mask_ratio_std", "0.1"], "mae", ["--mask_ratio_min ", "--mask_ratio_std "]),
    (["--mask_ratio", "0.5"], "mae", []),                # its own family: acts
    (["--mask_ratio_mu", "0.6"], "mage", []),
    (["--mask_ratio", "0.75"], "mage", []),               # the default value: nothing was asked
])
def test_another_familys_masking_flag_is_named(argv, family, named):
    from unlearn_fast.cli.unlearn_args import build_parser
    lines = idle_flags(build_parser().parse_args(argv), family, "cpu", "fast")
    assert [line.split("has no effect")[0] for line in lines] == named


@pytest.mark.parametrize("old,off", [("channels_last_tokenizer", "nchw_tokenizer"),
                                     ("fused_block_norms", "unfused_block_norms")])
def test_a_retired_opt_in_with_its_off_switch_is_refused(tmp_path, capsys, old, off):
    assert main(_cli_argv(tmp_path, f"--{old}", f"--{off}")) == 2
    err = capsys.readouterr().err
    assert f"--{old} and --{off} contradict each other" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _trained_weights(run_dir):
    from unlearn_fast.train.checkpoint import read_checkpoint
    return read_checkpoint(os.path.join(run_dir, "checkpoint-0.pth"))["model"]


def test_cli_half_student_weights_trains_as_without_them(tmp_path, capsys, monkeypatch):
    """--half_student_weights on the CPU's fast bf16 step: its update ran, the same weights as the run without it
    to within the update's rounding (one step of 4 images), nothing named idle, and the flag in opt.yaml."""
    from unlearn_fast.train import fast_update
    updates = []
    monkeypatch.setattr(fast_update, "half_student_update",
                        lambda *a, real=fast_update.half_student_update: updates.append(1) or real(*a))
    runs = {}
    for name, extra in (("plain", ()), ("half", ("--half_student_weights",))):
        argv = _cli_argv(tmp_path / name, "--step", "fast", "--precision", "bf16", "--seed", "3",
                        "--warmup_epochs", "0", "--forget_alpha", "0.2", *extra)
        assert main(argv) == 0
        runs[name] = only_run_dir(tmp_path / name / "out")
    out = capsys.readouterr().out
    assert updates == [1]  # the run with the flag, its one step
    assert "has no effect" not in out and "half_student_weights is off" not in out
    plain, half = (_trained_weights(runs[k]) for k in ("plain", "half"))
    assert plain.keys() == half.keys()
    start = torch.load(tmp_path / "plain" / "pretrained.pth")["model"]
    moved = 0
    for key, w in plain.items():
        assert half[key].dtype == w.dtype  # the fp32 weights are the ones saved
        step_plain, step_half = w - start[key], half[key] - start[key]
        # the same AdamW step to within the update's rounding (its size is ~lr per element)
        assert (step_half - step_plain).norm() <= 1e-4 * step_plain.norm() + 1e-12, key
        moved += bool(step_plain.any())
    assert moved > 0  # the step trained something
    with open(os.path.join(runs["half"], "opt.yaml")) as fh:
        assert json.load(fh)["half_student_weights"] is True


@pytest.mark.parametrize("argv,named", [
    (["--loss_type", "max_full_model_loss", "--retain_alpha", "0.5"], ["--retain_alpha "]),
    (["--loss_type", "full_model_noise", "--baseline_weighting", "corrected"], ["--baseline_weighting corrected "]),
    (["--loss_type", "encoder_noise", "--retain_alpha", "0.5", "--baseline_weighting", "corrected"], []),  # both act
    (["--loss_type", "max_full_model_loss"], []),  # defaults: nothing asked
])
def test_baseline_flags_their_loss_does_not_read_are_named(argv, named):
    lines = idle_flags(build_parser(baseline=True).parse_args(argv), "mage", "cpu", "reference")
    assert [line.split("has no effect")[0] for line in lines] == named
