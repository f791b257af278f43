"""Exact resume of Palette unlearning from the ``{epoch}_Network.pth`` / ``_ema.pth`` / ``.state`` layout.

3 epochs uninterrupted vs 1 epoch, then a resume (fresh process state: a new network, setup and optimizer) to
3: the final student, teacher, EMA, Adam state and per-epoch losses must be bit-identical (``torch.equal``).
The UNet has dropout, so the global generator matters too. Controls show the comparison can fail: a fresh
Adam, the resumed student as teacher (the reference's bug) or another seed each end elsewhere. Then the
original-teacher check, the official 4-key ``.state`` (best effort, one warning; still exact here because
every draw is keyed by seed and step), and one clear CheckpointError/ValueError per bad input.
"""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from unlearn_fast.models import create_model
from unlearn_fast.train.checkpoint import CheckpointError
from unlearn_fast.train.palette_steps import build_palette_setup
from unlearn_fast.train.palette_trainer import (OFFICIAL_STATE_KEYS, check_palette_resume_fits,
                                                load_resumed_network, palette_resume_paths, palette_resume_start,
                                                palette_train_loop, read_palette_resume, restore_palette_training)

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SIZE, BATCH, STEPS, EPOCHS, SEED = 16, 3, 3, 3, 5
UNET = dict(dropout=0.1)  # dropout draws from the global generator: it is reseeded per step, never saved


def _net(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("palette_micro", unet=UNET)


@pytest.fixture(scope="module")
def original():
    return _net(0)


def _epoch_batches(epoch):
    """The batches of one epoch, a function of the epoch only (as the seeded sampler and dataset give)."""
    g = torch.Generator().manual_seed(100 + epoch)
    for _ in range(STEPS):
        gt = torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1
        mask = torch.zeros(BATCH, 1, SIZE, SIZE)
        top = int(torch.randint(0, 8, (1,), generator=g))
        mask[:, :, top:top + 7, 2:11] = 1.0
        cond = gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g)
        labels = torch.tensor([1.0, -1.0, -1.0])
        yield {"gt_image": gt, "cond_image": cond, "mask": mask}, labels


def _setup(net, approach="ours", fast=True, seed=SEED, teacher_state=None):
    return build_palette_setup(net, "cpu", approach, forget_alpha=0.3, lr=1e-3, ema_decay=0.9, seed=seed, fast=fast,
                               teacher_state=teacher_state)


def _train(setup, run_dir, n_epoch, start_epoch=1, start_iters=0, save_position=True):
    return palette_train_loop(setup, _epoch_batches, STEPS, n_epoch=n_epoch, run_dir=str(run_dir), progress=False,
                              readback_every=2, start_epoch=start_epoch, start_iters=start_iters,
                              save_position=save_position)


def _resume(prefix, approach="ours", fast=True, seed=SEED, n_epoch=EPOCHS, restore=True, teacher="stored"):
    """What the command line does: read, check, load into a NEW network (other random init), set up, restore."""
    resume = read_palette_resume(prefix)
    start = palette_resume_start(resume, n_epoch, seed, STEPS)
    check_palette_resume_fits(resume, approach)
    net = _net(seed=123)
    load_resumed_network(net, resume)
    teacher_state = resume.teacher if teacher == "stored" else None  # None: a copy of the resumed student (bug)
    setup = _setup(net, approach, fast, seed, teacher_state)
    if restore:
        restore_palette_training(setup, resume)
    return setup, resume, start


def _files(run_dir, epoch):
    ck = os.path.join(str(run_dir), "checkpoint")
    return [torch.load(os.path.join(ck, f"{epoch}{s}"), weights_only=True)
            for s in ("_Network.pth", "_Network_ema.pth", ".state")]


def _assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        assert st.keys() == b["state"][pid].keys()
        for k, v in st.items():
            assert torch.equal(v, b["state"][pid][k]), (pid, k)


