"""``palette-unlearn`` / ``palette-test`` end to end on palette_micro and a fake Places-365 tree (32x32 images),
called in-process: the reference layout and keys, exactly n_epoch epochs, what each approach trains, the EMA,
the open/proxy variant, the test images; and one clear error per bad input, before anything is written."""
from __future__ import annotations

import copy
import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_places_tree
from unlearn_fast.cli.palette_command import palette_test_main, palette_unlearn_main
from unlearn_fast.models.palette import MICRO_SCHEDULE, MICRO_UNET, SCHEDULE_BUFFERS

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
CLASSES = [f"/{chr(97 + i % 26)}/k{i:03d}" + ("/in" if i % 11 == 0 else "") for i in range(102)]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    return make_places_tree(tmp_path_factory.mktemp("palette_cli"), CLASSES)


def _config(places, **edits):
    cfg = {
        "name": "inpainting_places2", "seed": -1,
        "path": {"base_dir": "experiments", "checkpoint": "checkpoint"},
        "datasets": {
            "train": {"which_dataset": {"name": ["data.dataset", "ForgetInpaintDataset"],
                                        "args": {"data_root": places["root"], "number_img_per_class": 2,
                                                 "image_size": [32, 32], "mask_config": {"mask_mode": "hybrid"}}},
                      "dataloader": {"validation_split": 2, "args": {"batch_size": 4, "num_workers": 0}}},
            "test": {"which_dataset": {"name": "TestForgetInpaintDataset",
                                       "args": {"data_root": places["root"], "image_size": [32, 32],
                                                "mask_config": {"mask_mode": "center", "mask_ratio": 0.5}}},
                     "dataloader": {"args": {"batch_size": 3, "num_workers": 0}}}},
        "model": {"which_model": {"args": {"sample_num": 2, "ema_scheduler": {"ema_start": 1, "ema_iter": 1,
                                                                             "ema_decay": 0.9},
                                           "optimizers": [{"lr": 1e-3, "weight_decay": 0}]}},
                  "which_networks": [{"name": ["models.network", "Network"],
                                      "args": {"module_name": "guided_diffusion", "unet": MICRO_UNET,
                                               "beta_schedule": {"train": MICRO_SCHEDULE, "test": MICRO_SCHEDULE}}}]},
        "train": {"n_epoch": 2, "log_iter": 8, "save_checkpoint_epoch": 1},
    }
    for path, value in edits.items():  # "a.b.c" -> value; None deletes
        *head, last = path.split(".")
        node = cfg
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return cfg


def _write(tmp_path, cfg, name="cfg.json"):
    # // comments, as the reference's configs have them
    text = "// a Palette config\n" + json.dumps(cfg, indent=2).replace("{", "{ // experiment", 1)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _argv(places, cfg_path, out, *extra):
    return ["-c", cfg_path, "--ckpt", places["ckpt"], "--class_list", places["class_list"], "--output_dir", str(out),
            "--device", "cpu", "--no_progress", *extra]


def _only_run(out):
    (run,) = glob.glob(os.path.join(str(out), "*"))
    return run


def _split(state):
    enc = ("denoise_fn.cond_embed.", "denoise_fn.input_blocks.", "denoise_fn.middle_block.")
    return ({k for k in state if k.startswith(enc)},
            {k for k in state if k.startswith("denoise_fn.") and not k.startswith(enc)})


