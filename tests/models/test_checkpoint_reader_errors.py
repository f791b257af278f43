"""Red-team checks of models/state_dict_io.read_checkpoint: an unsafe global in a legacy (non-zip) torch file is
named like one in a zip file; a plain pickle fails with the one CheckpointError and no torch warning whose
source line reads like a traceback; a directory is reported as a directory, not as a missing file."""
from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

from unlearn_fast.models.state_dict_io import CheckpointError, CheckpointNotFoundError, read_checkpoint


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_an_unsafe_global_is_named_in_both_torch_formats(tmp_path, zip_format):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"not loaded for safety .*: posix\.system; re-save") as e:
        read_checkpoint(str(path))
    assert str(path) in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_pickle_is_one_error_and_no_warning(tmp_path, protocol):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"model": [1, 2, 3]}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            read_checkpoint(str(path))
    assert [str(w.message) for w in caught] == []


def test_a_good_file_still_loads(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, path)
    ckpt = read_checkpoint(str(path))
    assert torch.equal(ckpt["model"]["w"], torch.arange(3.0)) and ckpt["epoch"] == 2


def test_a_directory_is_not_reported_as_missing(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="is a directory, not a checkpoint file") as e:
        read_checkpoint(str(tmp_path))
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="checkpoint not found"):
        read_checkpoint(str(tmp_path / "absent.pth"))


def test_a_safetensors_file_is_read_without_torch_load(tmp_path, monkeypatch):
    """The trained-parameter files a run writes (checkpoint-<e>.safetensors) read on every torch: torch 2.11's
    torch.load cannot read them (the GPU image's audit failed), so read_checkpoint never hands them to it."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"blocks.0.attn.qkv.weight": torch.randn(6, 4, generator=g),
               "norm.bias": torch.randn(3, generator=g).to(torch.bfloat16), "step": torch.tensor(7)}
    path = tmp_path / "checkpoint-0.safetensors"
    save_file(tensors, str(path))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was asked to read safetensors"))
    got = read_checkpoint(str(path))
    assert set(got) == set(tensors)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())


def test_a_truncated_safetensors_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "checkpoint-0.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])  # the header still fits, the tensor bytes do not
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*checkpoint-0\.safetensors"):
        read_checkpoint(str(path))
