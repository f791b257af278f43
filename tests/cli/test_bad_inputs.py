"""Bad input, everywhere: each case is one clear error naming the file or flag, a non-zero exit code, no
traceback, and nothing half-written in --output_dir (a failure discovered during epoch 0, before the first
checkpoint, removes the run directory it had created)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import unlearn_fast
import unlearn_fast.train.image_datasets as image_datasets
from unlearn_fast.cli.main import main

from tests.helpers import assert_cli_fails_cleanly

pytestmark = pytest.mark.usefixtures("single_thread")

N_IMG = 4  # per class; 8 forget + 8 retain rows, batch 4: every file is read in epoch 0


def _png(path, rng):
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A clean tree, a pretrained checkpoint and a finished 1-epoch run (its checkpoint-0.pth)."""
    root = tmp_path_factory.mktemp("bad_inputs") / "train"
    rng = np.random.default_rng(3)
    for c in ("cat", "dog", "bird"):
        (root / c).mkdir(parents=True)
        for i in range(N_IMG):
            _png(root / c / f"{i}.png", rng)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    ckpts = tmp_path_factory.mktemp("bad_inputs_ckpt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save({"model": unlearn_fast.create_model("mae_micro").state_dict()}, ckpts / "pretrained.pth")
    return str(root), str(ckpts / "pretrained.pth")


def _args(data, out, *extra):
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", data, "--forget_classes", "cat,dog",
            "--retain_classes", "bird", "--num_image_per_class", str(N_IMG), "--batch_size", "4", "--epochs", "1",
            "--num_workers", "0", "--output_dir", str(out), "--no_progress", "--device", "cpu", *extra]


_fails_cleanly = assert_cli_fails_cleanly


@pytest.fixture
def tree_with(good, tmp_path):
    """A copy of the clean tree with one file replaced: ``tree_with(content_bytes) -> (root, bad_path)``."""
    def make(content: bytes):
        root = tmp_path / "train"
        for c in ("cat", "dog", "bird"):
            (root / c).mkdir(parents=True)
            for i in range(N_IMG):
                (root / c / f"{i}.png").write_bytes(open(os.path.join(good[0], c, f"{i}.png"), "rb").read())
        bad = root / "dog" / "2.png"
        bad.write_bytes(content)
        return str(root), str(bad)
    return make


def _truncated_png(good):
    data = open(os.path.join(good[0], "cat", "0.png"), "rb").read()
    return data[: len(data) // 2]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_found_in_epoch_0_names_the_file(good, tree_with, tmp_path, capsys, workers, kind):
    root, bad = tree_with(b"this is not a png" if kind == "garbage" else _truncated_png(good))
    out = tmp_path / "out"
    err = _fails_cleanly(_args(root, out, "--resume", good[1], "--num_workers", str(workers)), out, capsys,
                         f"cannot read image {bad}")
    assert "DataLoader worker" not in err  # the worker's traceback is stripped


def test_corrupt_image_with_verify_images_fails_before_the_run_dir(good, tree_with, tmp_path, capsys):
    root, bad = tree_with(b"GIF89a broken")
    out = tmp_path / "out"
    _fails_cleanly(_args(root, out, "--resume", good[1], "--verify_images"), out, capsys, "1 of 12 images", bad)


def test_unreadable_image_names_the_file(good, tree_with, tmp_path, capsys, monkeypatch):
    """No read permission (simulated: a root-run test cannot chmod a file unreadable). Workers fork, so they
    see the patch too."""
    root, bad = tree_with(open(os.path.join(good[0], "cat", "1.png"), "rb").read())
    real_open = image_datasets.Image.open

    def guarded(path, *a, **k):
        if str(path) == bad:
            raise PermissionError(13, "Permission denied", bad)
        return real_open(path, *a, **k)
    monkeypatch.setattr(image_datasets.Image, "open", guarded)
    out = tmp_path / "out"
    _fails_cleanly(_args(root, out, "--resume", good[1], "--num_workers", "2"), out, capsys,
                   f"cannot read image {bad}", "Permission denied")


@pytest.mark.parametrize("flags,needles", [
    (["--forget_classes", "cat,empty"], ["empty", "has no images"]),           # an empty class folder
    (["--retain_classes", "zebra"], ["class folder(s) not found", "zebra"]),   # named but absent
    (["--forget_classes", "cat,bird"], ["both in forget and retain", "bird"]),
    (["--data_path", "/nonexistent/train"], ["/nonexistent/train"]),
    (["--proxy_path", "/some/coco"], ["--proxy_path is read only with --use_coco"]),  # was silently ignored
    (["--input_size", "34"], ["--input_size 34", "not a multiple of patch_size 4"]),  # named the model's argument
])
def test_bad_class_selection(good, tmp_path, capsys, flags, needles):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", good[1], *flags), out, capsys, *needles)


def test_data_path_that_is_a_file(good, tmp_path, capsys):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[1], out), out, capsys, good[1], "not a folder")


@pytest.mark.parametrize("which", ["--resume", "--teacher"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_unreadable_checkpoint_names_the_file(good, tmp_path, capsys, which, kind):
    data = open(good[1], "rb").read()
    path = tmp_path / f"{kind}.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"model weights go here\n"}[kind])
    extra = [which, str(path)] + (["--resume", good[1]] if which == "--teacher" else [])
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, *extra), out, capsys, f"cannot read checkpoint {str(path)!r}")


