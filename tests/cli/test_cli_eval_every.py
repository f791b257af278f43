"""``unlearn-fast unlearn --eval_every``: held-out evaluation during training, logged, keep-best."""
from __future__ import annotations

import json
import os

import pytest
import torch

import unlearn_fast
from unlearn_fast.cli.main import main
from unlearn_fast.eval.periodic_eval import PeriodicEvaluator
from unlearn_fast.train.data_split import select_unlearning_files
from unlearn_fast.train.holdout_split import select_holdout_files
from unlearn_fast.train.image_datasets import load_eval_images

from tests.helpers import make_class_tree, save_random_pretrained


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_class_tree(tmp_path_factory.mktemp("data") / "train", ("cat", "dog", "bird"), 6, seed=1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pretrained.pth")


def _args(data_dir, out, *extra):
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", data_dir, "--forget_classes",
            "cat,dog", "--retain_classes", "bird", "--num_image_per_class", "4", "--batch_size", "4",
            "--warmup_epochs", "0", "--num_workers", "0", "--output_dir", str(out), "--no_progress",
            "--device", "cpu", "--forget_alpha", "1.0", "--lr", "3e-3", *extra]


def _run_dir(out):
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def test_eval_every_logs_keeps_best_and_measures_before_on_the_original(data_dir, pretrained, tmp_path, capsys):
    assert main(_args(data_dir, tmp_path, "--resume", pretrained, "--epochs", "3", "--eval_every", "2",
                      "--eval_images", "3")) == 0
    run = _run_dir(tmp_path)
    lines = [json.loads(x) for x in open(os.path.join(run, "eval_log.txt"))]
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("eval epoch")]  # one line per eval
    assert [x.split(":")[0] for x in said] == ["eval epoch 1", "eval epoch 2"]
    assert f"forget error x{lines[1]['forget_ratio']:.3f}" in said[0]
    # before, then after epoch 1 (every 2nd) and epoch 2 (the last)
    assert [x["epoch"] for x in lines] == [None, 1, 2] and lines[0]["phase"] == "before"
    # "before" is the pretrained model on the held-out files the command documents (unseen, seeded)
    items = select_unlearning_files(data_dir, ["cat", "dog"], ["bird"], 4, seed=0)
    held = select_holdout_files(data_dir, ["cat", "dog"], ["bird"], exclude=[p for p, _ in items], per_set=3)
    assert len(held.forget) == 3 and len(held.retain) == 2  # bird has 6 - 4 = 2 unseen files
    model = unlearn_fast.create_model("mae_micro")
    model.load_state_dict(torch.load(pretrained, weights_only=True)["model"])
    images = load_eval_images(held.forget + held.retain, 32)
    ref = PeriodicEvaluator(model, images, torch.arange(5) < 3, mask_seed=0, every=1)
    assert lines[0]["forget_mse"] == pytest.approx(ref.before["forget_mse"], rel=1e-6)
    assert lines[0]["retain_mse"] == pytest.approx(ref.before["retain_mse"], rel=1e-6)
    # keep-best: best.pth holds the encoder of the logged line with the highest forget_gap
    best_line = max(lines[1:], key=lambda x: x["forget_gap"])
    best = torch.load(os.path.join(run, "best.pth"), weights_only=True)
    assert best["epoch"] == best_line["epoch"] and best["criterion"] == "forget_gap"
    assert best["score"] == pytest.approx(best_line["forget_gap"])
    assert set(best["model"]) == set(model.encoder_parameter_names())
    last = torch.load(os.path.join(run, "checkpoint-2.pth"), weights_only=True)["model"]
    if best["epoch"] == 2:
        assert all(torch.equal(v, last[k]) for k, v in best["model"].items())
    # unlearning with forget_alpha 1 moves the forget error
    assert lines[-1]["forget_ratio"] != pytest.approx(1.0, abs=1e-6)


def test_eval_every_without_unseen_images_fails_before_writing(data_dir, pretrained, tmp_path, capsys):
    rc = main(_args(data_dir, tmp_path, "--resume", pretrained, "--epochs", "1", "--eval_every", "1",
                    "--num_image_per_class", "6"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "no held-out forget images" in err and "--num_image_per_class" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [(["--eval_every", "0"], "--eval_every must be >= 1"),
                                            (["--eval_every", "1", "--eval_images", "0"], "--eval_images"),
                                            (["--eval_criterion", "best"], None)])
def test_eval_flags_out_of_range(data_dir, tmp_path, capsys, flags, message):
    if message is None:  # argparse choices: exit code 2 with usage
        with pytest.raises(SystemExit) as e:
            main(_args(data_dir, tmp_path, *flags))
        assert e.value.code == 2
        return
    assert main(_args(data_dir, tmp_path, *flags)) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
