"""The code-id disagreement between the student's and the teacher's tokenisation (train/token_agreement.py), and
its report when ``--share_tokenizer`` is asked at unequal precision (REFERENCE.md §6, §11: measured, reported)."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_fast
from unlearn_fast.cli.main import main
from unlearn_fast.train.token_agreement import token_disagreement
from unlearn_fast.train.unlearn_setup import build_setup

from tests.helpers import make_class_tree

pytestmark = pytest.mark.usefixtures("single_thread")


def _setup(precision):
    torch.manual_seed(0)
    return build_setup(unlearn_fast.create_model("mage_micro"), "cpu", precision=precision)


def test_equal_precision_agrees_exactly_and_the_rate_is_a_fraction():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert token_disagreement(_setup("fp32"), images) == 0.0
    rate = token_disagreement(_setup("reference"), images)  # bf16 student vs fp32 teacher on the CPU
    assert 0.0 <= rate <= 1.0


def test_the_rate_counts_differing_ids():
    setup = _setup("fp32")
    images = torch.rand(2, 3, 32, 32)
    n = setup.teacher.prepare_inputs(images).numel()
    real = setup.teacher.prepare_inputs
    setup.teacher = copy.copy(setup.teacher)

    def shifted(x):  # the first id of every image differs
        ids = real(x).clone()
        ids[:, 0] = (ids[:, 0] + 1) % setup.teacher.vqgan.n_embed
        return ids
    setup.teacher.prepare_inputs = shifted
    assert token_disagreement(setup, images) == pytest.approx(2 / n)


def test_cli_reports_the_rate_when_sharing_is_not_exact(tmp_path, capsys):
    data = make_class_tree(tmp_path / "train", ("cat", "bird"), 2, seed=3)
    argv = ["unlearn", "--model", "mage_micro", "--input_size", "32", "--data_path", str(data), "--forget_classes",
            "cat", "--retain_classes", "bird", "--num_image_per_class", "2", "--batch_size", "4", "--epochs", "1",
            "--num_workers", "0", "--output_dir", str(tmp_path / "out"), "--no_progress", "--device", "cpu",
            "--share_tokenizer", "--step", "fast"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--share_tokenizer: " in out and "% of the code ids of 4 training images differ between the student's " \
        "bfloat16 and the teacher's fp32 tokenisation" in out
    assert main(argv[:-2] + ["--precision", "bf16", "--output_dir", str(tmp_path / "out2")]) == 0
    assert "% of the code ids" not in capsys.readouterr().out  # equal precision: exact, nothing to measure