def _differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(original, tmp_path_factory):
    """One uninterrupted 3-epoch run and one that stops after epoch 1 (approach 'ours', fast step)."""
    base = tmp_path_factory.mktemp("palette_resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (single_thread is function-scoped): the same CPU reduction order
    try:
        full = _train(_setup(copy.deepcopy(original)), base / "full", EPOCHS)
        _train(_setup(copy.deepcopy(original)), base / "part", 1)
    finally:
        torch.set_num_threads(threads)
    return dict(base=base, full=full, prefix=str(base / "part" / "checkpoint" / "1"))


@pytest.mark.parametrize("approach,fast", [("ours", True), ("retain_label", False)])
def test_resume_at_epoch_end_is_bit_identical(original, runs, tmp_path, approach, fast):
    if approach == "ours" and fast:
        full, prefix = runs["full"], runs["prefix"]
        full_dir = runs["base"] / "full"
    else:  # the reference-semantics step on the whole UNet (single-tensor Adam, Python-loop EMA)
        full_dir = tmp_path / "full"
        full = _train(_setup(copy.deepcopy(original), approach, fast), full_dir, EPOCHS)
        _train(_setup(copy.deepcopy(original), approach, fast), tmp_path / "part", 1)
        prefix = str(tmp_path / "part" / "checkpoint" / "1")
    setup, resume, start = _resume(prefix, approach, fast)
    assert (start, resume.epoch, resume.iters) == (2, 1, STEPS * BATCH)
    rest = _train(setup, tmp_path / "resumed", EPOCHS, start, resume.iters)
    assert rest == full[1:]  # the per-epoch losses, to the last bit
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoint")) == sorted(
        f"{e}{s}" for e in (2, 3) for s in ("_Network.pth", "_Network_ema.pth", ".state"))
    want_net, want_ema, want_state = _files(full_dir, EPOCHS)
    got_net, got_ema, got_state = _files(tmp_path / "resumed", EPOCHS)
    assert list(got_net) == list(want_net) and any(k.startswith("teacher_denoise_fn.") for k in got_net)
    for k in want_net:  # student, schedule buffers and teacher
        assert torch.equal(got_net[k], want_net[k]), k
    assert got_ema.keys() == want_ema.keys() and not _differs(got_ema, want_ema)
    assert (got_state["epoch"], got_state["iter"]) == (want_state["epoch"], want_state["iter"]) == (3, 27)
    _assert_same_optimizer(got_state["optimizers"][0], want_state["optimizers"][0])
    assert got_state["unlearn_fast"] == want_state["unlearn_fast"]
    assert set(OFFICIAL_STATE_KEYS) <= set(got_state)  # the official keys stay


@pytest.mark.parametrize("control", ["fresh_adam", "student_as_teacher", "other_seed"])
def test_controls_show_the_comparison_can_fail(runs, tmp_path, control, capsys):
    seed = SEED + 1 if control == "other_seed" else SEED
    setup, resume, start = _resume(runs["prefix"], seed=seed, restore=control != "fresh_adam",
                                   teacher="copy" if control == "student_as_teacher" else "stored")
    if control == "fresh_adam":  # the EMA is restored either way: only the optimizer state is missing
        setup.ema.load_state_dict(resume.ema)
    if control == "other_seed":
        assert "seed 5 -> 6" in capsys.readouterr().out
    _train(setup, tmp_path, EPOCHS, start, resume.iters)
    want_net, want_ema, _ = _files(runs["base"] / "full", EPOCHS)
    got_net, got_ema, _ = _files(tmp_path, EPOCHS)
    student = [k for k in want_net if k.startswith("denoise_fn.input_blocks.")]
    assert _differs({k: got_net[k] for k in student}, {k: want_net[k] for k in student})
    assert _differs(got_ema, want_ema)


