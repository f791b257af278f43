"""What ``palette-unlearn`` and ``palette-test`` write, against what the reference's ``unlearn.py`` / ``run.py -p
test`` write (core/praser.py, core/logger.py, models/model.py; REFERENCE.md §3.4, §5.5): the run folder and the
config's path folders, config.json, train.log / test.log line formats, the test images and test/mae; and what
happens on a test that stops half-way, a result folder that already exists, a run folder of the same second,
bad path values in the config and SIGTERM during training. palette_micro on 32x32 images, in-process."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import time

import pytest
import torch

from tests.helpers import make_places_tree
from unlearn_fast.cli import palette_command
from unlearn_fast.cli.palette_command import palette_test_main, palette_unlearn_main
from unlearn_fast.cli.palette_config import resolve_palette_job
from unlearn_fast.models.palette import MICRO_SCHEDULE, MICRO_UNET, Network, load_palette_checkpoint
from unlearn_fast.models.palette_sampler import palette_restore
from unlearn_fast.train.palette_data import PaletteInpaintDataset, read_class_list, select_places365_test
from unlearn_fast.train.seeding import step_generator

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
CLASSES = [f"/{chr(97 + i % 26)}/k{i:03d}" for i in range(101)]
# "yy-mm-dd HH:MM:SS.mmm - INFO: message" (core/logger.py's formatter)
LOG_LINE = re.compile(r"\d\d-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} - INFO: (.*)")
REFERENCE_PATH = {"base_dir": "experiments", "code": "code", "tb_logger": "tb_logger", "results": "results",
                  "checkpoint": "checkpoint"}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    return make_places_tree(tmp_path_factory.mktemp("palette_outputs"), CLASSES, (("train_256", 1), ("val_256", 1)),
                            ext="jpg", size=(36, 40), seed=1, first=1)


def _config(places, path=None, train_batch=4, test_batch=3):
    return {
        "name": "inpainting_places2", "gpu_ids": [0, 1], "seed": -1, "finetune_norm": False,
        "path": dict(REFERENCE_PATH if path is None else path),
        "datasets": {
            "train": {"which_dataset": {"name": ["data.dataset", "ForgetInpaintDataset"],
                                        "args": {"data_root": places["root"], "number_img_per_class": 1,
                                                 "image_size": [32, 32], "mask_config": {"mask_mode": "hybrid"}}},
                      "dataloader": {"validation_split": 2, "args": {"batch_size": train_batch, "num_workers": 0}}},
            "test": {"which_dataset": {"name": "TestForgetInpaintDataset",
                                       "args": {"data_root": places["root"], "image_size": [32, 32],
                                                "mask_config": {"mask_mode": "center", "mask_ratio": 0.5}}},
                     "dataloader": {"args": {"batch_size": test_batch, "num_workers": 0}}}},
        "model": {"which_model": {"args": {"sample_num": 2, "ema_scheduler": {"ema_start": 1, "ema_iter": 1,
                                                                             "ema_decay": 0.9},
                                           "optimizers": [{"lr": 1e-3, "weight_decay": 0}]}},
                  "which_networks": [{"name": ["models.network", "Network"],
                                      "args": {"module_name": "guided_diffusion", "unet": dict(MICRO_UNET),
                                               "beta_schedule": {"train": dict(MICRO_SCHEDULE),
                                                                 "test": dict(MICRO_SCHEDULE)}}}]},
        "train": {"n_epoch": 1, "log_iter": 4, "save_checkpoint_epoch": 1, "tensorboard": True},
    }


def _write(tmp_path, cfg, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def _train_argv(places, cfg_path, out, *extra):
    return ["-c", cfg_path, "--ckpt", places["ckpt"], "--class_list", places["class_list"], "--output_dir", str(out),
            "--device", "cpu", "--no_progress", "--fix_decoder", "1", "--max_steps_per_epoch", "2", *extra]


def _test_argv(places, cfg_path, ckpt, *extra):
    return ["-c", cfg_path, "--ckpt", str(ckpt), "--class_list", places["class_list"], "--device", "cpu",
            "--no_progress", "--steps", "3", *extra]


def _log_messages(path):
    """The messages of a core/logger.py-format log; every non-empty line must have the format."""
    text = open(path).read()
    messages = []
    for line in text.splitlines():
        if line == "":  # the reference's 'Create the log file ...\n' message ends with a newline
            continue
        m = LOG_LINE.fullmatch(line)
        assert m, f"not a reference log line: {line!r}"
        messages.append(m.group(1))
    return messages


@pytest.fixture
def ckpt_copy(places, tmp_path):
    """A checkpoint file of its own (the test writes beside it)."""
    dst = tmp_path / "run" / "checkpoint" / "16_Network.pth"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(open(places["ckpt"], "rb").read())
    return dst


# ---- test phase: what run.py -p test writes in <ckpt without .pth>/ ------------------------------------------
def test_test_phase_writes_config_log_folders_and_images(places, tmp_path, ckpt_copy):
    cfg = _config(places)
    assert palette_test_main(_test_argv(places, _write(tmp_path, cfg), ckpt_copy, "--max_images", "4",
                                        "-b", "2")) == 0
    root = str(ckpt_copy)[:-len(".pth")]
    # the config's path folders (core/praser.py makes every key without resume/base/root), config.json, test.log
    assert sorted(os.listdir(root)) == ["checkpoint", "code", "config.json", "results", "tb_logger", "test.log"]
    written = json.load(open(os.path.join(root, "config.json")))
    # the config as core/praser.py saves it: -b applied, name test_<name>, then phase and distributed appended
    assert list(written)[:len(cfg)] == list(cfg)
    assert list(written)[len(cfg):len(cfg) + 2] == ["phase", "distributed"]
    assert written["name"] == "test_inpainting_places2" and written["phase"] == "test"
    assert written["datasets"]["test"]["dataloader"]["args"]["batch_size"] == 2
    assert written["datasets"]["train"] == cfg["datasets"]["train"] and written["model"] == cfg["model"]
    # results/test/{epoch 0}/{mask_ratio:.2f}/ with GT_, Process_, Out_, Mask_ of each image, nothing else
    result = os.path.join(root, "results", "test", "0", "0.50")
    assert os.listdir(os.path.join(root, "results", "test", "0")) == ["0.50"]  # no .partial left
    items = select_places365_test(places["root"], read_class_list(places["class_list"]), 100)[:4]
    names = [os.path.basename(p) for p, _ in items]
    assert sorted(os.listdir(result)) == sorted(f"{pre}{n}" for n in names for pre in ("GT_", "Process_", "Out_",
                                                                                       "Mask_"))
    msgs = _log_messages(os.path.join(root, "test.log"))
    assert msgs[:3] == [f"Create the log file in directory {root}.", "Dataset for test have 4 samples.",
                        "Begin model test."]
    assert re.fullmatch(r"test/mae: [0-9.e-]+\t", msgs[-3]) and msgs[-2:] == ["epoch: 0\t", "iters: 4\t"]


def test_test_mae_is_the_reference_metric(places, tmp_path, ckpt_copy):
    """test/mae = nn.L1Loss(gt, output) per batch, averaged over the batches (LogTracker with n=1)."""
    cfg = _config(places, test_batch=3)
    assert palette_test_main(_test_argv(places, _write(tmp_path, cfg), ckpt_copy, "--max_images", "5")) == 0
    logged = float(_log_messages(str(ckpt_copy)[:-4] + "/test.log")[-3].split(": ")[1])
    job = resolve_palette_job(cfg, "test")
    net = Network(job.unet, job.beta_schedule, phase="test", init_weights=False)
    load_palette_checkpoint(net, torch.load(str(ckpt_copy), weights_only=True), ignore_teacher_keys=True)
    net.eval()
    items = select_places365_test(places["root"], read_class_list(places["class_list"]), 100)[:5]
    ds = PaletteInpaintDataset(items, (32, 32), seed=0, mask_mode="center", mask_ratio=0.5)
    maes = []
    for i, lo in enumerate(range(0, 5, 3)):  # batches of 3 and 2
        rows = [ds[k][0] for k in range(lo, min(lo + 3, 5))]
        gt, mask, cond = (torch.stack([r[k] for r in rows]) for k in ("gt_image", "mask", "cond_image"))
        out, _ = palette_restore(net, cond, gt, mask, sample_num=2, generator=step_generator(0, 0, i, "noise", "cpu"),
                                 steps=3)
        maes.append((out - gt).abs().mean().item())
    assert logged == pytest.approx(sum(maes) / 2, rel=1e-5)
    assert logged != pytest.approx((maes[0] * 3 + maes[1] * 2) / 5, rel=1e-5)  # per batch, not per image


def test_test_results_go_under_the_configs_results_folder(places, tmp_path, ckpt_copy):
    cfg = _config(places, path={"base_dir": "experiments", "results": "res", "checkpoint": "checkpoint"})
    assert palette_test_main(_test_argv(places, _write(tmp_path, cfg), ckpt_copy, "--max_images", "1")) == 0
    root = str(ckpt_copy)[:-4]
    assert sorted(os.listdir(root)) == ["checkpoint", "config.json", "res", "test.log"]
    assert len(os.listdir(os.path.join(root, "res", "test", "0", "0.50"))) == 4


def test_interrupted_test_leaves_no_folder_that_looks_complete(places, tmp_path, ckpt_copy, monkeypatch):
    """Ctrl-C after the first batch: the images so far stay in 0.50.partial (named so), never in 0.50; the same
    command continues them (rt18: no longer refused until deleted); a finished folder is never overwritten."""
    cfg_path = _write(tmp_path, _config(places, test_batch=2))
    real = palette_command.write_restoration_images
    calls = []

    def stop_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(palette_command, "write_restoration_images", stop_on_second_batch)
    assert palette_test_main(_test_argv(places, cfg_path, ckpt_copy, "--max_images", "5")) == 130
    root = str(ckpt_copy)[:-4]
    epoch_dir = os.path.join(root, "results", "test", "0")
    assert os.listdir(epoch_dir) == ["0.50.partial"]
    images = [f for f in os.listdir(os.path.join(epoch_dir, "0.50.partial")) if not f.startswith(".")]
    assert len(images) == 8  # the first batch of 2
    msgs = _log_messages(os.path.join(root, "test.log"))
    assert "interrupted: 2 of 5 images" in msgs[-1] and not any(m.startswith("test/mae") for m in msgs)
    monkeypatch.setattr(palette_command, "write_restoration_images", real)
    assert palette_test_main(_test_argv(places, cfg_path, ckpt_copy, "--max_images", "5")) == 0
    assert os.listdir(epoch_dir) == ["0.50"] and len(os.listdir(os.path.join(epoch_dir, "0.50"))) == 20
    before = sorted(os.listdir(os.path.join(epoch_dir, "0.50")))
    with pytest.raises(ValueError, match=r"0\.50 already holds the results of an earlier palette-test"):
        palette_test_main(_test_argv(places, cfg_path, ckpt_copy, "--max_images", "2"))
    assert sorted(os.listdir(os.path.join(epoch_dir, "0.50"))) == before


# ---- train phase ---------------------------------------------------------------------------------------
def test_train_run_folder_and_log_format(places, tmp_path):
    out = tmp_path / "out"
    assert palette_unlearn_main(_train_argv(places, _write(tmp_path, _config(places)), out)) == 0
    (run,) = glob.glob(str(out / "*"))
    assert sorted(os.listdir(run)) == ["checkpoint", "code", "config.json", "results", "tb_logger", "train.log"]
    assert sorted(os.listdir(os.path.join(run, "checkpoint"))) == ["1.state", "1_Network.pth", "1_Network_ema.pth"]
    msgs = _log_messages(os.path.join(run, "train.log"))
    assert msgs[:4] == [f"Create the log file in directory {run}.", "Dataset for train have 100 samples.",
                        "Dataset for val have 0 samples.", "Begin model train."]
    # log_iter 4 at batch 4: a train/mse_loss line after every step, then the epoch's lines (core/base_model.py)
    assert [m.split(":")[0] for m in msgs[4:]] == ["train/mse_loss"] * 3 + ["epoch", "iters"] + [
        "Saving the self at the end of epoch 1", "Number of Epochs has reached the limit, End."]
    assert msgs[-4:-2] == ["epoch: 1\t", "iters: 8\t"]


def test_run_started_in_the_same_second_takes_the_next_seconds_name(places, tmp_path, monkeypatch):
    """The reference would share one folder; the README says a second run takes the next second's name."""
    out = tmp_path / "out"
    real = palette_command.palette_run_dir_name
    stamps = iter(["260101_000000", "260101_000001"])
    stamp = [next(stamps)]

    def named(*a):  # the first call names a folder that is taken; later calls: the next second
        name = real(*a, stamp=stamp[0])
        stamp[0] = next(stamps, stamp[0])
        return name

    taken = out / real("train_inpainting_places2", 0, 1, 0.1, 0, 0, stamp="260101_000000")
    taken.mkdir(parents=True)
    (taken / "config.json").write_text("{}")
    monkeypatch.setattr(palette_command, "palette_run_dir_name", named)
    assert palette_unlearn_main(_train_argv(places, _write(tmp_path, _config(places)), out)) == 0
    assert os.listdir(taken) == ["config.json"]
    (run,) = [p for p in glob.glob(str(out / "*")) if p != str(taken)]
    assert run.endswith("_260101_000001_min_loss_learn_noise_0")
    assert "1_Network.pth" in os.listdir(os.path.join(run, "checkpoint"))


