"""Faults during an ``unlearn-fast unlearn`` run and the "never lost work" rule: a stop after a checkpoint
names the file to resume and the resumed run equals the uninterrupted one; a full disk keeps the last
checkpoint; damaged checkpoints are one error; two runs started in the same second never share a folder;
DataLoader workers stay quiet on Ctrl-C; a stop between a hard link and its rename leaves no temporary file."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import time

import pytest
import torch

import unlearn_fast.atomic_files as atomic_files
import unlearn_fast.train.run_outputs as run_outputs
import unlearn_fast.train.trainer as trainer
from unlearn_fast.atomic_files import atomic_link_or_copy
from unlearn_fast.cli import unlearn_command
from unlearn_fast.cli.main import main
from unlearn_fast.train.checkpoint import load_checkpoint_file, resume_position
from unlearn_fast.train.run_outputs import create_run_dir
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

from tests.helpers import (assert_cli_fails_cleanly, make_class_tree, micro_unlearn_argv, only_run_dir,
                           save_random_pretrained)

pytestmark = pytest.mark.usefixtures("single_thread")

EPOCHS, SAVE_EVERY = 2, 2  # 16 images, batch 4: 4 steps per epoch; checkpoint-last after steps 2, 4, 6, 8


def _args(data, pretrained, out, *extra):
    return micro_unlearn_argv(data, pretrained, out, "--forget_alpha", "0.2", "--save_every_steps", str(SAVE_EVERY),
                              *extra, epochs=EPOCHS, warmup=1)


_run_dir = only_run_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(data, pretrained, run dir of an uninterrupted run)."""
    data = make_class_tree(tmp_path_factory.mktemp("faults") / "train", ("cat", "dog", "bird"), 4, seed=3)
    pretrained = save_random_pretrained(tmp_path_factory.mktemp("faults_ckpt") / "pretrained.pth")
    out = tmp_path_factory.mktemp("faults_full") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (single_thread): the same reduction order, bit for bit
    try:
        assert main(_args(data, pretrained, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return data, pretrained, _run_dir(out)


def _stop_at_step(monkeypatch, step, signum):
    """Send ``signum`` to this process when the fast step ``step`` (global) starts."""
    real = trainer.fast_step

    def step_fn(setup, images, is_forget, global_step, update, **kw):
        if global_step == step:
            os.kill(os.getpid(), signum)
        return real(setup, images, is_forget, global_step, update, **kw)
    monkeypatch.setattr(trainer, "fast_step", step_fn)


# --- a stop after a checkpoint: what is left, what the message says, and an exact resume ---------------

def test_sigterm_after_a_checkpoint_names_it_and_the_resume_is_exact(finished, tmp_path, capsys, monkeypatch):
    data, pretrained, full_run = finished
    _stop_at_step(monkeypatch, 7, signal.SIGTERM)  # epoch 1, after the mid-epoch checkpoint-last of step 6
    out = tmp_path / "stopped"
    assert main(_args(data, pretrained, out)) == 143
    err = capsys.readouterr().err
    run = _run_dir(out)
    last = os.path.join(run, "checkpoint-last.pth")
    assert f"--resume {last}" in err and "terminated" in err and "Traceback" not in err, err
    assert sorted(n for n in os.listdir(run) if not n.startswith(".")) == sorted(os.listdir(run))  # no temp files
    assert not os.path.exists(os.path.join(run, f"checkpoint-{EPOCHS - 1}.pth"))
    pos = resume_position(load_checkpoint_file(last))
    assert (pos["start_epoch"], pos["start_step_in_epoch"], pos["global_step"]) == (1, 2, 6)
    monkeypatch.undo()

    assert main(_args(data, pretrained, tmp_path / "resumed", "--resume", last)) == 0
    assert "warning" not in capsys.readouterr().out  # same flags: nothing changed
    resumed = _run_dir(tmp_path / "resumed")
    want = torch.load(os.path.join(full_run, f"checkpoint-{EPOCHS - 1}.pth"), weights_only=True)
    got = torch.load(os.path.join(resumed, f"checkpoint-{EPOCHS - 1}.pth"), weights_only=True)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    for pid, state in want["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(got["optimizer"]["state"][pid][k], v), (pid, k)
    full_log = [json.loads(x) for x in open(os.path.join(full_run, "log.txt"))]
    assert [json.loads(x) for x in open(os.path.join(resumed, "log.txt"))] == full_log[1:]


def test_disk_full_at_a_checkpoint_keeps_the_last_one_and_names_it(finished, tmp_path, capsys, monkeypatch):
    data, pretrained, _ = finished
    real_save, pth_saves = torch.save, []

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            pth_saves.append(1)
            if len(pth_saves) == 3:  # checkpoint-last (step 2), checkpoint-0 (step 4), then the disk is full
                f.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(atomic_files.torch, "save", save)
    out = tmp_path / "full_disk"
    assert main(_args(data, pretrained, out)) == 2
    err = capsys.readouterr().err
    run = _run_dir(out)
    assert f"cannot write {os.path.join(run, 'checkpoint-last.pth')}: No space left on device" in err, err
    # the newest complete checkpoint: checkpoint-last.pth (a link to checkpoint-0.pth), unchanged
    assert f"--resume {os.path.join(run, 'checkpoint-last.pth')}" in err and "Traceback" not in err, err
    assert not [n for n in os.listdir(run) if n.startswith(".tmp")]
    monkeypatch.undo()
    last = load_checkpoint_file(os.path.join(run, "checkpoint-last.pth"))
    assert resume_position(last)["global_step"] == 4
    zero = load_checkpoint_file(os.path.join(run, "checkpoint-0.pth"))
    assert all(torch.equal(last["model"][k], v) for k, v in zero["model"].items())


# --- damaged or incomplete checkpoints ---------------------------------------------------------------

def _damaged(finished, tmp_path, change):
    ckpt = torch.load(os.path.join(finished[2], "checkpoint-0.pth"), weights_only=True)
    change(ckpt)
    path = tmp_path / "damaged.pth"
    torch.save(ckpt, path)
    return str(path)


def _drop(key):
    return lambda c: c.pop(key)


def _official(epoch):
    def change(c):
        del c["unlearn_fast"]
        c["epoch"] = epoch
    return change


@pytest.mark.parametrize("change,needles", [
    (_drop("optimizer"), ["without its 'optimizer' entry"]),  # was: restart at epoch 0, teacher = this model
    (_drop("epoch"), ["without its 'epoch' entry"]),
    (_official(-5), ["is damaged: its 'epoch' is -5"]),  # was: epochs -4..1 at a negative lr
    (_official(None), ["is damaged: its 'epoch' is None"]),  # was: a TypeError traceback
    (lambda c: c.update(unlearn_fast=[1, 2]), ["'unlearn_fast' entry is a list"]),  # was: AttributeError
    (lambda c: c["unlearn_fast"].update(next_epoch="x"), ["next_epoch is 'x'"]),
    (lambda c: c["unlearn_fast"].update(step_in_epoch=-1), ["step_in_epoch is -1"]),
    (lambda c: c["unlearn_fast"].update(step_in_epoch=1, epoch_sums="abc"), ["epoch_sums is 'abc'"]),
], ids=["no_optimizer", "no_epoch", "official_epoch_-5", "official_epoch_None", "position_a_list", "next_epoch_str",
        "step_in_epoch_-1", "epoch_sums_str"])
def test_damaged_checkpoint_is_one_error_naming_it(finished, tmp_path, capsys, change, needles):
    path = _damaged(finished, tmp_path, change)
    out = tmp_path / "out"
    assert_cli_fails_cleanly(_args(finished[0], finished[1], out, "--resume", path), out, capsys, path, *needles)


def test_train_loop_refuses_a_negative_start_epoch(make_mae_micro):
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32")
    with pytest.raises(ValueError, match="start_epoch must be >= 0, got -2"):
        train_loop(setup, lambda e: [], 3, epochs=2, lr=1e-3, start_epoch=-2, progress=False)


def test_resume_with_changed_trajectory_flags_warns(finished, tmp_path, capsys):
    data, pretrained, run = finished
    ckpt = os.path.join(run, "checkpoint-0.pth")
    assert main(_args(data, pretrained, tmp_path / "out", "--resume", ckpt, "--precision", "fp32",
                      "--forget_alpha", "0.3")) == 0
    out = capsys.readouterr().out
    assert "--precision reference (now fp32), --forget_alpha 0.2 (now 0.3)" in out, out


# --- two runs, one --output_dir --------------------------------------------------------------------------

def _clock(monkeypatch, stamps):
    """``time.strftime`` of run_outputs returns ``stamps`` in turn (then the last one)."""
    left = list(stamps)
    monkeypatch.setattr(run_outputs.time, "strftime", lambda fmt: left.pop(0) if len(left) > 1 else left[0])


def test_run_started_in_the_same_second_gets_its_own_folder(finished, tmp_path, monkeypatch):
    data, pretrained, _ = finished
    out = tmp_path / "out"
    name = os.path.basename(finished[2])[:-len("20240101-000000")]
    other = out / (name + "20240101-000000")  # another run's folder, started in this second
    other.mkdir(parents=True)
    (other / "opt.yaml").write_text("{}\n")
    _clock(monkeypatch, ["20240101-000000", "20240101-000000", "20240101-000001"])
    assert main(_args(data, pretrained, out, "--epochs", "1")) == 0
    assert sorted(os.listdir(other)) == ["opt.yaml"] and (other / "opt.yaml").read_text() == "{}\n"
    mine = out / (name + "20240101-000001")
    assert {"checkpoint-0.pth", "log.txt", "opt.yaml"} <= set(os.listdir(mine))


def test_create_run_dir_is_exclusive_and_gives_up_with_a_message(tmp_path, monkeypatch):
    _clock(monkeypatch, ["a", "a", "b"])
    assert create_run_dir(str(tmp_path), lambda: "run_" + run_outputs.time.strftime("%S")) == str(tmp_path / "run_a")
    assert create_run_dir(str(tmp_path), lambda: "run_" + run_outputs.time.strftime("%S")) == str(tmp_path / "run_b")
    monkeypatch.setattr(run_outputs, "RUN_DIR_NAME_TRIES", 2)
    monkeypatch.setattr(run_outputs.time, "sleep", lambda s: None)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="names of the last 2 seconds are taken"):
        create_run_dir(str(tmp_path), lambda: "run_b")
    assert time.monotonic() - t0 < 10
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create output directory"):
        create_run_dir(str(blocker / "sub"), lambda: "run")


# --- signals in DataLoader workers, interrupted writes ----------------------------------------------------

def _signal_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # a handler that does not end the process lets it return normally


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_worker_forked_during_the_run_ends_quietly_on_a_signal(signum, capfd):
    """Ctrl-C signals the whole process group: a DataLoader worker starting up must not print a traceback."""
    with unlearn_command.stop_signals():
        proc = multiprocessing.get_context("fork").Process(target=_signal_self, args=(signum,))
        proc.start()
        proc.join(30)
    err = capfd.readouterr().err
    assert proc.exitcode == 0 and "Traceback" not in err, (proc.exitcode, err)


def test_stop_between_link_and_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "checkpoint-1.pth", tmp_path / "checkpoint-last.pth"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")

    def interrupted(a, b):
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic_files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_link_or_copy(str(src), str(dst))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.pth", "checkpoint-last.pth"]
    assert dst.read_bytes() == b"old"


def test_out_of_memory_is_one_message_with_what_to_change(monkeypatch, capsys):
    """An out-of-memory error (device or host) ends the command with exit 1 and one line naming the remedy;
    any other RuntimeError keeps its traceback (a bug report needs it)."""
    import unlearn_fast.cli.main as cli_main

    def raise_(exc):
        def run(*args):
            raise exc
        return run
    monkeypatch.setattr(cli_main, "_run", raise_(torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")))
    assert cli_main.main(["unlearn"]) == 1
    err = capsys.readouterr().err
    assert "CUDA out of memory. Tried to allocate 2.00 GiB;" in err and "--batch_size" in err
    assert "more detail" not in err and "Traceback" not in err
    monkeypatch.setattr(cli_main, "_run", raise_(MemoryError()))
    assert cli_main.main(["unlearn"]) == 1
    assert "out of host memory" in capsys.readouterr().err
    monkeypatch.setattr(cli_main, "_run", raise_(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main.main(["unlearn"])


@pytest.mark.parametrize("exc,needle", [
    (IsADirectoryError(21, "Is a directory", "out/report.html"), "Is a directory: 'out/report.html'"),
    (OSError(28, "No space left on device", "run/log.txt"), "No space left on device: 'run/log.txt'"),
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"), "pip install matplotlib"),
])
def test_os_errors_and_missing_packages_are_one_message(monkeypatch, capsys, exc, needle):
    import unlearn_fast.cli.main as cli_main

    def run(*args):
        raise exc
    monkeypatch.setattr(cli_main, "_run", run)
    assert cli_main.main(["tsne"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_resume_warns_about_changed_data_flags_and_lr_not_about_unchanged_ones(tmp_path, capsys):
    """The classes, the subset sizes and --lr change the steps still to come: a continued run says so."""
    from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained
    data = make_class_tree(tmp_path / "data", ["cat", "dog", "bird", "fish"], 4, seed=0)
    pre = save_random_pretrained(tmp_path / "pre.pth")
    assert main(micro_unlearn_argv(data, pre, tmp_path / "a", epochs=2, per_class=2)) == 0
    ckpt = os.path.join(only_run_dir(tmp_path / "a"), "checkpoint-0.pth")
    capsys.readouterr()
    assert main(micro_unlearn_argv(data, pre, tmp_path / "b", epochs=2, per_class=2) + ["--resume", ckpt]) == 0
    assert "was trained with" not in capsys.readouterr().out  # the same flags: nothing to say
    assert main(micro_unlearn_argv(data, pre, tmp_path / "c", epochs=2, per_class=2, retain="fish")
                + ["--resume", ckpt, "--lr", "0.001"]) == 0
    warned = capsys.readouterr().out
    assert "--retain_classes bird (now fish)" in warned and "(now 0.001)" in warned, warned


def test_a_run_that_stops_before_its_first_checkpoint_leaves_no_folders_it_made(tmp_path, capsys):
    """The run directory is removed (nothing trained was saved), and so is an --output_dir the run created;
    an --output_dir that was there before stays."""
    from tests.helpers import make_class_tree, micro_unlearn_argv, save_random_pretrained
    data = make_class_tree(tmp_path / "data", ["cat", "dog", "bird"], 4, seed=0)
    for name in os.listdir(os.path.join(data, "cat")):
        with open(os.path.join(data, "cat", name), "wb") as f:
            f.write(b"not an image")  # read in the first epoch, before any checkpoint
    pre = save_random_pretrained(tmp_path / "pre.pth")
    assert main(micro_unlearn_argv(data, pre, tmp_path / "new" / "out")) == 2
    assert "removed" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "new" / "out") and os.path.isdir(tmp_path / "new")
    os.makedirs(tmp_path / "kept")
    assert main(micro_unlearn_argv(data, pre, tmp_path / "kept")) == 2
    assert os.path.isdir(tmp_path / "kept") and os.listdir(tmp_path / "kept") == []