def test_the_teacher_is_the_original_model_stored_in_the_file(original, runs, tmp_path):
    setup, resume, _ = _resume(runs["prefix"])
    teacher = setup.network.teacher_denoise_fn.state_dict()
    orig = original.denoise_fn.state_dict()
    assert all(torch.equal(teacher[k], orig[k]) for k in orig)  # the model before unlearning ...
    student = setup.network.denoise_fn.state_dict()
    assert _differs({k: student[k] for k in orig if "input_blocks" in k},
                    {k: teacher[k] for k in orig if "input_blocks" in k})  # ... not the resumed student
    assert not setup.network.teacher_denoise_fn.training
    assert not any(p.requires_grad for p in setup.network.teacher_denoise_fn.parameters())
    # the weights come from the file's teacher_denoise_fn.* keys: change them there and the teacher follows
    net = torch.load(resume.network_path, weights_only=True)
    key = "teacher_denoise_fn.input_blocks.0.0.weight"
    net[key] = net[key] + 0.25
    prefix = _copy_prefix(runs["prefix"], tmp_path / "t" / "1")
    torch.save(net, prefix + "_Network.pth")
    tampered, _, _ = _resume(prefix)
    assert torch.equal(tampered.network.teacher_denoise_fn.input_blocks[0][0].weight, net[key])


def _copy_prefix(prefix, dst_prefix) -> str:
    dst_prefix = str(dst_prefix)
    os.makedirs(os.path.dirname(dst_prefix), exist_ok=True)
    for src, dst in zip(palette_resume_paths(prefix)[1:], palette_resume_paths(dst_prefix)[1:]):
        shutil.copyfile(src, dst)
    return dst_prefix


def test_official_state_loads_with_one_warning(runs, tmp_path, capsys):
    prefix = _copy_prefix(runs["prefix"], tmp_path / "official" / "1")
    state = torch.load(prefix + ".state", weights_only=True)
    torch.save({k: state[k] for k in OFFICIAL_STATE_KEYS}, prefix + ".state")
    assert palette_resume_paths(prefix + ".state")[0] == prefix  # a file of the set works as the prefix too
    setup, resume, start = _resume(prefix + "_Network.pth")
    out = capsys.readouterr().out
    assert resume.position == {} and out.count("warning") == 1 and "random state of the run was not saved" in out
    rest = _train(setup, tmp_path / "resumed", EPOCHS, start, resume.iters)
    assert rest == runs["full"][1:]  # same seed and steps per epoch: still exact (draws are keyed by them)


# ---- bad inputs: one clear error naming the file ----------------------------------------------------------
@pytest.mark.parametrize("missing", ["_Network.pth", "_Network_ema.pth", ".state"])
def test_missing_file(runs, tmp_path, missing):
    prefix = _copy_prefix(runs["prefix"], tmp_path / "1")
    os.remove(prefix + missing)
    with pytest.raises(CheckpointError, match="cannot resume from") as info:
        read_palette_resume(prefix)
    named = str(info.value).split("missing ", 1)[1].split(";")[0]
    assert named.split(" (")[0] == prefix + missing  # that file, and only it
    assert ("ema_scheduler" in named) == (missing == "_Network_ema.pth")


