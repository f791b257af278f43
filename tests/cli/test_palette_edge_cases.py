"""Edge cases of ``palette-unlearn`` / ``palette-test`` found by probing: wrongly typed config values, the
reference's debug mode and run names, bad images in DataLoader workers, unusable checkpoints and result
folders, mixed resume files. Each bad input gives one ValueError / CheckpointError naming the key or file,
and leaves no half-written run directory. palette_micro on a fake 32x32 Places-365 tree, in-process."""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.cli.palette_command import palette_test_main, palette_unlearn_main
from unlearn_fast.cli.palette_config import resolve_palette_job
from unlearn_fast.models import create_model
from unlearn_fast.models.palette import MICRO_SCHEDULE, MICRO_UNET, SCHEDULE_BUFFERS, save_palette_checkpoint
from unlearn_fast.train.checkpoint import CheckpointError
from unlearn_fast.train.palette_data import class_folder

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
CLASSES = [f"/{chr(97 + i % 26)}/c{i:03d}" for i in range(101)]


def _tree(root, per_class, corrupt=False):
    rng = np.random.default_rng(0)
    for split in ("train_256", "val_256"):
        for c in CLASSES:
            d = class_folder(str(root), split, c)
            os.makedirs(d)
            for k in range(per_class):
                path = os.path.join(d, f"{c.strip('/').replace('/', '_')}_{k}.jpg")
                if corrupt:
                    open(path, "wb").write(b"not an image")
                else:
                    Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    base = tmp_path_factory.mktemp("palette_edge")
    _tree(base / "places365", 2)
    _tree(base / "corrupt", 1, corrupt=True)
    (base / "class.txt").write_text("\n".join(CLASSES) + "\n")
    torch.manual_seed(0)
    save_palette_checkpoint(create_model("palette_micro"), base / "16_Network.pth")
    return dict(base=base, root=str(base / "places365"), corrupt=str(base / "corrupt"),
                class_list=str(base / "class.txt"), ckpt=str(base / "16_Network.pth"))


def _config(places, **edits):
    """The official config structure (keys the reference has but unlearn_fast ignores included)."""
    cfg = {
        "name": "inpainting_places2", "gpu_ids": [0], "seed": -1, "finetune_norm": False,
        "path": {"base_dir": "experiments", "code": "code", "tb_logger": "tb_logger", "results": "results",
                 "checkpoint": "checkpoint", "resume_state": None},
        "datasets": {
            "train": {"which_dataset": {"name": ["data.dataset", "ForgetInpaintDataset"],
                                        "args": {"data_root": places["root"], "number_img_per_class": 2,
                                                 "image_size": [32, 32], "mask_config": {"mask_mode": "hybrid"}}},
                      "dataloader": {"validation_split": 2, "args": {"batch_size": 4, "num_workers": 0,
                                                                     "shuffle": True, "drop_last": True}}},
            "test": {"which_dataset": {"name": "TestForgetInpaintDataset",
                                       "args": {"data_root": places["root"], "image_size": [32, 32],
                                                "mask_config": {"mask_mode": "center", "mask_ratio": 0.5}}},
                     "dataloader": {"args": {"batch_size": 2, "num_workers": 0}}}},
        "model": {"which_model": {"name": ["models.model", "Palette"],
                                  "args": {"sample_num": 2, "task": "inpainting",
                                           "ema_scheduler": {"ema_start": 1, "ema_iter": 1, "ema_decay": 0.9},
                                           "optimizers": [{"lr": 1e-3, "weight_decay": 0}]}},
                  "which_networks": [{"name": ["models.network", "Network"],
                                      "args": {"init_type": "kaiming", "module_name": "guided_diffusion",
                                               "unet": dict(MICRO_UNET),
                                               "beta_schedule": {"train": dict(MICRO_SCHEDULE),
                                                                 "test": dict(MICRO_SCHEDULE)}}}],
                  "which_losses": ["mse_loss"], "which_metrics": ["mae"]},
        "train": {"n_epoch": 1, "n_iter": 1e8, "val_epoch": 5, "save_checkpoint_epoch": 1, "log_iter": 1e3,
                  "tensorboard": True},
        "debug": {"val_epoch": 1, "save_checkpoint_epoch": 1, "log_iter": 10, "debug_split": 50},
    }
    cfg = copy.deepcopy(cfg)  # the edits must not reach the shared MICRO_* dicts
    for path, value in edits.items():  # "a.b.0.c" -> value
        *head, last = path.split(".")
        node = cfg
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return cfg