@pytest.mark.parametrize("key, value", [("checkpoint", 5), ("checkpoint", ""), ("checkpoint", "/abs/ckpt"),
                                        ("checkpoint", "../shared"), ("code", "a/../.."), ("results", ["r"]),
                                        ("tb_logger", "  ")])
def test_bad_path_values_name_the_key_before_anything_is_written(places, tmp_path, key, value):
    cfg = _config(places)
    cfg["path"][key] = value
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"path\.{key} must be a folder name inside the run directory"):
        palette_unlearn_main(_train_argv(places, _write(tmp_path, cfg), out))
    assert not out.exists()


def test_path_must_be_an_object_and_base_dir_a_string(places, tmp_path):
    cfg = _config(places)
    cfg["path"] = ["experiments"]
    with pytest.raises(ValueError, match=r"path must be a JSON object"):
        resolve_palette_job(cfg, "train")
    cfg["path"] = {"base_dir": 7}
    with pytest.raises(ValueError, match=r"path\.base_dir must be a non-empty string"):
        resolve_palette_job(cfg, "train")
    cfg["path"] = {"base_dir": "e", "resume_state": None, "data_root": "/x", "checkpoint": "c/k"}
    assert resolve_palette_job(cfg, "train").folders == {"checkpoint": "c/k", "results": "results"}


