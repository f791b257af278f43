"""End-to-end CLI runs on a tiny class-folder tree, and one clear error per bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import unlearn_fast
from unlearn_fast.cli.main import main

CLASSES = ("cat", "dog", "bird", "fish")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "train"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "pretrained.pth"
    torch.save({"model": unlearn_fast.create_model("mae_micro").state_dict()}, path)
    return str(path)


def _args(data_dir, out, *extra):
    return ["--model", "mae_micro", "--input_size", "32", "--data_path", data_dir, "--forget_classes", "cat,dog",
            "--retain_classes", "bird", "--num_image_per_class", "4", "--batch_size", "4", "--epochs", "2",
            "--warmup_epochs", "1", "--num_workers", "0", "--output_dir", str(out), "--no_progress",
            "--device", "cpu", *extra]


def _run_dir(out):
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def test_unlearn_end_to_end_writes_reference_outputs(data_dir, pretrained, tmp_path):
    rc = main(["unlearn", *_args(data_dir, tmp_path, "--resume", pretrained, "--forget_alpha", "0.2")])
    assert rc == 0
    run = _run_dir(tmp_path)
    assert os.path.basename(run).startswith("class_img1k__numimg_4_None_55_ra_1_fa_20_l2wd_0.05_dr_ratio_1.0_open_None_normal_")
    names = set(os.listdir(run))
    assert {"opt.yaml", "log.txt", "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-1.safetensors",
            "data_split.json"} <= names
    lines = [json.loads(x) for x in open(os.path.join(run, "log.txt"))]
    assert [x["epoch"] for x in lines] == [0, 1]
    assert set(lines[0]) == {"train_lr", "train_retain_l2_loss", "train_forget_l2_loss", "train_loss", "epoch"}
    assert lines[1]["train_forget_l2_loss"] > 0
    ckpt = torch.load(os.path.join(run, "checkpoint-1.pth"), weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["args"]["teacher_checkpoint"] == os.path.abspath(pretrained)
    # the decoder is not trained by the paper's objective
    ref = torch.load(pretrained, weights_only=True)["model"]
    assert torch.equal(ckpt["model"]["decoder_pred.weight"], ref["decoder_pred.weight"])
    assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])


def test_resume_continues_with_the_original_teacher(data_dir, pretrained, tmp_path):
    out1 = tmp_path / "a"
    assert main(["unlearn", *_args(data_dir, out1, "--resume", pretrained, "--forget_alpha", "0.2",
                                   "--epochs", "1")]) == 0
    ckpt0 = os.path.join(_run_dir(out1), "checkpoint-0.pth")
    out2 = tmp_path / "b"
    assert main(["unlearn", *_args(data_dir, out2, "--resume", ckpt0, "--forget_alpha", "0.2")]) == 0
    run2 = _run_dir(out2)
    assert sorted(x for x in os.listdir(run2) if x.endswith(".pth")) == ["checkpoint-1.pth"]
    args2 = torch.load(os.path.join(run2, "checkpoint-1.pth"), weights_only=True)["args"]
    assert args2["teacher_checkpoint"] == os.path.abspath(pretrained)


@pytest.mark.parametrize("loss_type", ["max_full_model_loss", "full_model_noise", "encoder_noise", "learn_others"])
def test_baselines_run(data_dir, pretrained, tmp_path, loss_type):
    rc = main(["baseline", *_args(data_dir, tmp_path, "--resume", pretrained, "--loss_type", loss_type,
                                  "--forget_alpha", "0.1", "--epochs", "1", "--max_steps_per_epoch", "2")])
    assert rc == 0
    assert f"_baseline_{loss_type}" in os.path.basename(_run_dir(tmp_path))


@pytest.mark.parametrize("extra,needle", [
    (["--model", "no_such_model"], "unknown --model"),
    (["--noise_type", "pink"], "unknown --noise_type"),
    (["--data_path", "/nonexistent/path"], "/nonexistent/path"),
    (["--forget_classes", "zebra"], "zebra"),
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "64"], "batch larger than the data"),
    (["--resume", "/nonexistent.pth"], "--resume"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(data_dir, tmp_path, capsys, extra, needle):
    args = _args(data_dir, tmp_path / "out")
    for i in range(0, len(extra), 2):  # later flags override earlier ones in argparse
        args += [extra[i], extra[i + 1]]
    rc = main(["unlearn", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_checkpoint_of_another_architecture_is_rejected(data_dir, tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"model": unlearn_fast.create_model("mae_micro", embed_dim=64).state_dict()}, path)
    rc = main(["unlearn", *_args(data_dir, tmp_path / "out", "--resume", str(path))])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and "shape mismatches" in err
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_unknown_loss_type_is_rejected(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["baseline", *_args(data_dir, tmp_path, "--loss_type", "bogus")])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err


def test_report_command_writes_html(data_dir, pretrained, tmp_path):
    assert main(["unlearn", *_args(data_dir, tmp_path, "--resume", pretrained, "--epochs", "1")]) == 0
    run = _run_dir(tmp_path)
    assert main(["report", run]) == 0
    html = open(os.path.join(run, "report.html")).read()
    assert "<html" in html.lower() and "train_loss" in html