def _write(tmp_path, cfg, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def _argv(places, cfg_path, out, *extra, ckpt=None):
    return ["-c", cfg_path, "--ckpt", ckpt or places["ckpt"], "--class_list", places["class_list"],
            "--output_dir", str(out), "--device", "cpu", "--no_progress", *extra]


def _error(places, tmp_path, cfg, *flags, ckpt=None, exc=ValueError):
    """The one error of a bad input, after checking nothing was left under --output_dir."""
    out = tmp_path / "out"
    with pytest.raises(exc) as info:
        palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, *flags, ckpt=ckpt))
    assert not glob.glob(str(out / "*")), "a run directory was left behind"
    return str(info.value)


@pytest.mark.parametrize("key,value,expected", [
    ("model.which_networks.0.args.unet.channel_mults", "12", "unet.channel_mults must be a list of integers"),
    ("model.which_networks.0.args.unet.attn_res", 16, "unet.attn_res must be a list of integers"),
    ("model.which_networks.0.args.unet.inner_channel", "32", "unet.inner_channel must be an integer"),
    ("model.which_networks.0.args.unet.dropout", "0.2", "unet.dropout must be a number in [0, 1)"),
    ("model.which_networks.0.args.unet.use_scale_shift_norm", 1, "unet.use_scale_shift_norm must be true or false"),
    ("model.which_networks.0.args.unet.in_channel", 4, "in_channel must be 6 and out_channel 3"),
    ("model.which_networks.0.args.beta_schedule.train.n_timestep", "10",
     "beta_schedule.train.n_timestep must be an integer >= 2"),
    ("model.which_networks.0.args.beta_schedule.test.linear_end", 2, "beta_schedule.test.linear_end must be"),
    ("datasets.train.which_dataset.args.mask_config", "hybrid", "mask_config must be a JSON object"),
    ("train", 5, "train must be a JSON object"),
    ("seed", "3", "seed must be an integer"),
    ("seed", 1.5, "seed must be an integer"),
    ("name", "a/b", "name must be a non-empty string without path separators"),
])
def test_wrongly_typed_config_values_name_the_key(places, key, value, expected):
    with pytest.raises(ValueError) as info:
        resolve_palette_job(_config(places, **{key: value}), "train", source="cfg.json")
    assert expected in str(info.value) and str(info.value).startswith("cfg.json: ")


def test_wrong_unet_types_fail_before_anything_is_written(places, tmp_path):
    # before: a C++ overflow traceback from deep inside torch (channel_mults "12" iterated as "1", "2")
    msg = _error(places, tmp_path, _config(places, **{"model.which_networks.0.args.unet.channel_mults": "12"}),
                 "--fix_decoder", "1")
    assert "channel_mults" in msg and "frame #" not in msg
    # heads that do not divide the channels: the model's message, prefixed with the config key
    msg = _error(places, tmp_path, _config(places, **{"model.which_networks.0.args.unet.num_head_channels": 7}),
                 "--fix_decoder", "1")
    assert msg.startswith("model.which_networks[0].args") and "num_head_channels 7" in msg