def test_ours_end_to_end(places, tmp_path):
    out = tmp_path / "out"
    rc = palette_unlearn_main(_argv(places, _write(tmp_path, _config(places)), out, "-p", "train", "--fix_decoder", "1",
                                    "--forget_alpha", "0.1", "--max_steps_per_epoch", "2", "--readback_every", "1"))
    assert rc == 0
    run = _only_run(out)
    assert re.fullmatch(r"train_inpainting_places2_learn_others_0_fixdecoder_1_falpha_0\.1_\d{6}_\d{6}_min_loss"
                        r"_learn_noise_0", os.path.basename(run))
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["name"] == "train_inpainting_places2" and cfg["unlearn_fast"]["approach"] == "ours"
    assert cfg["unlearn_fast"]["images"] == 200 and cfg["unlearn_fast"]["forget_images"] == 100
    ckpt_dir = os.path.join(run, "checkpoint")
    assert sorted(os.listdir(ckpt_dir)) == ["1.state", "1_Network.pth", "1_Network_ema.pth",
                                            "2.state", "2_Network.pth", "2_Network_ema.pth"]  # exactly 2 epochs
    log = open(os.path.join(run, "train.log")).read()
    assert re.findall(r"INFO: epoch: (\d+)\t", log) == ["1", "2"] and "train/mse_loss: " in log
    assert re.findall(r"INFO: iters: (\d+)\t", log) == ["8", "16"]

    pre = torch.load(places["ckpt"], weights_only=True)
    net = torch.load(os.path.join(ckpt_dir, "2_Network.pth"), weights_only=True)
    teacher = [k for k in net if k.startswith("teacher_denoise_fn.")]
    assert list(net)[:6] == list(SCHEDULE_BUFFERS) and list(net)[6:len(pre)] == list(pre)[6:]  # reference order
    assert len(teacher) == len(pre) - 6
    assert all(torch.equal(net[k], pre[k.replace("teacher_", "")]) for k in teacher)  # teacher = model before
    enc, dec = _split(pre)
    assert all(torch.equal(net[k], pre[k]) for k in dec)  # the decoder is untouched
    changed = {k for k in enc if not torch.equal(net[k], pre[k])}
    assert len(changed) > len(enc) // 2
    ema = torch.load(os.path.join(ckpt_dir, "2_Network_ema.pth"), weights_only=True)
    assert set(ema) == enc | dec
    assert all(torch.equal(ema[k], pre[k]) for k in dec)
    w = "denoise_fn.input_blocks.0.0.weight"  # EMA moved towards the student but is not it (decay 0.9)
    assert not torch.equal(ema[w], pre[w]) and not torch.equal(ema[w], net[w])
    assert (ema[w] - pre[w]).abs().max() < (net[w] - pre[w]).abs().max()
    state = torch.load(os.path.join(ckpt_dir, "2.state"), weights_only=True)
    assert state["epoch"] == 2 and state["iter"] == 16 and state["schedulers"] == []
    assert len(state["optimizers"][0]["param_groups"][0]["params"]) == len(pre) - 6

    # palette-test on that checkpoint: reference names, known region kept
    ck = os.path.join(ckpt_dir, "2_Network.pth")
    assert palette_test_main(["-c", _write(tmp_path, _config(places), "t.json"), "--ckpt", ck, "--class_list",
                              places["class_list"], "--device", "cpu", "--no_progress", "--max_images", "4"]) == 0
    res = os.path.join(ck[:-len(".pth")], "results", "test", "0", "0.50")
    files = sorted(os.listdir(res))
    first = f"{CLASSES[50].strip('/').replace('/', '_')}_Places365_val_00000000.png"  # forget rows first
    assert len(files) == 16 and {f"{p}_{first}" for p in ("GT", "Process", "Out", "Mask")} <= set(files)
    gt = np.asarray(Image.open(os.path.join(res, f"GT_{first}")), dtype=np.int16)
    outp = np.asarray(Image.open(os.path.join(res, f"Out_{first}")), dtype=np.int16)
    hole = np.zeros((32, 32), bool)
    hole[8:24, 8:24] = True
    assert np.array_equal(gt[~hole], outp[~hole]) and not np.array_equal(gt[hole], outp[hole])
    # the EMA file (denoise_fn.* only) samples with the config's test schedule
    ema_ck = os.path.join(ckpt_dir, "2_Network_ema.pth")
    assert palette_test_main(["-c", _write(tmp_path, _config(places), "t.json"), "--ckpt", ema_ck, "--class_list",
                              places["class_list"], "--device", "cpu", "--no_progress", "--max_images", "1"]) == 0
    assert len(os.listdir(os.path.join(ema_ck[:-len(".pth")], "results", "test", "0", "0.50"))) == 4


@pytest.mark.parametrize("flags,teacher", [(["--max_loss", "1"], False), (["--learn_others", "1"], True)])
def test_full_model_baselines_train_the_whole_unet(places, tmp_path, flags, teacher):
    out = tmp_path / "out"
    cfg = _config(places, **{"train.n_epoch": 1})
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--max_steps_per_epoch", "1", *flags)) == 0
    run = _only_run(out)
    assert ("_max_loss_" in run) == (flags[0] == "--max_loss")
    net = torch.load(os.path.join(run, "checkpoint", "1_Network.pth"), weights_only=True)
    assert any(k.startswith("teacher_denoise_fn.") for k in net) == teacher
    pre = torch.load(places["ckpt"], weights_only=True)
    enc, dec = _split(pre)
    assert any(not torch.equal(net[k], pre[k]) for k in dec) and any(not torch.equal(net[k], pre[k]) for k in enc)


def test_open_proxy_variant_from_the_config(places, tmp_path):
    out = tmp_path / "out"
    cfg = _config(places, **{"name": "inpainting_places2_unlearn_open", "train.n_epoch": 1,
                             "datasets.train.which_dataset.name": ["data.dataset", "OpenForgetInpaintDataset"]})
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "1", "--step", "reference")) == 0
    run = _only_run(out)
    assert os.path.basename(run).startswith("train_inpainting_places2_unlearn_open_learn_others_0_fixdecoder_1_")
    info = json.load(open(os.path.join(run, "config.json")))["unlearn_fast"]
    assert info["images"] == 2 * 2 + 50 * 2 and info["forget_images"] == 100  # 2 proxy classes x 2 + 50 x 2


