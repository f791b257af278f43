"""Every file reader of a checkpoint goes through models.state_dict_io.read_checkpoint: a truncated file or an
unsafe pickle gives one CheckpointError (a ValueError) naming the file, for Palette network states (CLI and
API), PeriodicEvaluator's best.pth, and the same one-line message for evaluation weights."""
from __future__ import annotations


import pytest
import torch

from unlearn_fast.cli.palette_command import read_palette_state
from unlearn_fast.eval.feature_extractors import load_torchvision_inception
from unlearn_fast.eval.periodic_eval import load_best_weights
from unlearn_fast.models.palette import load_palette_checkpoint
from unlearn_fast.models.state_dict_io import CheckpointError


class _NotAllowed:
    pass


def _truncated(tmp_path, name="t.pth"):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(100)}, good)
    path = tmp_path / name
    path.write_bytes(good.read_bytes()[:200])
    return str(path)


def _unsafe(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"w": torch.zeros(2), "obj": _NotAllowed()}, path)
    return str(path)


@pytest.mark.parametrize("read", [read_palette_state, lambda p: load_palette_checkpoint(torch.nn.Module(), p),
                                  lambda p: load_best_weights(torch.nn.Linear(2, 2), p)],
                         ids=["palette_state", "palette_api", "best_pth"])
def test_bad_files_name_the_file(tmp_path, read):
    bad = _truncated(tmp_path)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {bad!r}.*truncated"):
        read(bad)
    unsafe = _unsafe(tmp_path)
    with pytest.raises(CheckpointError, match="not loaded for safety.*_NotAllowed"):
        read(unsafe)


def test_evaluation_weights_error_is_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        load_torchvision_inception(_unsafe(tmp_path))
    message = str(err.value)
    assert "unsafe.pth" in message and "\n" not in message and err.value.__cause__ is None