@pytest.mark.parametrize("which", ["--resume", "--teacher"])
def test_checkpoint_of_another_architecture(good, tmp_path, capsys, which):
    path = tmp_path / "wide.pth"
    torch.save({"model": unlearn_fast.create_model("mae_micro", embed_dim=64).state_dict()}, path)
    extra = [which, str(path)] + (["--resume", good[1]] if which == "--teacher" else [])
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, *extra), out, capsys, str(path), "does not fit", "shape mismatches")


def test_checkpoint_without_weights(good, tmp_path, capsys):
    path = tmp_path / "opt_only.pth"
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, path)
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", str(path)), out, capsys, str(path), "no model state dict")


@pytest.mark.parametrize("flag,value,needle", [
    ("--batch_size", "0", "--batch_size"),
    ("--batch_size", "-3", "--batch_size"),
    ("--epochs", "0", "--epochs"),
    ("--accum_iter", "0", "--accum_iter"),
    ("--start_epoch", "1", "--start_epoch"),
    ("--input_size", "4", "--input_size"),
    ("--lr", "-1", "--lr"),
    ("--blr", "0", "--blr"),
    ("--min_lr", "-0.000001", "--min_lr"),
    ("--warmup_epochs", "-1", "--warmup_epochs"),
    ("--weight_decay", "-0.1", "--weight_decay"),
    ("--forget_alpha", "-1", "--forget_alpha"),
    ("--grad_clip", "0", "--grad_clip"),
    ("--num_image_per_class", "0", "--num_image_per_class"),
    ("--retainset_ratio", "-1", "--retainset_ratio"),
    ("--num_workers", "-1", "--num_workers"),
    ("--mask_ratio", "1.0", "--mask_ratio"),
    ("--readback_every", "0", "--readback_every"),
    ("--max_steps_per_epoch", "0", "--max_steps_per_epoch"),
    ("--save_every_steps", "0", "--save_every_steps"),
    ("--forget_per_batch", "5", "--forget_per_batch"),
    ("--device", "tpu:7", "--device"),
    ("--model", "mae_gigantic", "unknown --model"),
    ("--noise_type", "pink", "unknown --noise_type"),
])
def test_flag_out_of_range(good, tmp_path, capsys, flag, value, needle):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, flag, value), out, capsys, needle)


def test_save_every_steps_must_follow_accumulation(good, tmp_path, capsys):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--accum_iter", "2", "--save_every_steps", "3"), out, capsys,
                   "--save_every_steps (3) must be a multiple of --accum_iter (2)")


@pytest.mark.parametrize("flags", [["--batch_size", "17"], ["--batch_size", "12", "--forget_per_batch", "9"]])
def test_batch_larger_than_the_data(good, tmp_path, capsys, flags):
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", good[1], *flags), out, capsys, "a batch larger than the data")


def test_resume_mid_epoch_with_other_batching_is_refused(good, tmp_path, capsys):
    """A mid-epoch position only means something with the same steps per epoch."""
    run_out = tmp_path / "first"
    assert main(_args(good[0], run_out, "--resume", good[1])) == 0
    (run,) = os.listdir(run_out)
    ckpt = torch.load(run_out / run / "checkpoint-0.pth", weights_only=True)
    ckpt["epoch"] = -1
    ckpt["unlearn_fast"].update(next_epoch=0, step_in_epoch=2, global_step=2, epoch_sums=[0.0, 0.0, 0.0],
                                epoch_steps=2, epoch_lr_sum=0.0)
    mid = tmp_path / "mid.pth"
    torch.save(ckpt, mid)
    capsys.readouterr()
    out = tmp_path / "out"
    _fails_cleanly(_args(good[0], out, "--resume", str(mid), "--batch_size", "2"), out, capsys,
                   str(mid), "saved mid-epoch at step 2 of 4 per epoch", "this run has 8", "--batch_size")
    # and a finished run cannot be continued past its --epochs
    _fails_cleanly(_args(good[0], out, "--resume", str(run_out / run / "checkpoint-0.pth")), out, capsys,
                   "already finished epoch 0 of --epochs 1")


def test_use_coco_without_a_ratio_says_it_takes_no_proxy(good, tmp_path, capsys):
    """--use_coco with no --opendata_to_forget_ratio: the run takes no proxy images, as the reference (which reads
    None as 0.0), and says so (the flag still narrows the crop scale)."""
    from types import SimpleNamespace
    from unlearn_fast.cli.unlearn_command import select_data
    coco = tmp_path / "coco"
    coco.mkdir()
    args = SimpleNamespace(data_path=good[0], forget_classes="cat", retain_classes="bird", use_coco=True,
                           proxy_path=str(coco), num_image_per_class=2, retainset_ratio=1.0,
                           opendata_to_forget_ratio=None, seed=0, verify_images=False)
    items = select_data(args, (["cat"], ["bird"]))
    assert "takes no proxy images" in capsys.readouterr().out
    assert items and all(str(coco) not in str(path) for path, _ in items)
