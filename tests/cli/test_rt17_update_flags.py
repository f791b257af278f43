"""Red team of the opt-in update flags ``--fold_clip`` and ``--half_student_weights`` (session 17) with the options a
user combines them with, on the CPU (mae_micro / mage_micro; the fold needs CUDA's fused AdamW, so its CPU cases are
about what the run says).

Each test of a fault says what was wrong and what is expected; each failed before its fix. The other tests record
combinations checked and found sound. Comparisons of one AdamW update with and without the half student: every
trainable tensor within 1e-6 relative (the same forward bits, torch's AdamW math in another order; measured ~1e-7);
CLI comparisons of one update after a resume: each tensor's step within 1e-4 relative of the run it replaces (the
step is ~lr = 1e-3 on weights of ~0.1, whose fp32 rounding alone is ~1e-5 of it; measured up to 1.3e-5).
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import socket
import types

import pytest
import torch
import torch.multiprocessing as mp

import unlearn_fast
from unlearn_fast.cli.flag_scope import FLAG_SCOPES, idle_flags
from unlearn_fast.cli.main import main
from unlearn_fast.train import fast_update, folded_clip, unlearn_setup
from unlearn_fast.train import half_student as hs
from unlearn_fast.train.checkpoint import read_checkpoint
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.unlearn_setup import build_setup

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

IS_FORGET = torch.tensor([True, False, True, False, False, True])


@pytest.fixture(scope="module")
def mae():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return unlearn_fast.create_model("mae_micro")


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(6, 3, 32, 32, generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Class folders, the starting weights and another model as the teacher (a real retain gradient)."""
    base = tmp_path_factory.mktemp("rt17")
    data = make_class_tree(base / "train", ("cat", "dog", "bird"), 4, seed=3)
    return dict(data=str(data), pre=save_random_pretrained(base / "pre.pth"),
                teacher=save_random_pretrained(base / "teacher.pth", seed=1))


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    """The once-per-process notices start unsaid in every test (an earlier test may have said them)."""
    monkeypatch.setattr(unlearn_setup, "_knobs_said", set())


def _ns(precision="bf16", world_size=1, **set_flags):
    ns = argparse.Namespace(**{flag: set_flags.get(flag, False) for flag in FLAG_SCOPES})
    ns.precision, ns.world_size = precision, world_size
    return ns


def _argv(tree, out, *extra, epochs=1):
    return micro_unlearn_argv(tree["data"], tree["pre"], out, "--teacher", tree["teacher"], "--seed", "3",
                              "--forget_alpha", "0.2", "--lr", "1e-3", *extra, epochs=epochs)


def _cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def _count_updates(monkeypatch):
    calls = []
    real = fast_update.half_student_update
    monkeypatch.setattr(fast_update, "half_student_update", lambda *a: calls.append(1) or real(*a))
    return calls


def _setup(model, half=True, **kw):
    model = copy.deepcopy(model)
    kw = dict(dict(lr=1e-3, precision="bf16", forget_alpha=0.5, fast=True), **kw)
    return build_setup(model, "cpu", half_student_weights=half, teacher=copy.deepcopy(model), **kw)