def test_run_names_follow_the_reference_parser(places):
    """core/praser.py: debug_<name> with -d, finetune_<name> when finetune_norm, else <phase>_<name>; debug mode
    is switched on by the name, and its keys (log_iter, debug_split, ...) replace those of train."""
    assert resolve_palette_job(_config(places), "train").opt_name == "train_inpainting_places2"
    job = resolve_palette_job(_config(places), "train", debug=True)
    assert job.opt_name == "debug_inpainting_places2" and job.log_iter == 10 and job.debug_split == 50
    assert job.debug_subset_size(200) == 50 and job.debug_subset_size(30) == 30
    named = resolve_palette_job(_config(places, name="my_debug_run"), "train")
    assert named.opt_name == "train_my_debug_run" and named.debug_split == 50 and named.log_iter == 10
    fine = resolve_palette_job(_config(places, finetune_norm=True), "test")
    assert fine.opt_name == "finetune_inpainting_places2" and fine.debug_split is None
    frac = resolve_palette_job(_config(places, **{"debug.debug_split": 0.25}), "train", debug=True)
    assert frac.debug_subset_size(200) == 50
    with pytest.raises(ValueError, match="debug.debug_split must be"):
        resolve_palette_job(_config(places, **{"debug.debug_split": 0}), "train", debug=True)


def test_debug_mode_trains_on_the_first_debug_split_images(places, tmp_path, capsys):
    out = tmp_path / "out"
    assert palette_unlearn_main(_argv(places, _write(tmp_path, _config(places)), out, "-d", "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "1")) == 0
    (run,) = glob.glob(str(out / "*"))
    assert os.path.basename(run).startswith("debug_inpainting_places2_learn_others_0_fixdecoder_1_")
    info = json.load(open(os.path.join(run, "config.json")))["unlearn_fast"]
    # the list is retain then forget (as the reference's), so the first 50 are all retain
    assert info["images"] == 50 and info["forget_images"] == 0
    assert "no forget images" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_is_one_line_and_leaves_no_run_dir(places, tmp_path, workers):
    """Before: with DataLoader workers the message held the worker's whole traceback, and the run directory
    (config.json, train.log) stayed behind with no checkpoint in it."""
    cfg = _config(places, **{"datasets.train.which_dataset.args.data_root": places["corrupt"],
                             "datasets.train.which_dataset.args.number_img_per_class": 1,
                             "datasets.train.dataloader.args.num_workers": workers})
    msg = _error(places, tmp_path, cfg, "--fix_decoder", "1")
    assert msg.startswith("cannot read image ") and places["corrupt"] in msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1


def test_checkpoints_the_sampler_cannot_use(places, tmp_path):
    state = torch.load(places["ckpt"], weights_only=True)
    one_step = tmp_path / "one_step.pth"  # before: a RuntimeError from torch.randint in the first step
    torch.save({k: (v[:1] if k in SCHEDULE_BUFFERS else v) for k, v in state.items()}, one_step)
    assert "has 1 step(s)" in _error(places, tmp_path, _config(places), "--fix_decoder", "1", ckpt=str(one_step))
    empty = tmp_path / "empty.pth"  # before: advice to pass require_schedule=False (a Python argument)
    torch.save({}, empty)
    msg = _error(places, tmp_path, _config(places), "--fix_decoder", "1", ckpt=str(empty))
    assert "holds no noise-schedule buffers" in msg and "require_schedule" not in msg


def test_batch_larger_than_the_data_names_the_flag(places, tmp_path):
    msg = _error(places, tmp_path, _config(places), "--fix_decoder", "1", "-b", "201")
    assert "batch size 201 (-b or dataloader.args.batch_size)" in msg and "200 training images" in msg


def test_unsaved_epochs_are_announced(places, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _config(places, **{"train.n_epoch": 1, "train.save_checkpoint_epoch": 2})
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "1")) == 0
    assert "no checkpoint will be written" in capsys.readouterr().out
    (run,) = glob.glob(str(out / "*"))
    assert not os.listdir(os.path.join(run, "checkpoint"))  # as the reference: epoch % save_checkpoint_epoch


def test_palette_test_result_folder_that_cannot_exist(places, tmp_path):
    """The results go to <ckpt without .pth>/results/...; a --ckpt without .pth would put them under the file
    itself. Before: 'Not a directory' after the model was built, with no hint; now one error, nothing written."""
    ckpt = tmp_path / "weights"
    shutil.copy(places["ckpt"], ckpt)
    with pytest.raises(ValueError, match=r"cannot create the result folder .*weights/results/test/0/0\.50"):
        palette_test_main(["-c", _write(tmp_path, _config(places)), "--ckpt", str(ckpt), "--class_list",
                           places["class_list"], "--device", "cpu", "--no_progress", "--max_images", "1"])
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "weights"]


