"""A user switching from the official ``main_unlearn.py`` / ``main_baseline.py`` (REFERENCE.md §1.5-§1.7, §2): the
abbreviations its parser accepts, the launcher it documents (``python -m torch.distributed.launch``), and
checkpoints that the official ``misc.load_model`` can read back (optimizer over the whole model, an enabled
GradScaler's state), ``opt.yaml``'s resumed start epoch, and the per-iteration lr the log averages."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import unlearn_fast
from unlearn_fast.cli import unlearn_command
from unlearn_fast.cli.main import main
from unlearn_fast.cli.unlearn_args import build_parser

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

# 8 forget + 4 retain images, the retain list repeated up to the forget count (§4.1): 16, batch 4: 4 steps per epoch
STEPS, EPOCHS, WARMUP = 4, 2, 1


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("rt17")
    data = make_class_tree(base / "train", ("cat", "dog", "bird"), 4, seed=5)
    return data, save_random_pretrained(base / "pretrained.pth")


@pytest.fixture(scope="module")
def finished(tree, tmp_path_factory):
    """The run directory of an uninterrupted 2-epoch run (warmup 1, --blr 2e-4, --forget_alpha 0.2)."""
    out = tmp_path_factory.mktemp("rt17_run") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(micro_unlearn_argv(*tree, out, "--forget_alpha", "0.2", "--blr", "2e-4", epochs=EPOCHS,
                                       warmup=WARMUP)) == 0
    finally:
        torch.set_num_threads(threads)
    return only_run_dir(out)


# --- the official parser's abbreviations --------------------------------------------------------------------

@pytest.mark.parametrize("baseline,argv,dest,value", [
    (False, ["--forget", "0.2"], "forget_alpha", 0.2),  # was: ambiguous with --forget_per_batch / --forget_classes
    (False, ["--forget_=0.3"], "forget_alpha", 0.3),
    (False, ["--retain_", "0.5"], "retain_alpha", 0.5),  # was: ambiguous with --retain_classes
    (False, ["--st", "2"], "start_epoch", 2),  # was: ambiguous with --step
    (False, ["--e", "3"], "epochs", 3),  # was: ambiguous with --eval_every, --explicit_attention, ...
    (False, ["--se", "7"], "seed", 7),  # was: ambiguous with --serial_teacher
    (False, ["--no_p"], "pin_mem", False),  # was: ambiguous with --no_progress
    (True, ["--ba", "8"], "batch_size", 8),  # was: ambiguous with --baseline_weighting
    (False, ["--local-rank=2"], "local_rank", 2),  # torch.distributed.launch (torch >= 2.0) spells it so
    (False, ["--forget_c", "a,b"], "forget_classes", "a,b"),  # our own flags' unique prefixes still work
], ids=["forget", "forget_=", "retain_", "st", "e", "se", "no_p", "baseline_ba", "local-rank", "own_prefix"])
def test_prefixes_the_official_parser_accepts_mean_the_same_flag(baseline, argv, dest, value):
    extra = ["--loss_type", "encoder_noise"] if baseline else []
    assert getattr(build_parser(baseline=baseline).parse_args(extra + argv), dest) == value


@pytest.mark.parametrize("argv", [["--ma", "0.5"], ["--r", "1"]])
def test_prefixes_ambiguous_in_the_official_parser_stay_refused(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "ambiguous option" in capsys.readouterr().err


def test_model_abbreviation_naming_palette_is_routed_as_the_full_flag(tree, tmp_path, capsys):
    # '--mod palette' is '--model palette' to argparse: it must not reach the MAGE/MAE builder (was: a TypeError
    # traceback from create_model('palette', img_size=...))
    for argv in (["unlearn", "--mod", "palette"], ["unlearn", "--mode=palette"]):
        assert main(argv) == 2
        assert "-c/--config is required" in capsys.readouterr().err
    assert main(["baseline", "--mod", "palette_micro", "--loss_type", "encoder_noise"]) == 2
    assert "is a Palette (diffusion) model" in capsys.readouterr().err
    args = build_parser().parse_args(["--model", "palette"])
    with pytest.raises(ValueError, match="Palette"):
        unlearn_command.validate_args(args, baseline=False)


# --- the reference's launcher ----------------------------------------------------------------------------

def test_torch_distributed_launch_argument_before_the_command(tree, tmp_path):
    """``python -m torch.distributed.launch --nproc_per_node=N -m unlearn_fast unlearn ...`` (REFERENCE §1.6's
    launch) passes ``--local-rank=K`` before the script's own arguments, i.e. before the command."""
    out = tmp_path / "out"
    argv = micro_unlearn_argv(*tree, out, "--max_steps_per_epoch", "1")
    assert main(["--local-rank=0", *argv]) == 0  # was: "unknown command '--local-rank=0'"
    opt = json.loads(open(os.path.join(only_run_dir(out), "opt.yaml")).read())
    assert opt["local_rank"] == 0


