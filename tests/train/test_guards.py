"""Guards: a non-finite loss stops the run (exit 3, last good checkpoint intact), fp16 loss-scaler skips
are not errors, and an output folder that cannot be written (read-only, disk full) fails early and clearly."""
from __future__ import annotations

import builtins
import errno
import os

import numpy as np
import pytest
import torch

import unlearn_fast.train.trainer as trainer_mod
from tests.helpers import make_class_tree, max_param_diff, save_random_pretrained
from unlearn_fast.cli.main import main
from unlearn_fast.train.checkpoint import load_checkpoint_file, resume_position
from unlearn_fast.train.step_reference import StepOutput
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_and_weights(tmp_path_factory):
    root = make_class_tree(tmp_path_factory.mktemp("guard_data") / "train", ("cat", "dog", "bird"), 4, seed=2)
    return root, save_random_pretrained(tmp_path_factory.mktemp("guard_ckpt") / "pretrained.pth")


def _args(data, pretrained, out, *extra):
    # 16 images, batch 2: 8 steps per epoch
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", data, "--forget_classes",
            "cat,dog", "--retain_classes", "bird", "--num_image_per_class", "4", "--batch_size", "2", "--epochs", "2",
            "--num_workers", "0", "--output_dir", str(out), "--no_progress", "--device", "cpu", "--resume", pretrained,
            "--forget_alpha", "0.2", *extra]


def _nan_at(global_step):
    """The real fast step, but its loss reads NaN from ``global_step`` on (the update itself ran)."""
    real = trainer_mod.fast_step

    def step(setup, images, is_forget, step, update=True, noise_seed=None):
        out = real(setup, images, is_forget, step, update, noise_seed=noise_seed)
        if step >= global_step:
            return StepOutput(out.loss * float("nan"), out.retain, out.forget)
        return out
    return step


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_last_checkpoint(data_and_weights, tmp_path, capsys,
                                                                         monkeypatch):
    data, pretrained = data_and_weights
    monkeypatch.setattr(trainer_mod, "fast_step", _nan_at(5))
    rc = main(_args(data, pretrained, tmp_path, "--save_every_steps", "2"))
    err = capsys.readouterr().err
    assert rc == 3 and "loss became non-finite within steps 4..5 (epoch 0)" in err and "Traceback" not in err
    (run,) = os.listdir(tmp_path)
    files = os.listdir(tmp_path / run)
    assert "checkpoint-last.pth" in files and "log.txt" not in files  # epoch 0 never finished
    assert not [f for f in files if f.startswith(".tmp")]
    ckpt = load_checkpoint_file(str(tmp_path / run / "checkpoint-last.pth"))
    assert resume_position(ckpt)["global_step"] == 4  # the save after step 5 was not made
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_loss_before_any_checkpoint_removes_the_run_dir(data_and_weights, tmp_path, capsys, monkeypatch):
    data, pretrained = data_and_weights
    monkeypatch.setattr(trainer_mod, "fast_step", _nan_at(0))
    rc = main(_args(data, pretrained, tmp_path))
    captured = capsys.readouterr()
    assert rc == 3 and "non-finite" in captured.err and "removed" in captured.out
    assert os.listdir(tmp_path) == []


def test_non_finite_weights_are_never_saved(make_mae_micro, tmp_path):
    """A finite loss whose update poisons the weights (possible without loss scaling): caught at the save."""
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([100.0, -100.0])) for _ in range(3)]

    def poison(epoch):
        for i, b in enumerate(batches):
            if i == 2:
                with torch.no_grad():
                    setup.trainable[0].fill_(float("inf"))
            yield b
    with pytest.raises(trainer_mod.NonFiniteLossError):
        train_loop(setup, poison, 3, epochs=1, lr=1e-3, progress=False, output_dir=str(tmp_path), step_mode="fast")
    assert not os.path.exists(tmp_path / "checkpoint-0.pth")


@pytest.mark.parametrize("init_scale,updates", [(2.0 ** 127, False), (2.0 ** 10, True)])
def test_loss_scaler_skipped_steps_are_not_errors(make_mae_micro, tmp_path, init_scale, updates):
    """fp16-style loss scaling (a CPU GradScaler here): a scale so large that the gradients overflow makes the
    scaler skip the update and back off; the loss is finite, so the run goes on."""
    model = make_mae_micro()
    setup = build_setup(model, "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    setup.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([100.0, -100.0])) for _ in range(4)]
    before = make_mae_micro()
    history = train_loop(setup, lambda e: iter(batches), 4, epochs=1, lr=1e-3, progress=False, step_mode="fast",
                         output_dir=str(tmp_path), readback_every=1)
    assert all(np.isfinite(v) for v in history[0].values())
    if updates:
        assert setup.scaler.get_scale() == init_scale
    else:  # the first updates were skipped (inf gradients) and the scale halved each time
        assert setup.scaler.get_scale() <= init_scale / 2
    assert max_param_diff(model, before) > 0  # and later steps did update
    assert os.path.exists(tmp_path / "checkpoint-0.pth")


# ---- output folder -------------------------------------------------------------------------------------

def _fail_probe(exc):
    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        if str(file).endswith(".write-test") and "w" in mode:
            raise exc
        return real_open(file, mode, *a, **k)
    return fake_open


@pytest.mark.parametrize("exc,needle", [
    (PermissionError(errno.EACCES, "Permission denied"), "not writable: Permission denied"),  # read-only folder
    (OSError(errno.EROFS, "Read-only file system"), "not writable: Read-only file system"),
])
def test_unwritable_output_dir_fails_early(data_and_weights, tmp_path, capsys, monkeypatch, exc, needle):
    data, pretrained = data_and_weights
    monkeypatch.setattr(builtins, "open", _fail_probe(exc))
    rc = main(_args(data, pretrained, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []  # the run dir created for the probe is gone


def test_full_disk_fails_early(data_and_weights, tmp_path, capsys, monkeypatch):
    """ENOSPC on the 64 KiB write probe (simulated: the probe's fsync reports a full disk)."""
    data, pretrained = data_and_weights

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    rc = main(_args(data, pretrained, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and "not writable: No space left on device" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_disk_full_during_training_is_a_clear_error(data_and_weights, tmp_path, capsys, monkeypatch):
    """The first checkpoint cannot be written: one clear message, the (checkpoint-less) run dir removed."""
    data, pretrained = data_and_weights

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    rc = main(_args(data, pretrained, tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint-0.pth: No space left on device" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []
