"""Red team 20: flags in pairs and triples on the command line (a fuzz of a few hundred random combinations of
unlearn / baseline flags on a 4-class tree, mae_micro and mage_micro, with resumes of a run's own checkpoint).
No combination crashed, hung or left a 0-exit run without its outputs; the faults were exit-2 messages that named
the library's parameters instead of the command line's flags."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import unlearn_fast
from unlearn_fast.cli.main import main


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    rng = np.random.default_rng(0)
    for c in "abcd":
        os.makedirs(root / "data" / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    torch.save({"model": unlearn_fast.create_model("mae_micro").state_dict()}, root / "pretrained.pth")
    return root


def _args(root, forget, retain, *extra):
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", str(root / "data"),
            "--forget_classes", forget, "--retain_classes", retain, "--num_image_per_class", "2", "--batch_size", "2",
            "--epochs", "1", "--max_steps_per_epoch", "1", "--warmup_epochs", "0", "--num_workers", "0",
            "--output_dir", str(root / "out"), "--device", "cpu", "--no_progress", "--resume",
            str(root / "pretrained.pth"), *extra]


def test_a_proxy_ratio_without_other_class_folders_names_the_flags(tree, capsys):
    """--opendata_to_forget_ratio 0.5 with every class folder forgotten or retained: the error said 'give
    proxy_root (e.g. COCO)', a parameter of the Python API that no flag of the command has."""
    assert main(_args(tree, "a,b", "c,d", "--opendata_to_forget_ratio", "0.5")) == 2
    err = capsys.readouterr().err
    assert "--opendata_to_forget_ratio" in err and "--use_coco --proxy_path" in err, err
    assert not os.path.exists(tree / "out")


def test_an_empty_retain_set_names_the_flags(tree, capsys):
    """--retainset_ratio 0 without a proxy: 'give retain classes with retainset_ratio > 0, or a proxy with
    opendata_to_forget_ratio > 0' named neither flag as the command spells it."""
    assert main(_args(tree, "a", "b", "--retainset_ratio", "0")) == 2
    err = capsys.readouterr().err
    assert "--retainset_ratio" in err and "--opendata_to_forget_ratio" in err, err
