"""Red-team checks of the checkpoint flags of ``unlearn`` / ``baseline``: a directory given where a checkpoint
file belongs (e.g. the run directory as --resume) is named as a directory, and a legacy-format file that
pickles an unsafe object names that object; exit 2, one message, no traceback, nothing written."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import assert_cli_fails_cleanly, make_class_tree, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt11_flags")
    make_class_tree(root / "train", ["cat", "dog", "bird"], 2, seed=0)
    save_random_pretrained(root / "pre.pth")
    return str(root / "train"), str(root / "pre.pth")


def _argv(data, out, *extra, command="unlearn", model="mae_micro"):
    return [command, "--model", model, "--input_size", "32", "--data_path", data, "--forget_classes", "cat,dog",
            "--retain_classes", "bird", "--num_image_per_class", "2", "--batch_size", "2", "--epochs", "1",
            "--num_workers", "0", "--output_dir", str(out), "--no_progress", "--device", "cpu", *extra]


@pytest.mark.parametrize("flag,model", [("--resume", "mae_micro"), ("--teacher", "mae_micro"),
                                        ("--vqgan_ckpt", "mage_micro")])
def test_a_directory_as_a_checkpoint_flag_is_named(data_and_weights, tmp_path, capsys, flag, model):
    data, pre = data_and_weights
    folder = tmp_path / "a_run_dir"
    folder.mkdir()
    extra = [flag, str(folder)] + (["--resume", pre] if flag == "--teacher" else [])
    assert_cli_fails_cleanly(_argv(data, tmp_path / "out", *extra, model=model), tmp_path / "out", capsys,
                             f"{flag} {folder} is a directory")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


@pytest.mark.parametrize("command", ["unlearn", "baseline"])
def test_a_legacy_file_with_an_unsafe_object_names_it(data_and_weights, tmp_path, capsys, command):
    data, _ = data_and_weights
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, evil, _use_new_zipfile_serialization=False)
    extra = ["--resume", str(evil)] + (["--loss_type", "encoder_noise"] if command == "baseline" else [])
    assert_cli_fails_cleanly(_argv(data, tmp_path / "out", *extra, command=command), tmp_path / "out", capsys,
                             str(evil), "posix.system", "not loaded for safety")