def _distance(a, b) -> float:
    pb = dict(b.student.named_parameters())
    return max(((p - pb[n]).norm() / pb[n].norm().clamp_min(1e-30)).item()
               for n, p in a.student.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Faults found by the red team (each failed before its fix)
# ----------------------------------------------------------------------------------------------------------------

def test_half_student_at_reference_precision_on_the_cpu_acts_and_is_not_called_idle(tree, tmp_path, capsys,
                                                                                      monkeypatch):
    """FAULT (misleading message): on the CPU ``--precision reference`` runs the student in bf16 autocast without
    loss scaling (precision.py: fp16 only on a GPU), so the half student serves the run, every update through its
    kernel; yet flag_scope.py ``_moot_at_precision`` said "--half_student_weights has no effect on this run (with
    --precision reference the student does not run in bf16 ...)". Expected: no such line on the CPU (the update
    runs); on a GPU, where reference means fp16 with loss scaling, it is still named."""
    updates = _count_updates(monkeypatch)
    out = _cli(_argv(tree, tmp_path / "out", "--step", "fast", "--precision", "reference", "--half_student_weights",
                     "--max_steps_per_epoch", "2"), capsys)
    assert updates == [1, 1]  # both steps updated through the copies
    assert "--half_student_weights has no effect" not in out, out
    assert idle_flags(_ns("reference", half_student_weights=True), "mae", "cpu", "fast") == []
    (line,) = idle_flags(_ns("reference", half_student_weights=True), "mae", "cuda", "fast")
    assert "--precision reference" in line and "fp16" in line


def test_fold_clip_beside_an_acting_half_student_is_named():
    """FAULT (missing message): with ``--half_student_weights`` acting (bf16, one process, GPU) the update goes
    through half_student_update, which applies the clip's coefficient itself; fast_update.py never reaches the fold,
    so ``--fold_clip`` does nothing, silently (the README: a flag that cannot act is named at the start). Expected:
    --fold_clip named; where the half student cannot act (fp32, several processes) the fold acts and is not."""
    both = dict(fold_clip=True, half_student_weights=True)
    lines = idle_flags(_ns("bf16", **both), "mae", "cuda", "fast")
    assert len(lines) == 1 and lines[0].startswith("--fold_clip has no effect") and "half_student" in lines[0]
    assert [line.split(" ")[0] for line in idle_flags(_ns("fp32", **both), "mae", "cuda", "fast")] == \
        ["--half_student_weights"]
    assert idle_flags(_ns("bf16", fold_clip=True), "mae", "cuda", "graphed") == []


def test_several_processes_name_the_update_flags_that_cannot_act():
    """FAULT (missing message): idle_flags did not look at the number of processes. ``--half_student_weights`` is for
    one process (a DDP student is declined at its first step, and the multi-process CUDA-graph step refuses it), and
    on several processes the CUDA-graph step runs the plain clip and update around its all-reduce
    (flat_grads_update), so ``--fold_clip`` does nothing there. Neither was named at the start. Expected: both named
    (the CLI sets ``args.world_size`` before it asks); the eager DDP step does fold the clip: not named."""
    lines = idle_flags(_ns("bf16", world_size=2, half_student_weights=True), "mae", "cuda", "graphed")
    assert len(lines) == 1 and lines[0].startswith("--half_student_weights has no effect") and "one process" in lines[0]
    (line,) = idle_flags(_ns("fp32", world_size=2, fold_clip=True), "mae", "cuda", "graphed")
    assert line.startswith("--fold_clip has no effect") and "processes" in line
    assert idle_flags(_ns("fp32", world_size=2, fold_clip=True), "mae", "cuda", "fast") == []
    # several processes: the half student is off, so the fold acts in the eager step beside it
    assert [line.split(" ")[0] for line in idle_flags(_ns("bf16", world_size=2, fold_clip=True,
                                                          half_student_weights=True), "mae", "cuda", "fast")] == \
        ["--half_student_weights"]


def test_the_half_students_notice_comes_from_rank_0_only(mae, capsys):
    """FAULT (message repeated): the notice "half_student_weights is off for this run" was printed by every process
    of a multi-process run (rank 1 included: the CLI silences the other ranks' notices only around setup), and named
    the DDP wrapper rather than the rule. Expected: rank 0 alone says it, once, naming one process."""
    for rank in (1, 0):
        setup = _setup(mae, rank=rank)
        setup.student = types.SimpleNamespace(module=setup.student)  # stands in for a DDPStudent (not a Module)
        for _ in range(3):
            assert hs.half_student_active(setup) is False
        out = capsys.readouterr().out
        if rank == 1:
            assert out == ""
        else:
            assert out.count("half_student_weights is off") == 1 and "one process" in out, out


def _rank_worker(rank, world, port, argv, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(f"rc={rc}\n{buf.getvalue()}")


def test_two_processes_name_the_half_student_once_and_train(tree, tmp_path):
    """FAULT (world size 2 on the CPU, gloo): ``--half_student_weights --precision bf16`` in a 2-process run trained,
    but nothing was named at the start, and each rank printed "half_student_weights is off ... a multi-rank wrapper
    (DDP)" at its first step. Expected: rank 0 names it before the run's first line, as every idle flag; rank 1
    prints nothing about it; both ranks finish."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = micro_unlearn_argv(tree["data"], tree["pre"], str(tmp_path / "out"), "--precision", "bf16", "--step",
                              "fast", "--half_student_weights", "--max_steps_per_epoch", "1", batch=2)
    mp.spawn(_rank_worker, args=(2, port, argv, str(tmp_path)), nprocs=2, join=True)
    outs = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert all(o.startswith("rc=0\n") for o in outs), outs
    assert "half_student" not in outs[1], outs[1]
    first = outs[0].index("--half_student_weights has no effect on this run")
    assert "one process" in outs[0] and first < outs[0].index("writing to"), outs[0]


def test_a_weight_unfrozen_mid_run_outside_the_optimizer_does_not_stop_the_run(mae, batches):
    """FAULT (crash): ``student.requires_grad_(True)`` mid-run (the decoder and MAE's fixed pos_embed now require
    grad, the optimizer holds the encoder as before) made the next fast step raise "20 trainable Linear / conv
    weights of the student are not in the optimizer" from HalfStudent (half_student.py), when the copy was rebuilt
    for the new trainable set. Without the knob the run goes on: those weights get gradients nobody applies.
    Expected: as without the knob (weights outside the optimizer stay the student's fp32 tensors in the copy):
    one update within 1e-6, the weights outside the optimizer untouched."""
    plain, half = _setup(mae, half=False), _setup(mae)
    hs.step_student(half)  # the copy exists, as after a first step
    for s in (plain, half):
        s.student.requires_grad_(True)
        fast_step(s, batches[0], IS_FORGET, 0)
    d = _distance(plain, half)
    assert d <= 1e-6, d
    dec = {n: p for n, p in half.student.named_parameters() if n.startswith("decoder")}
    ref = dict(mae.named_parameters())
    assert dec and all(torch.equal(p, ref[n]) for n, p in dec.items())
    assert all(m.dtype == torch.float32 and c.dtype == torch.bfloat16
               for m, c in zip(half.half_student.masters, half.half_student.copies))


def test_every_linear_and_conv_frozen_mid_run_declines_the_copy_and_trains_on(mae, batches, capsys):
    """FAULT (crash): freezing every Linear / conv weight mid-run (tuning only the norms and tokens) made the next
    fast step raise "the student has no trainable Linear / conv weight: nothing to keep in bf16" from HalfStudent
    (half_student.py), the copy being rebuilt for the new trainable set; without the knob the run goes on.
    Expected: the knob declined with one notice, the steps as without it (bit for bit: nothing goes through a
    copy), and the copy back once a weight trains again."""
    plain, half = _setup(mae, half=False), _setup(mae)
    for s in (plain, half):
        fast_step(s, batches[0], IS_FORGET, 0)
    half.student.load_state_dict(plain.student.state_dict())
    half.optimizer.load_state_dict(copy.deepcopy(plain.optimizer.state_dict()))
    capsys.readouterr()
    for s in (plain, half):
        for m in s.student.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.requires_grad_(False)
        for step in (1, 2):
            fast_step(s, batches[step % 2], IS_FORGET, step)
    out = capsys.readouterr().out
    assert out.count("half_student_weights is off") == 1 and "Linear / conv" in out, out
    assert all(torch.equal(p, q) for p, q in zip(plain.student.parameters(), half.student.parameters()))
    half.student.blocks[0].mlp.fc1.requires_grad_(True)
    fast_step(half, batches[0], IS_FORGET, 3)
    assert half.half_student is not None and len(half.half_student.masters) == 2


def test_fold_clip_says_once_where_it_cannot_fold(mae, batches, capsys):
    """FAULT (missing message): ``build_setup(..., fold_clip=True)`` where the fold cannot serve (here the CPU's
    plain AdamW: the fold needs torch's fused AdamW; also a run without a clip, loss scaling, or an acting half
    student) ran the plain update in silence, while fast_update.py promises "each opt-in form names itself off,
    once" (half_student.py does). Expected: one notice naming why, over several steps; from rank 0 only; and a
    fold that acts says nothing (torch's fused AdamW on the CPU takes the same grad_scale)."""
    setup = _setup(mae, half=False, fold_clip=True)
    for step in range(2):
        fast_step(setup, batches[step], IS_FORGET, step)
    out = capsys.readouterr().out
    assert out.count("fold_clip is off for this run") == 1 and "fused" in out, out
    half = _setup(mae, fold_clip=True)
    fast_step(half, batches[0], IS_FORGET, 0)
    out = capsys.readouterr().out
    assert out.count("fold_clip is off for this run") == 1 and "half_student_weights" in out, out
    quiet = _setup(mae, half=False, fold_clip=True, rank=1, grad_clip=None)
    fast_step(quiet, batches[0], IS_FORGET, 0)
    acting = _setup(mae, half=False, fold_clip=True, precision="fp32")
    acting.optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                          for g in acting.optimizer.param_groups], lr=1e-3, betas=(0.9, 0.95),
                                         fused=True)  # the CUDA optimizer's kernel, on the CPU
    assert folded_clip.can_fold_clip(acting)
    fast_step(acting, batches[0], IS_FORGET, 0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("extra", [("--precision", "fp32", "--half_student_weights"),
                                   ("--precision", "bf16", "--fold_clip")])
def test_the_cli_names_an_idle_update_flag_once(tree, tmp_path, capsys, extra):
    """FAULT (message repeated): a CLI run names an update flag that cannot act at its start (flag_scope.py), and
    the setup, built with the flag on anyway, said it again at the first step ("half_student_weights is off for
    this run: ..."). Now unlearn_command.py hands build_setup only the forms not named idle: one line per flag."""
    flag = extra[-1][2:]
    out = _cli(_argv(tree, tmp_path / "out", "--step", "fast", "--max_steps_per_epoch", "1", *extra), capsys)
    assert sum(flag in line for line in out.splitlines()) == 1, out


# ----------------------------------------------------------------------------------------------------------------
# Checked and sound (these pass)
# ----------------------------------------------------------------------------------------------------------------

def _steps(run_a, run_b, base) -> float:
    """Largest relative difference between the weight steps two checkpoints took from ``base``."""
    a, b = run_a["model"], run_b["model"]
    return max(((a[k] - base[k]) - (b[k] - base[k])).norm().item() / (a[k] - base[k]).norm().item()
               for k in a if (a[k] - base[k]).norm() > 0)


def test_resume_with_and_without_the_flag_continues_as_without_it(tree, tmp_path, capsys):
    """Sound: one update per epoch, two epochs. A checkpoint written with --half_student_weights holds fp32 weights
    and torch's AdamW state (the same keys, dtypes, shapes, strides and step counts as without the flag); resumed
    with or without the flag, the next update is the one the run without the flag takes from there (1e-4
    relative per tensor step), and resumed with it, bit for bit the uninterrupted run's."""
    common = ("--step", "fast", "--precision", "bf16", "--max_steps_per_epoch", "1")
    runs = {}
    for name, resume, extra in (("plain", None, ()), ("half", None, ("--half_student_weights",)),
                                ("plain_then_half", "plain", ("--half_student_weights",)),
                                ("half_then_plain", "half", ()), ("half_then_half", "half", ("--half_student_weights",))):
        argv = _argv(tree, tmp_path / name, *common, *extra, epochs=2)
        if resume:
            argv += ["--resume", os.path.join(runs[resume], "checkpoint-0.pth")]
        _cli(argv, capsys)
        runs[name] = only_run_dir(tmp_path / name)
    ck = {name: [read_checkpoint(os.path.join(r, f"checkpoint-{e}.pth")) if os.path.exists(
        os.path.join(r, f"checkpoint-{e}.pth")) else None for e in (0, 1)] for name, r in runs.items()}
    p0, h0 = ck["plain"][0], ck["half"][0]
    assert {k: v.dtype for k, v in h0["model"].items()} == {k: v.dtype for k, v in p0["model"].items()}
    sp, sh = p0["optimizer"], h0["optimizer"]
    assert sp["param_groups"] == sh["param_groups"] and sp["state"].keys() == sh["state"].keys()
    for k, entry in sp["state"].items():
        assert entry.keys() == sh["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, x in entry.items():
            y = sh["state"][k][key]
            assert (x.dtype, x.shape, x.stride(), x.device) == (y.dtype, y.shape, y.stride(), y.device), (k, key)
        assert entry["step"].item() == sh["state"][k]["step"].item() == 1
    assert _steps(ck["plain"][1], ck["plain_then_half"][1], p0["model"]) <= 1e-4
    assert _steps(ck["half_then_half"][1], ck["half_then_plain"][1], h0["model"]) <= 1e-4
    assert all(torch.equal(v, ck["half"][1]["model"][k]) for k, v in ck["half_then_half"][1]["model"].items())


def test_the_flag_with_accumulation_balanced_batches_a_tiny_clip_and_eval_every(tmp_path, capsys, monkeypatch):
    """Sound: --accum_iter 2 with 3 micro-steps an epoch (the epoch ends inside a window), --forget_per_batch, a clip
    that always clips, --eval_every, two epochs, --step auto (the fast step on the CPU): one update per epoch through
    the copies, nothing named idle, the window's gradients saved in fp32 on the student's own names."""
    data = make_class_tree(tmp_path / "train", ("cat", "dog", "bird"), 5, seed=3)
    pre = save_random_pretrained(tmp_path / "pre.pth")
    updates = _count_updates(monkeypatch)
    out = _cli(micro_unlearn_argv(data, pre, tmp_path / "out", "--precision", "bf16", "--step", "auto",
                                  "--half_student_weights", "--accum_iter", "2", "--forget_per_batch", "2",
                                  "--grad_clip", "1e-6", "--eval_every", "1", "--max_steps_per_epoch", "3",
                                  "--forget_alpha", "0.2", per_class=3, epochs=2), capsys)
    assert updates == [1, 1] and "has no effect" not in out and "is off for this run" not in out, out
    assert "eval epoch 1" in out
    ckpt = read_checkpoint(os.path.join(only_run_dir(tmp_path / "out"), "checkpoint-1.pth"))
    grads = ckpt["unlearn_fast"]["accumulated_grads"]
    assert "blocks.0.mlp.fc1.weight" in grads and all(g.dtype == torch.float32 for g in grads.values())


def test_the_python_api_follows_lr_weight_decay_and_a_freeze_between_updates(mae, batches):
    """Sound: build_setup(..., half_student_weights=True), a first update, then the lr and weight decay of each group
    changed, eps changed and a norm frozen: the second update within 1e-6 of the run without the knob that made the
    same changes (both start the second update from the first one's result of the run without the knob)."""
    plain, half = _setup(mae, half=False), _setup(mae)
    fast_step(plain, batches[0], IS_FORGET, 0)
    half.student.load_state_dict(plain.student.state_dict())
    half.optimizer.load_state_dict(copy.deepcopy(plain.optimizer.state_dict()))  # torch shares the tensors
    for s in (plain, half):
        for g, lr in zip(s.optimizer.param_groups, (3e-3, 5e-4)):
            g.update(lr=lr, weight_decay=0.1, eps=1e-6)
        s.student.blocks[0].norm1.weight.requires_grad_(False)
        fast_step(s, batches[1], IS_FORGET, 1)
    assert half.half_student is not None
    d = _distance(plain, half)
    assert d <= 1e-6, d