def test_sigterm_before_the_first_checkpoint_removes_the_run_folder(places, tmp_path, monkeypatch):
    """SIGTERM used to kill the run on the spot, leaving a folder with config.json and no checkpoint."""
    out = tmp_path / "out"

    class Terminated(Exception):
        pass

    def default(signum, frame):  # stands for the default action (without killing pytest)
        raise Terminated

    def loop_then_sigterm(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM was not delivered")

    before = signal.signal(signal.SIGTERM, default)
    try:
        monkeypatch.setattr(palette_command, "palette_train_loop", loop_then_sigterm)
        with pytest.raises(KeyboardInterrupt) as info:
            palette_unlearn_main(_train_argv(places, _write(tmp_path, _config(places)), out))
        assert getattr(info.value, "signum", None) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is default  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, before)
    assert os.listdir(out) == []


@pytest.mark.parametrize("ratio", [1.5, 0, -0.5, True, "0.5"])
def test_test_mask_ratio_out_of_range_names_the_key(places, ratio):
    cfg = _config(places)
    cfg["datasets"]["test"]["which_dataset"]["args"]["mask_config"]["mask_ratio"] = ratio
    with pytest.raises(ValueError, match=r"datasets\.test\.which_dataset\.args\.mask_config\.mask_ratio must be a "
                                         r"number in \(0, 1\]"):
        resolve_palette_job(cfg, "test")
