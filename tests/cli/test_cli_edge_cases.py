"""Red-team cases of ``unlearn-fast unlearn`` / ``baseline``: non-finite flags, unsupported devices, the reference's
opt.yaml / checkpoint ``args`` contents, resuming an official-layout checkpoint (whole-model AdamW, pickled
Namespace), numpy values in checkpoints, and SIGINT/SIGTERM during a run (exit 128+signum, no run directory
without a checkpoint left behind)."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import unlearn_fast
import unlearn_fast.train.image_datasets as image_datasets
from unlearn_fast.cli import unlearn_command
from unlearn_fast.cli.main import main
from unlearn_fast.cli.unlearn_args import build_parser
from unlearn_fast.train.checkpoint import (CheckpointError, load_checkpoint_file, optimizer_group_names,
                                           remap_optimizer_state)

from tests.helpers import assert_cli_fails_cleanly, make_class_tree, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = make_class_tree(tmp_path_factory.mktemp("edge") / "train", ("cat", "dog", "bird"), 4, seed=5)
    pre = save_random_pretrained(tmp_path_factory.mktemp("edge_ckpt") / "pretrained.pth")
    return root, pre


def _args(data, out, *extra, command="unlearn"):
    return [command, "--model", "mae_micro", "--input_size", "32", "--data_path", data, "--forget_classes", "cat,dog",
            "--retain_classes", "bird", "--num_image_per_class", "4", "--batch_size", "4", "--epochs", "1",
            "--num_workers", "0", "--output_dir", str(out), "--no_progress", "--device", "cpu", *extra]


_fails_cleanly = assert_cli_fails_cleanly


def _run_dir(out):
    (name,) = os.listdir(out)
    return os.path.join(out, name)


# --- flags ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--mask_ratio_mu", "nan"), ("--blr", "inf"), ("--lr", "inf"),
                                        ("--min_lr", "inf"), ("--forget_alpha", "nan"), ("--warmup_epochs", "inf")])
def test_non_finite_flag_is_refused_up_front(good, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", good[1], flag, value), out, capsys,
                   f"{flag} must be a finite number")


@pytest.mark.parametrize("flags,needle", [
    (["--mask_ratio_std", "0"], "--mask_ratio_std must be > 0"),
    (["--mask_ratio_min", "0.7", "--mask_ratio_max", "0.7"], "--mask_ratio_min / --mask_ratio_max"),
    (["--mask_ratio_min", "0.9", "--mask_ratio_max", "0.5"], "--mask_ratio_min / --mask_ratio_max"),
])
def test_mage_mask_rate_flags_are_checked_before_the_run(good, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    argv = _args(good[0], out, *flags)
    argv[argv.index("mae_micro")] = "mage_micro"
    _fails_cleanly(argv, out, capsys, needle)


@pytest.mark.parametrize("device", ["meta", "mps", "tpu"])
def test_unsupported_device_is_one_error(good, tmp_path, capsys, device):
    out = tmp_path / "out"
    argv = _args(good[0], out, "--resume", good[1])
    argv[argv.index("--device") + 1] = device
    _fails_cleanly(argv, out, capsys, f"--device {device!r}")


def test_warmup_epochs_parses_as_the_reference_int_when_integral():
    p = build_parser()
    assert p.parse_args([]).warmup_epochs == 5 and isinstance(p.parse_args([]).warmup_epochs, int)
    assert isinstance(p.parse_args(["--warmup_epochs", "1"]).warmup_epochs, int)
    assert p.parse_args(["--warmup_epochs", "0.5"]).warmup_epochs == 0.5
    assert p.parse_args([]).log_dir == "./output_dir"  # the reference default (overwritten with the run dir)


def test_reference_default_pretrained_path_is_used_without_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args([])
    unlearn_command.apply_reference_resume_default(args, baseline=False)
    assert args.resume == ""  # nothing there: stays empty (random init, no download)
    os.makedirs("pretrained")
    open("pretrained/mage-vitb-1600.pth", "wb").close()
    unlearn_command.apply_reference_resume_default(args, baseline=False)
    assert args.resume == "pretrained/mage-vitb-1600.pth"
    other = build_parser().parse_args(["--model", "mae_micro"])
    unlearn_command.apply_reference_resume_default(other, baseline=False)
    assert other.resume == ""  # the released checkpoint is a ViT-B MAGE


# --- outputs ----------------------------------------------------------------------------------------------

def test_opt_yaml_and_checkpoint_args_hold_the_run_dir_and_the_resolved_lr(good, tmp_path):
    out = tmp_path / "out"
    assert main(_args(good[0], out, "--resume", good[1], "--warmup_epochs", "1", "--blr", "2e-4")) == 0
    run = _run_dir(out)
    text = open(os.path.join(run, "opt.yaml")).read()
    assert text.startswith('{\n    "')  # json.dump(..., indent=4), as the reference
    opt = json.loads(text)
    lr = 2e-4 * 4 / 256
    assert opt["output_dir"] == run and opt["log_dir"] == run  # the reference's args after it renamed them
    assert math.isclose(opt["lr"], lr, rel_tol=1e-12) and opt["warmup_epochs"] == 1
    assert isinstance(opt["warmup_epochs"], int)
    saved = torch.load(os.path.join(run, "checkpoint-0.pth"), weights_only=True)["args"]
    assert saved["output_dir"] == run and math.isclose(saved["lr"], lr, rel_tol=1e-12)


# --- resume -----------------------------------------------------------------------------------------------

def _official_checkpoint(path, pretrained, epoch):
    """The official trainer's layout: AdamW over every trainable parameter (timm add_weight_decay groups:
    no-decay first), state only for the encoder (the only params with gradients), a pickled Namespace."""
    model = unlearn_fast.create_model("mae_micro")
    model.load_state_dict(torch.load(pretrained, weights_only=True)["model"])
    no_decay, decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if len(p.shape) == 1 or n.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                            lr=1e-4, betas=(0.9, 0.95))
    encoder = set(model.encoder_parameter_names())
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for n, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3 if n in encoder else None
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "scaler": {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 3},
                "args": argparse.Namespace(epochs=6, lr=1e-4, model="mae_micro", output_dir="./x")}, path)
    return model, opt


def test_remap_of_a_whole_model_optimizer_keeps_each_parameters_state(good, tmp_path):
    model, opt = _official_checkpoint(tmp_path / "c.pth", good[1], 0)
    whole = optimizer_group_names(model.named_parameters())
    encoder = set(model.encoder_parameter_names())
    own = [[n for n in names if n in encoder] for names in whole]  # an encoder-only optimizer's layout
    assert sum(map(len, own)) < sum(map(len, whole))
    remapped = remap_optimizer_state(opt.state_dict(), whole, own)
    params = dict(model.named_parameters())
    flat_own = [n for names in own for n in names]
    assert [len(g["params"]) for g in remapped["param_groups"]] == [len(g) for g in own]
    assert [g["weight_decay"] for g in remapped["param_groups"]] == [0.0, 0.05]
    for k, name in enumerate(flat_own):
        assert torch.equal(remapped["state"][k]["exp_avg"], opt.state[params[name]]["exp_avg"]), name
    assert remap_optimizer_state(opt.state_dict(), own, own) is None  # sizes that do not match: not remapped


def test_resume_of_an_official_unlearning_checkpoint(good, tmp_path, capsys):
    ckpt = str(tmp_path / "checkpoint-0.pth")
    _official_checkpoint(ckpt, good[1], 0)
    out = tmp_path / "out"
    # the teacher is never the partly unlearned model: an official file does not record it
    _fails_cleanly(_args(good[0], out, "--resume", ckpt, "--epochs", "2"), out, capsys, "--teacher")
    assert main(_args(good[0], out, "--resume", ckpt, "--teacher", good[1], "--epochs", "2")) == 0
    run = _run_dir(out)
    assert [json.loads(x)["epoch"] for x in open(os.path.join(run, "log.txt"))] == [1]  # start_epoch = epoch + 1
    assert "at epoch 1 step 0" in capsys.readouterr().out


def test_restored_optimizer_keeps_its_own_execution_options(good, tmp_path):
    """A checkpoint saved elsewhere (e.g. capturable AdamW of the CUDA-graph step) must not switch this run's
    optimizer implementation."""
    model = unlearn_fast.create_model("mae_micro")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    saved = torch.optim.AdamW(params, lr=1e-3).state_dict()
    saved["param_groups"][0].update(capturable=True, foreach=True, differentiable=False)

    class Setup:
        optimizer, student = opt, model
        scaler = torch.amp.GradScaler("cpu", enabled=False)
    unlearn_command.restore_optimizer(Setup, {"optimizer": saved, "scaler": {}}, "x.pth")
    assert opt.param_groups[0]["capturable"] is False and opt.param_groups[0]["foreach"] is None


def test_resume_with_another_objective_is_refused(good, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_args(good[0], first, "--resume", good[1])) == 0
    ckpt = os.path.join(_run_dir(first), "checkpoint-0.pth")
    capsys.readouterr()
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", ckpt, "--epochs", "2", "--loss_type", "encoder_noise",
                         command="baseline"), out, capsys, "--loss_type encoder_noise", "unlearning objective")


def test_numpy_values_in_a_checkpoint_load(good, tmp_path):
    path = str(tmp_path / "np.pth")
    state = torch.load(good[1], weights_only=True)["model"]
    torch.save({"model": state, "args": argparse.Namespace(blr=np.float64(1e-4)), "stats": np.arange(3)}, path)
    ckpt = load_checkpoint_file(path)
    assert ckpt["args"].blr == 1e-4 and ckpt["stats"].tolist() == [0, 1, 2]


class _Payload:
    pass


def test_unsafe_object_in_a_checkpoint_is_named(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="_Payload") as info:
        load_checkpoint_file(path)
    assert "\x1b[" not in str(info.value)


# --- signals ----------------------------------------------------------------------------------------------

def _signal_in_first_item(monkeypatch, signum, swallow=False):
    """Send ``signum`` to this process while the first image is loaded (num_workers 0: in the main thread).
    ``swallow``: the KeyboardInterrupt it raises is lost, as CPython loses one raised in an at-fork callback."""
    real = image_datasets.load_rgb_image
    sent = []

    def load(path):
        if not sent:
            sent.append(signum)
            try:
                os.kill(os.getpid(), signum)
            except KeyboardInterrupt:
                if not swallow:
                    raise
        return real(path)
    monkeypatch.setattr(image_datasets, "load_rgb_image", load)


@pytest.mark.parametrize("signum,swallow,rc", [(signal.SIGTERM, False, 143), (signal.SIGINT, False, 130),
                                               (signal.SIGINT, True, 130)])
def test_signal_before_the_first_checkpoint_leaves_no_run_dir(good, tmp_path, capsys, monkeypatch, signum, swallow,
                                                              rc):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _signal_in_first_item(monkeypatch, signum, swallow)
    out = tmp_path / "out"
    err = _fails_cleanly(_args(good[0], out, "--resume", good[1]), out, capsys, rc=rc)
    assert ("terminated" if signum == signal.SIGTERM else "interrupted") in err
    assert {s: signal.getsignal(s) for s in before} == before  # the CLI's handlers are gone again


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_seed_outside_numpys_range_is_refused(good, tmp_path, capsys, seed):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", good[1], "--seed", seed), out, capsys, "--seed must be in [0, 2**32)")


@pytest.mark.parametrize("command,model", [("unlearn", "palette_micro"), ("unlearn", "palette_places2"),
                                           ("baseline", "palette")])
def test_palette_models_point_to_the_palette_command(good, tmp_path, capsys, command, model):
    out = tmp_path / "out"
    argv = _args(good[0], out, command=command) + (["--loss_type", "encoder_noise"] if command == "baseline" else [])
    argv[argv.index("mae_micro")] = model
    _fails_cleanly(argv, out, capsys, f"--model {model} is a Palette", "palette-unlearn")


def test_serial_teacher_runs_and_is_recorded(good, tmp_path):
    out = tmp_path / "out"
    assert main(_args(good[0], out, "--resume", good[1], "--serial_teacher", "--max_steps_per_epoch", "1")) == 0
    with open(os.path.join(_run_dir(out), "opt.yaml")) as f:
        assert json.load(f)["serial_teacher"] is True


def test_list_models_has_help_and_refuses_extra_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list-models", "--help"])
    assert e.value.code == 0 and "registered model names" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["list-models", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_closed_stdout_pipe_ends_the_command_quietly():
    """`unlearn-fast list-models | head -1`: the reader leaving is no error to report."""
    import subprocess
    import sys
    child = ("import sys, unlearn_fast.models as m; m.list_models = lambda: ['x' * 99] * 5000; "
             "sys.argv = ['unlearn-fast', 'list-models']; from unlearn_fast.cli.main import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes (its 500 kB of names overflow the pipe)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_no_command_is_a_usage_error_on_stderr_and_help_is_output(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "list-models" in err
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "list-models" in out and err == ""


def test_an_interrupted_command_that_trains_nothing_does_not_talk_about_checkpoints(monkeypatch, capsys):
    from unlearn_fast.cli import tools

    def stopped(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(tools, "eval_main", stopped)
    assert main(["eval"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint" not in err