def test_palette_test_debug_mode_samples_the_first_debug_split_images(places, tmp_path):
    ckpt = tmp_path / "16_Network.pth"
    shutil.copy(places["ckpt"], ckpt)
    cfg = _config(places, **{"debug.debug_split": 3})
    assert palette_test_main(["-c", _write(tmp_path, cfg), "--ckpt", str(ckpt), "--class_list", places["class_list"],
                              "--device", "cpu", "--no_progress", "-d", "--steps", "1"]) == 0
    res = tmp_path / "16_Network" / "results" / "test" / "0" / "0.50"
    outs = sorted(f for f in os.listdir(res) if f.startswith("Out_"))
    # forget classes (lines 50..) come first in the test list, two images per class here
    assert outs == [f"Out_{CLASSES[i].strip('/').replace('/', '_')}_{k}.jpg" for i, k in ((50, 0), (50, 1), (51, 0))]


def test_resume_from_files_of_different_saves_is_refused(places, tmp_path):
    """An N.state holding another epoch than its name (files of two saves mixed) was resumed silently, with
    the weights of one epoch and the optimizer and epoch counter of another."""
    out = tmp_path / "first"
    cfg = _config(places, **{"train.n_epoch": 2})
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "1")) == 0
    (run,) = glob.glob(str(out / "*"))
    ck = os.path.join(run, "checkpoint")
    shutil.copy(os.path.join(ck, "2.state"), os.path.join(ck, "1.state"))
    cfg3 = _config(places, **{"train.n_epoch": 3})
    with pytest.raises(CheckpointError, match=r"1\.state holds epoch 2, but its name says epoch 1"):
        palette_unlearn_main(_argv(places, _write(tmp_path, cfg3, "c3.json"), tmp_path / "second", "--fix_decoder",
                                   "1", "--max_steps_per_epoch", "1", "--resume_state", os.path.join(ck, "1")))
    assert not (tmp_path / "second").exists()
    # the consistent files of epoch 2 still resume
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg3, "c3.json"), tmp_path / "third", "--fix_decoder",
                                      "1", "--max_steps_per_epoch", "1", "--resume_state",
                                      os.path.join(ck, "2"))) == 0


def test_official_config_shape_runs_unchanged(places, tmp_path):
    """Every key of the official config (including the ones unlearn_fast ignores) is accepted; n_epoch and
    log_iter as JSON floats (1e3) are fine, as in the reference's files."""
    cfg = _config(places, **{"train.n_epoch": 1.0})
    out = tmp_path / "out"
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "1", "-gpu", "0,1", "-P", "1234")) == 0
    (run,) = glob.glob(str(out / "*"))
    assert sorted(os.listdir(os.path.join(run, "checkpoint"))) == ["1.state", "1_Network.pth", "1_Network_ema.pth"]


@pytest.mark.parametrize("command", ["palette-unlearn", "palette-test"])
def test_palette_commands_refuse_a_torchrun_launch(monkeypatch, capsys, command):
    """Under torchrun each process would train alone into its own run folder: one clear refusal instead."""
    from unlearn_fast.cli.main import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([command, "-c", "does-not-matter.json"]) == 2
    assert "runs in one process" in capsys.readouterr().err