# --- what the official misc.load_model reads back from our checkpoint ---------------------------------------

def _official_resume(path: str):
    """A plain restatement of the official resume (``misc.load_model`` after timm 0.3.2's ``add_weight_decay``):
    AdamW(0.9, 0.95) over every trainable parameter of a fresh model, no-decay group (1-D or ``.bias``) first,
    and an enabled GradScaler; loads model, optimizer and scaler. Returns (model, optimizer, scaler, start_epoch)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = unlearn_fast.create_model("mae_micro")
    model.load_state_dict(ckpt["model"])
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                            lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu")  # enabled, as the official trainer's on its GPU
    opt.load_state_dict(ckpt["optimizer"])  # was: "parameter group that doesn't match the size" (encoder only)
    scaler.load_state_dict(ckpt["scaler"])  # was: "The source state dict is empty" (disabled scaler on CPU/bf16)
    return model, opt, scaler, ckpt["epoch"] + 1


def test_official_loader_reads_our_checkpoint(finished):
    model, opt, scaler, start = _official_resume(os.path.join(finished, "checkpoint-0.pth"))
    assert start == 1 and scaler.get_scale() == 2.0 ** 16  # a fresh scaler's state: no loss scaling ran here
    names = {p: n for n, p in model.named_parameters()}
    with_state = {names[p] for p, s in opt.state.items() if s}
    encoder = {n for n in model.encoder_parameter_names() if dict(model.named_parameters())[n].requires_grad}
    assert with_state == encoder  # the decoder never got a gradient: no AdamW state, as in the official file
    for p, s in opt.state.items():  # each state sits on its own parameter (a shifted index would mis-shape)
        assert s["exp_avg"].shape == p.shape and s["exp_avg_sq"].shape == p.shape, names[p]
        assert float(s["step"]) == STEPS
    # the safetensors beside it hold the same trained weights
    from safetensors.torch import load_file
    trained = load_file(os.path.join(finished, "checkpoint-0.safetensors"))
    assert all(torch.equal(v, dict(model.named_parameters())[k].detach()) for k, v in trained.items())


def test_our_resume_of_a_whole_model_layout_checkpoint_is_exact(tree, finished, tmp_path):
    """The checkpoint's optimizer is saved in the official (whole-model) layout; continuing from it here must give
    the uninterrupted run's epoch 1, bit for bit."""
    out = tmp_path / "out"
    argv = micro_unlearn_argv(*tree, out, "--forget_alpha", "0.2", "--blr", "2e-4", epochs=EPOCHS, warmup=WARMUP)
    argv[argv.index("--resume") + 1] = os.path.join(finished, "checkpoint-0.pth")
    assert main(argv) == 0
    resumed = torch.load(os.path.join(only_run_dir(out), "checkpoint-1.pth"), weights_only=True)
    full = torch.load(os.path.join(finished, "checkpoint-1.pth"), weights_only=True)
    assert all(torch.equal(resumed["model"][k], v) for k, v in full["model"].items())
    assert resumed["optimizer"]["param_groups"] == full["optimizer"]["param_groups"]
    for k, s in full["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][k][n], t) for n, t in s.items()), k


# --- opt.yaml and the log, as the official run writes them -------------------------------------------------

def _resume_from_epoch_0(tree, finished, out, *extra, epochs=EPOCHS):
    argv = micro_unlearn_argv(*tree, out, "--max_steps_per_epoch", "1", *extra, epochs=epochs)
    argv[argv.index("--resume") + 1] = os.path.join(finished, "checkpoint-0.pth")
    return argv


def test_resumed_run_records_its_start_epoch(tree, finished, tmp_path, capsys):
    """The official ``misc.load_model`` sets ``args.start_epoch = epoch + 1`` before opt.yaml and the checkpoints'
    args are written (and ``init_distributed_mode`` adds ``distributed``)."""
    out = tmp_path / "out"
    assert main(_resume_from_epoch_0(tree, finished, out)) == 0
    run = only_run_dir(out)
    opt = json.loads(open(os.path.join(run, "opt.yaml")).read())
    assert opt["start_epoch"] == 1 and opt["distributed"] is False  # was: 0, and no 'distributed' key
    assert torch.load(os.path.join(run, "checkpoint-1.pth"), weights_only=True)["args"]["start_epoch"] == 1
    assert "--start_epoch" not in capsys.readouterr().out  # the default is no conflict


def test_start_epoch_overridden_by_the_checkpoint_is_named(tree, finished, tmp_path, capsys):
    """The official code drops such a --start_epoch silently; the run is the same, and says so."""
    out = tmp_path / "out"
    assert main(_resume_from_epoch_0(tree, finished, out, "--start_epoch", "2", epochs=3)) == 0
    said = capsys.readouterr().out
    assert "--start_epoch 2 is overridden" in said and "continues at epoch 1" in said, said
    assert [json.loads(x)["epoch"] for x in open(os.path.join(only_run_dir(out), "log.txt"))] == [1, 2]


def test_log_lr_is_the_mean_of_the_per_iteration_schedule(finished):
    """§1.5: lr = blr * eff_batch / 256, linear warmup then half-cosine per iteration at fractional epochs
    it/steps + epoch; log.txt's train_lr is the epoch's mean of the lr each step ran at."""
    peak = 2e-4 * 4 / 256
    lines = [json.loads(x) for x in open(os.path.join(finished, "log.txt"))]
    assert [list(x) for x in lines] == [["train_lr", "train_retain_l2_loss", "train_forget_l2_loss", "train_loss",
                                         "epoch"]] * EPOCHS

    def lr(e):
        if e < WARMUP:
            return peak * e / WARMUP
        return 0.5 * peak * (1 + math.cos(math.pi * (e - WARMUP) / (EPOCHS - WARMUP)))
    for epoch, line in enumerate(lines):
        want = sum(lr(it / STEPS + epoch) for it in range(STEPS)) / STEPS
        assert math.isclose(line["train_lr"], want, rel_tol=1e-12), (epoch, line["train_lr"], want)
        assert math.isclose(line["train_loss"], line["train_retain_l2_loss"] + 0.2 * line["train_forget_l2_loss"],
                            rel_tol=1e-5)
    opt = json.loads(open(os.path.join(finished, "opt.yaml")).read())
    assert math.isclose(opt["lr"], peak, rel_tol=1e-12) and opt["start_epoch"] == 0


def test_early_epochs_of_the_other_official_commit_is_accepted_and_unused():
    """main_unlearn.py at a50ce517 parses --early_epochs (default 6) and reads it nowhere: its command lines run
    here, and --e still means --epochs, as at the reference commit."""
    p = build_parser()
    args = p.parse_args(["--early_epochs", "6", "--e", "3"])
    assert args.early_epochs == 6 and args.epochs == 3
    assert build_parser(baseline=True).parse_args(["--loss_type", "learn_others", "--e", "2"]).epochs == 2