@pytest.mark.parametrize("which", ["_Network.pth", "_Network_ema.pth", ".state"])
def test_truncated_file(runs, tmp_path, which):
    prefix = _copy_prefix(runs["prefix"], tmp_path / "1")
    data = open(prefix + which, "rb").read()
    open(prefix + which, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*1{which.replace('.', '[.]')}.*truncated"):
        read_palette_resume(prefix)


def test_state_of_other_flags_is_refused(original, runs, tmp_path):
    # an unlearn_fast .state names its approach
    with pytest.raises(CheckpointError, match=r"saved by a 'ours' run \(--fix_decoder 1\); this run is "
                                              r"'retain_label' \(--learn_others 1\)"):
        check_palette_resume_fits(read_palette_resume(runs["prefix"]), "retain_label")
    with pytest.raises(CheckpointError, match=r"1_Network\.pth holds teacher_denoise_fn.\* weights"):
        check_palette_resume_fits(_official(read_palette_resume(runs["prefix"])), "noisy_label")
    # an official .state: the Adam moments cover the encoder, this run trains the whole UNet
    resume = _official(read_palette_resume(runs["prefix"]))
    check_palette_resume_fits(resume, "retain_label")
    net = _net(1)
    load_resumed_network(net, resume)
    setup = _setup(net, "retain_label", teacher_state=resume.teacher)
    n_all, n_enc = len(list(net.denoise_fn.parameters())), len(net.encoder_parameter_names())
    with pytest.raises(CheckpointError, match=rf"1\.state does not match the parameters this run trains: "
                                              rf"'retain_label' \(--learn_others 1\) trains {n_all} tensors, the "
                                              rf"file has Adam moments for {n_enc}: {n_all - n_enc} of them missing"):
        restore_palette_training(setup, resume)
    # the other way: whole-UNet moments, an encoder-only run
    _train(_setup(copy.deepcopy(original), "retain_label"), tmp_path / "rl", 1)
    resume = _official(read_palette_resume(str(tmp_path / "rl" / "checkpoint" / "1")))
    setup = _setup(_net(1), "ours", teacher_state=resume.teacher)
    with pytest.raises(CheckpointError, match=rf"trains {n_enc} tensors, the file has Adam moments for {n_all}: "
                                              rf"{n_all - n_enc} outside them \(e\.g\. "):
        restore_palette_training(setup, resume)
    # a teacher approach resumed from a file without teacher weights
    _train(_setup(copy.deepcopy(original), "noisy_label"), tmp_path / "nl", 1)
    resume = _official(read_palette_resume(str(tmp_path / "nl" / "checkpoint" / "1")))
    with pytest.raises(CheckpointError, match=r"holds no teacher_denoise_fn\.\* weights"):
        check_palette_resume_fits(resume, "ours")


def _official(resume):
    resume.position = {}
    return resume


def test_bad_contents(runs, tmp_path):
    resume = read_palette_resume(runs["prefix"])
    setup = _setup(_net(1), teacher_state=resume.teacher)
    pid = next(iter(resume.optimizer["state"]))
    resume.optimizer["state"][pid]["exp_avg"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"'exp_avg' of denoise_fn\..* has shape \(3,\)"):
        restore_palette_training(setup, resume)
    resume = read_palette_resume(runs["prefix"])
    resume.ema = {"denoise_fn.nope": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1_Network_ema\.pth does not fit UNet: .*missing keys"):
        restore_palette_training(_setup(_net(1), teacher_state=resume.teacher), resume)
    with pytest.raises(ValueError, match=r"1\.state already finished epoch 1 of train\.n_epoch 1: nothing to do"):
        palette_resume_start(read_palette_resume(runs["prefix"]), 1, SEED, STEPS)
    with pytest.raises(ValueError, match="uses no teacher"):
        _setup(_net(1), "max_loss", teacher_state=resume.teacher)
    with pytest.raises(ValueError, match=r"start_epoch must be in \[1, n_epoch=3\]"):
        _train(_setup(_net(1)), tmp_path / "x", EPOCHS, start_epoch=4)
    prefix = _copy_prefix(runs["prefix"], tmp_path / "bad" / "1")
    torch.save({"epoch": 1, "iter": 9}, prefix + ".state")
    with pytest.raises(CheckpointError, match=r"1\.state: not a Palette \.state file \(no optimizers"):
        read_palette_resume(prefix)
    torch.save({"epoch": 1, "iter": 9, "schedulers": [], "optimizers": []}, prefix + ".state")
    with pytest.raises(CheckpointError, match=r"'optimizers' must be a list holding one Adam state dict"):
        read_palette_resume(prefix)
    torch.save({"epoch": -1, "iter": 9, "schedulers": [], "optimizers": [resume.optimizer]}, prefix + ".state")
    with pytest.raises(CheckpointError, match=r"'epoch' must be an integer >= 0, got -1"):
        read_palette_resume(prefix)
    torch.save({"epoch": 1, "iter": 9, "schedulers": [], "optimizers": [resume.optimizer],
                "unlearn_fast": {"format": 99}}, prefix + ".state")
    with pytest.raises(CheckpointError, match="newer unlearn_fast"):
        read_palette_resume(prefix)
    prefix = _copy_prefix(runs["prefix"], tmp_path / "bad2" / "1")
    torch.save([1, 2], prefix + "_Network.pth")
    with pytest.raises(CheckpointError, match=r"holds a list, expected a dict"):
        read_palette_resume(prefix)
