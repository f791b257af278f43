"""The epoch loop and the run outputs (REFERENCE.md §1.2, §1.5, §1.7) on mae_micro with random data."""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import stat

import pytest
import torch

from tests.helpers import max_param_diff, running_as_root
from unlearn_fast.train import run_outputs
from unlearn_fast.train.checkpoint import load_checkpoint_file
from unlearn_fast.train.lr_schedule import lr_at, set_lr
from unlearn_fast.train.run_outputs import append_log_line, check_output_dir, run_dir_name, write_opt_yaml
from unlearn_fast.train.step_reference import NonFiniteLossError, reference_step
from unlearn_fast.train.trainer import resolve_step_mode, train_loop
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

LOG_KEYS = {"train_lr", "train_retain_l2_loss", "train_forget_l2_loss", "train_loss", "epoch"}
STEPS, BATCH, LR = 3, 4, 1e-3


def _data(epochs, steps=STEPS, batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([100.0, -100.0, 100.0, -100.0])[:batch]  # reference labels: forget < 100
    return {e: [(torch.rand(batch, 3, 32, 32, generator=g), labels.clone()) for _ in range(steps)]
            for e in range(epochs)}


@pytest.mark.parametrize("step_mode", ["fast", "reference"])
def test_two_epochs_write_log_and_checkpoints(make_mae_micro, tmp_path, step_mode):
    data = _data(2)
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    history = train_loop(setup, lambda e: iter(data[e]), STEPS, epochs=2, lr=LR, warmup_epochs=1,
                         output_dir=str(tmp_path), args_dict={"epochs": 2}, step_mode=step_mode, progress=False,
                         readback_every=2)
    lines = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert len(lines) == 2 and lines == history
    for e, line in enumerate(lines):
        assert set(line) == LOG_KEYS and line["epoch"] == e
        assert all(isinstance(v, (int, float)) for v in line.values())
    # per-iteration lr: epoch 0 is warmup 0, 1/3, 2/3 of LR; epoch 1 the half-cosine
    assert lines[0]["train_lr"] == pytest.approx(LR / 3, rel=1e-9)
    assert lines[1]["train_lr"] == pytest.approx(sum(lr_at(1 + i / STEPS, LR, 0.0, 1, 2) for i in range(STEPS)) / STEPS,
                                                 rel=1e-9)
    files = set(os.listdir(tmp_path))
    assert {"log.txt", "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-0.safetensors",
            "checkpoint-1.safetensors"} <= files
    assert not [f for f in files if f.startswith(".tmp")]
    ckpt = load_checkpoint_file(str(tmp_path / "checkpoint-1.pth"))
    assert ckpt["epoch"] == 1 and ckpt["args"] == {"epochs": 2}
    assert ckpt["unlearn_fast"]["next_epoch"] == 2 and ckpt["unlearn_fast"]["global_step"] == 2 * STEPS
    assert all(torch.equal(v, setup.student.state_dict()[k]) for k, v in ckpt["model"].items())


def test_loop_equals_a_hand_written_reference_loop(make_mae_micro):
    """The averages in log.txt and the final weights are those of: set lr per iteration -> reference_step."""
    data = _data(2)
    model = make_mae_micro()
    looped = build_setup(copy.deepcopy(model), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    manual = build_setup(copy.deepcopy(model), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    history = train_loop(looped, lambda e: iter(data[e]), STEPS, epochs=2, lr=LR, warmup_epochs=1,
                         step_mode="reference", progress=False)
    for epoch in range(2):
        sums = torch.zeros(3, dtype=torch.float64)
        for it, (images, labels) in enumerate(data[epoch]):
            set_lr(manual.optimizer, lr_at(it / STEPS + epoch, LR, 0.0, 1, 2))
            out = reference_step(manual, images, labels < 100, epoch * STEPS + it)
            sums += torch.stack(list(out)).double()
        expected = (sums / STEPS).tolist()
        got = [history[epoch][k] for k in ("train_loss", "train_retain_l2_loss", "train_forget_l2_loss")]
        assert got == pytest.approx(expected, rel=1e-6)
    assert max_param_diff(looped.student, manual.student) == 0.0
    assert max_param_diff(looped.student, model) > 0.0


def test_accumulation_steps_the_optimizer_every_accum_iter(make_mae_micro):
    data = _data(1, steps=4)
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5, accum_iter=2)
    train_loop(setup, lambda e: iter(data[e]), 4, epochs=1, lr=LR, step_mode="fast", progress=False)
    assert int(setup.optimizer.state[setup.trainable[0]]["step"]) == 2


def test_non_finite_loss_stops_the_run(make_mae_micro, tmp_path):
    data = _data(1)
    data[0][1][0][2] = float("nan")  # step 1, image 2: the batch noise statistics become NaN
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    with pytest.raises(NonFiniteLossError, match=r"non-finite within steps 0\.\.2 \(epoch 0\)"):
        train_loop(setup, lambda e: iter(data[e]), STEPS, epochs=1, lr=LR, step_mode="fast", progress=False,
                   output_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoint-0.pth")  # nothing written for the broken epoch


def test_no_batches_is_a_clear_error(make_mae_micro):
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32")
    with pytest.raises(ValueError, match="no full batch"):
        train_loop(setup, lambda e: iter([]), 0, epochs=1, lr=LR, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        train_loop(setup, lambda e: iter([]), 3, epochs=1, lr=LR, progress=False)


def test_resolve_step_mode(capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_step_mode("auto", cpu, None, 1, True) == "fast"
    assert resolve_step_mode("auto", cuda, None, 1, True) == "graphed"
    assert resolve_step_mode("auto", cuda, None, 2, True) == "fast"
    assert resolve_step_mode("graphed", cpu, None, 1, True) == "fast"
    assert "no CUDA device" in capsys.readouterr().out
    assert resolve_step_mode("graphed", cuda, None, 1, False) == "fast"
    assert "--forget_per_batch" in capsys.readouterr().out
    assert resolve_step_mode("fast", cuda, "encoder_noise", 1, True) == "reference"  # baselines: eager only
    assert resolve_step_mode("reference", cpu, None, 1, True) == "reference"
    with pytest.raises(ValueError, match="valid: auto, reference, fast, graphed"):
        resolve_step_mode("turbo", cpu, None, 1, True)


# ---- run outputs -----------------------------------------------------------------------------------------

def _args(**kw):
    base = dict(use_coco=False, opendata_to_forget_ratio=None, num_image_per_class=120, mask_ratio_mu=0.55,
                retain_alpha=1.0, forget_alpha=0.2, weight_decay=0.05, retainset_ratio=1.0, noise_type="normal",
                loss_type="max_full_model_loss")
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_dir_name_composes_the_reference_name(monkeypatch):
    monkeypatch.setattr(run_outputs.time, "strftime", lambda fmt: "20240503-101112")
    assert run_dir_name(_args()) == ("class_img1k__numimg_120_None_55_ra_1_fa_20_l2wd_0.05_dr_ratio_1.0_open_None"
                                     "_normal_20240503-101112")
    assert run_dir_name(_args(use_coco=True, opendata_to_forget_ratio=2.0, forget_alpha=0.25, noise_type="uniform")) \
        == "class_img1k_coco__numimg_120_2.0_55_ra_1_fa_25_l2wd_0.05_dr_ratio_1.0_open_2.0_uniform_20240503-101112"
    # baselines: no separator before the timestamp (as the reference)
    assert run_dir_name(_args(), baseline=True) == ("class_img1k__numimg_120_None_55_ra_1_fa_20_l2wd_0.05_dr_ratio_1.0"
                                                    "_open_None_baseline_max_full_model_loss20240503-101112")


def test_run_dir_name_real_timestamp():
    name = run_dir_name(_args())
    assert re.fullmatch(r"class_img1k__numimg_120_None_55_.*_normal_\d{8}-\d{6}", name)


def test_check_output_dir(tmp_path):
    target = tmp_path / "a" / "b"
    check_output_dir(str(target))  # creates nested folders
    assert target.is_dir() and os.listdir(target) == []  # the write probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create output directory"):
        check_output_dir(str(blocker / "sub"))


@pytest.mark.skipif(running_as_root(), reason="root ignores directory permissions, chmod cannot make it read-only")
def test_check_output_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_output_dir(str(ro))
    finally:
        ro.chmod(stat.S_IRWXU)


def test_opt_yaml_and_log_lines_append(tmp_path):
    write_opt_yaml(str(tmp_path), {"lr": None, "device": torch.device("cpu")})
    write_opt_yaml(str(tmp_path), {"epochs": 6})
    text = (tmp_path / "opt.yaml").read_text()
    assert text.count("{") == 2 and '"device": "cpu"' in text and '"lr": null' in text
    append_log_line(str(tmp_path), {"epoch": 0, "train_loss": 0.5})
    append_log_line(str(tmp_path), {"epoch": 1, "train_loss": 0.25})
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]


def test_log_line_keys_follow_the_reference_per_objective():
    from unlearn_fast.train.trainer import epoch_log_line
    for loss_type in (None, "encoder_noise", "learn_others"):
        assert list(epoch_log_line(loss_type, 1e-4, 3.0, 1.0, 2.0, 0)) == [
            "train_lr", "train_retain_l2_loss", "train_forget_l2_loss", "train_loss", "epoch"]
    for loss_type in ("max_full_model_loss", "full_model_noise"):
        line = epoch_log_line(loss_type, 1e-4, 3.0, 1.0, 2.0, 4)
        assert list(line) == ["train_lr", "train_loss", "train_retain_loss", "train_forget_loss", "epoch"]
        assert (line["train_retain_loss"], line["train_forget_loss"], line["train_loss"], line["epoch"]) == (1.0, 2.0,
                                                                                                          3.0, 4)


def test_every_epoch_trains_in_train_mode(make_mae_micro):
    """As the reference's train_one_epoch (``model.train(True)``): an epoch-end callback that leaves the student in
    eval() (dropout off) must not change how the next epoch trains."""
    data = _data(2)
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    seen = []
    real_forward = setup.student.forward_encoder_task

    def spy(*args, **kwargs):
        seen.append(setup.student.training)
        return real_forward(*args, **kwargs)
    setup.student.forward_encoder_task = spy
    train_loop(setup, lambda e: iter(data[e]), STEPS, epochs=2, lr=LR, step_mode="fast", progress=False,
               on_epoch_end=lambda *a, **k: setup.student.eval())
    assert seen == [True] * (2 * STEPS)
