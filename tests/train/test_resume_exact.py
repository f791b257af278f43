"""Exact resume from a mid-epoch checkpoint (``--save_every_steps``), and atomic checkpoint writes.

The end-to-end test SIGKILLs a CLI training run (a subprocess) mid-epoch, resumes it from
``checkpoint-last.pth`` in a new run, and requires the final weights, optimizer state and log lines to be
bit-identical (``torch.equal``) to an uninterrupted run: no generator state is saved because every draw
is keyed by (seed, rank, step) or (seed, epoch, index). The control resumes with another seed and must
differ, so the comparison can fail.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from unlearn_fast.cli.main import main
from unlearn_fast.atomic_files import OutputWriteError
from unlearn_fast.train.checkpoint import load_checkpoint_file, restore_accumulated_grads, resume_position
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS, SAVE_EVERY = 3, 4  # 6 steps per epoch: checkpoint-last after steps 4, 6 (epoch end), 8, 12, 16, 18


@pytest.fixture(scope="module")
def data_and_weights(tmp_path_factory):
    root = make_class_tree(tmp_path_factory.mktemp("resume_data") / "train", ("cat", "dog", "bird"), 6, seed=1)
    return root, save_random_pretrained(tmp_path_factory.mktemp("resume_ckpt") / "pretrained.pth")


def _args(data, pretrained, out, *extra):
    return micro_unlearn_argv(data, pretrained, out, "--forget_alpha", "0.2", "--save_every_steps", str(SAVE_EVERY),
                              *extra, per_class=6, epochs=EPOCHS, warmup=1)


_run_dir = only_run_dir


# the killed run: the CLI with each step slowed by 50 ms (same numbers), so the test can kill it mid-epoch
_SLOW_RUN = """
import sys, time
import torch
torch.set_num_threads(1)
import unlearn_fast.train.trainer as trainer
real = trainer.fast_step
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
trainer.fast_step = slow
from unlearn_fast.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _run_and_kill_mid_epoch(argv, out, timeout=60.0) -> str:
    """Start the run, SIGKILL it as soon as a mid-epoch checkpoint-last.pth exists; return that file."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *argv], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
            runs = os.listdir(out) if os.path.isdir(out) else []
            last = os.path.join(out, runs[0], "checkpoint-last.pth") if runs else None
            if last and os.path.exists(last):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started (the run and nothing else)
                proc.wait(timeout=10)
                return last
            time.sleep(0.005)
        raise AssertionError("no checkpoint-last.pth appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stderr.close()


def test_sigkill_mid_epoch_then_resume_is_bit_identical(data_and_weights, tmp_path, capsys):
    data, pretrained = data_and_weights
    assert main(_args(data, pretrained, tmp_path / "full")) == 0
    full_run = _run_dir(tmp_path / "full")

    last = _run_and_kill_mid_epoch(_args(data, pretrained, tmp_path / "killed"), str(tmp_path / "killed"))
    killed_run = os.path.dirname(last)
    assert not os.path.exists(os.path.join(killed_run, f"checkpoint-{EPOCHS - 1}.pth"))  # it did not finish
    ckpt = load_checkpoint_file(last)
    pos = resume_position(ckpt)
    assert pos["start_step_in_epoch"] > 0, pos  # mid-epoch
    assert ckpt["epoch"] == pos["start_epoch"] - 1  # reference 'epoch' = the last finished one
    assert {"model", "optimizer", "scaler", "args"} <= set(ckpt)
    assert pos["global_step"] == pos["start_epoch"] * pos["steps_per_epoch"] + pos["start_step_in_epoch"]

    assert main(_args(data, pretrained, tmp_path / "resumed", "--resume", last)) == 0
    assert f"at epoch {pos['start_epoch']} step {pos['start_step_in_epoch']}" in capsys.readouterr().out
    resumed_run = _run_dir(tmp_path / "resumed")
    want = torch.load(os.path.join(full_run, f"checkpoint-{EPOCHS - 1}.pth"), weights_only=True)
    got = torch.load(os.path.join(resumed_run, f"checkpoint-{EPOCHS - 1}.pth"), weights_only=True)
    assert got["model"].keys() == want["model"].keys()
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    for pid, state in want["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(got["optimizer"]["state"][pid][k], v), (pid, k)
    # the log lines of the epochs the resumed run finished equal the uninterrupted ones, to the last bit
    full_log = [json.loads(x) for x in open(os.path.join(full_run, "log.txt"))]
    resumed_log = [json.loads(x) for x in open(os.path.join(resumed_run, "log.txt"))]
    assert resumed_log == full_log[pos["start_epoch"]:]

    # control: the same resume with another seed (other data order, masks, noise) ends elsewhere
    assert main(_args(data, pretrained, tmp_path / "control", "--resume", last, "--seed", "1")) == 0
    control = torch.load(os.path.join(_run_dir(tmp_path / "control"), f"checkpoint-{EPOCHS - 1}.pth"),
                         weights_only=True)["model"]
    assert not torch.equal(control["blocks.0.attn.qkv.weight"], want["model"]["blocks.0.attn.qkv.weight"])
    assert "trained with --seed 0, continuing with --seed 1" in capsys.readouterr().out


# ---- the loop alone (fast, in-process) -------------------------------------------------------------------

STEPS, LR = 5, 1e-3


def _batches(epochs):
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([100.0, -100.0, 100.0])
    return {e: [(torch.rand(3, 3, 32, 32, generator=g), labels.clone()) for _ in range(STEPS)] for e in range(epochs)}


def _setup(make_mae_micro, accum=1):
    return build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5, accum_iter=accum)


@pytest.mark.parametrize("accum", [1, 2])
def test_loop_resumed_from_every_mid_epoch_checkpoint_is_exact(make_mae_micro, tmp_path, accum):
    data = _batches(2)
    full = _setup(make_mae_micro, accum)
    os.makedirs(tmp_path / "full")
    history = train_loop(full, lambda e: iter(data[e]), STEPS, epochs=2, lr=LR, warmup_epochs=1, progress=False,
                         output_dir=str(tmp_path / "full"), save_every_steps=2 * accum, readback_every=3)
    part_dir = tmp_path / "part"
    part = _setup(make_mae_micro, accum)
    stop_after = 4 * accum  # steps run before the "crash"

    def crashing(epoch):
        for i, batch in enumerate(data[epoch]):
            if epoch * STEPS + i >= stop_after:
                raise KeyboardInterrupt
            yield batch
    os.makedirs(part_dir)
    with pytest.raises(KeyboardInterrupt):
        train_loop(part, crashing, STEPS, epochs=2, lr=LR, warmup_epochs=1, progress=False, output_dir=str(part_dir),
                   save_every_steps=2 * accum, readback_every=3)
    ckpt = load_checkpoint_file(str(part_dir / "checkpoint-last.pth"))
    pos = resume_position(ckpt)
    # accum 1: mid-epoch (step 4 of 5); accum 2: the end of epoch 0, whose last micro-step (5 % 2) left a
    # gradient to carry into epoch 1: it is in the checkpoint
    assert pos["global_step"] == (4 if accum == 1 else STEPS)
    assert ("accumulated_grads" in pos) == (accum == 2)
    resumed = _setup(make_mae_micro, accum)
    resumed.student.load_state_dict(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["optimizer"])
    restore_accumulated_grads(resumed.student, ckpt)
    e0, s0 = pos["start_epoch"], pos["start_step_in_epoch"]
    rest = train_loop(resumed, lambda e: iter(data[e][s0 if e == e0 else 0:]), STEPS, epochs=2, lr=LR,
                      warmup_epochs=1, progress=False, start_epoch=e0, start_step_in_epoch=s0,
                      save_every_steps=2 * accum, readback_every=3,  # the same flags: the same log sums
                      epoch_progress={k: pos[k] for k in ("epoch_sums", "epoch_steps", "epoch_lr_sum")} if s0 else None)
    for (n, a), b in zip(full.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(a, b), n
    assert rest == history[e0:]


def test_epoch_end_updates_checkpoint_last(make_mae_micro, tmp_path):
    data = _batches(2)
    setup = _setup(make_mae_micro)
    train_loop(setup, lambda e: iter(data[e]), STEPS, epochs=2, lr=LR, progress=False, output_dir=str(tmp_path),
               save_every_steps=3)
    last = load_checkpoint_file(str(tmp_path / "checkpoint-last.pth"))
    final = load_checkpoint_file(str(tmp_path / "checkpoint-1.pth"))
    assert last["epoch"] == 1 and resume_position(last)["start_epoch"] == 2
    assert all(torch.equal(last["model"][k], v) for k, v in final["model"].items())
    assert not os.path.exists(tmp_path / "checkpoint-last.safetensors")  # the side file is per epoch only
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_failed_checkpoint_write_keeps_the_previous_one(make_mae_micro, tmp_path, monkeypatch):
    """A write that dies midway (here: half a file, then ENOSPC) leaves the old checkpoint-last loadable."""
    data = _batches(1)
    setup = _setup(make_mae_micro)
    calls = {"n": 0}
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint-last: write part of it, then fail
            f.write(b"PK\x03\x04 half a zip file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OutputWriteError, match=r"checkpoint-last\.pth: No space left on device"):
        train_loop(setup, lambda e: iter(data[e]), STEPS, epochs=1, lr=LR, progress=False, output_dir=str(tmp_path),
                   save_every_steps=2)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint_file(str(tmp_path / "checkpoint-last.pth"))
    assert resume_position(ckpt)["global_step"] == 2  # the first one, intact
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth"]  # no temporary file left behind