def _error(places, tmp_path, cfg, *flags, main=palette_unlearn_main):
    out = tmp_path / "never"
    with pytest.raises(ValueError) as info:
        main(_argv(places, _write(tmp_path, cfg), out, *flags))
    assert not out.exists()  # nothing half-written
    return str(info.value)


def test_bad_inputs_give_one_clear_error(places, tmp_path):
    ok = ["--fix_decoder", "1"]
    assert "missing key train.n_epoch" in _error(places, tmp_path, _config(places, **{"train.n_epoch": None}), *ok)
    assert "missing key model.which_networks.0.args.unet" in _error(
        places, tmp_path, _config(places, **{"model.which_networks.0.args.unet": None}), *ok)
    assert "batch_size (or pass -b)" in _error(
        places, tmp_path, _config(places, **{"datasets.train.dataloader.args.batch_size": None}), *ok)
    assert "does not exist" in _error(places, tmp_path, _config(places), *ok, "--data_root", str(tmp_path / "none"))
    assert "unsupported flag combination" in _error(places, tmp_path, _config(places), "--fix_decoder", "1",
                                                    "--max_loss", "1")
    assert "--learn_noise must be 0 or 1" in _error(places, tmp_path, _config(places), "--learn_noise", "2")
    assert "mask_mode 'bbox'" in _error(places, tmp_path, _config(
        places, **{"datasets.train.which_dataset.args.mask_config": {"mask_mode": "bbox"}}), *ok)
    assert "supports ForgetInpaintDataset" in _error(places, tmp_path, _config(
        places, **{"datasets.train.which_dataset.name": "InpaintDataset"}), *ok)
    assert "larger than the data" in _error(places, tmp_path, _config(places), *ok, "-b", "1000")
    msg = _error(places, tmp_path, _config(places), *ok, "--ckpt", str(tmp_path / "missing.pth"))
    assert "--ckpt not found" in msg
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(places["ckpt"], "rb").read()[:1000])
    assert "cannot read checkpoint" in _error(places, tmp_path, _config(places), *ok, "--ckpt", str(truncated))
    no_schedule = tmp_path / "ema_only.pth"
    torch.save({k: v for k, v in torch.load(places["ckpt"], weights_only=True).items()
                if k.startswith("denoise_fn.")}, no_schedule)
    assert "no noise-schedule buffers" in _error(places, tmp_path, _config(places), *ok, "--ckpt", str(no_schedule))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"name": "x",, }')
    with pytest.raises(ValueError, match="not valid JSON"):
        palette_unlearn_main(["-c", str(bad_json), "--fix_decoder", "1"])
    with pytest.raises(ValueError, match="config file not found"):
        palette_unlearn_main(["-c", str(tmp_path / "nope.json")])
    with pytest.raises(ValueError, match="no class list found"):
        palette_unlearn_main(["-c", _write(tmp_path, _config(places)), "--ckpt", places["ckpt"], "--fix_decoder",
                              "1", "--device", "cpu"])
    # a checkpoint of another model size: the loader names the mismatch
    wrong = copy.deepcopy(_config(places))
    wrong["model"]["which_networks"][0]["args"]["unet"] = dict(MICRO_UNET, inner_channel=64)
    assert "does not match the model" in _error(places, tmp_path, wrong, *ok)
    # palette-test wants the test dataset
    assert "TestForgetInpaintDataset" in _error(places, tmp_path, _config(
        places, **{"datasets.test.which_dataset.name": "ForgetInpaintDataset"}), main=palette_test_main)
    with pytest.raises(SystemExit):  # an unknown flag: argparse's usage error
        palette_unlearn_main(["--no_such_flag"])


def test_unlearn_with_model_palette_is_the_palette_command(places, tmp_path):
    """`unlearn-fast unlearn --model palette ...` runs palette-unlearn with the remaining flags."""
    from unlearn_fast.cli.main import main
    out = tmp_path / "out"
    argv = _argv(places, _write(tmp_path, _config(places)), out, "-p", "train", "--fix_decoder", "1",
                 "--max_steps_per_epoch", "1")
    assert main(["unlearn", "--model", "palette", *argv]) == 0
    run = _only_run(out)
    assert sorted(os.listdir(os.path.join(run, "checkpoint")))[:3] == ["1.state", "1_Network.pth", "1_Network_ema.pth"]
    with pytest.raises(SystemExit) as e:  # palette-unlearn's own argparse usage error
        main(["unlearn", "--model=palette", "--no_such_flag"])
    assert e.value.code == 2
