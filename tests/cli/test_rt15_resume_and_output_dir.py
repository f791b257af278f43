"""Two inputs that used to fail late or with the wrong advice: ``--resume`` given the trained parameters alone (a
run's ``checkpoint-<e>.safetensors`` or ``best.pth``), and the demo's ``--output_dir ''`` (accepted up front, then
``os.makedirs('')`` failed after the pretraining and the unlearning)."""
from __future__ import annotations

import argparse

import pytest
import torch

from unlearn_fast.cli import demo
from unlearn_fast.cli.main import main
from unlearn_fast.cli.unlearn_command import load_training_state
from unlearn_fast.atomic_files import atomic_save_safetensors
from unlearn_fast.train.checkpoint import CheckpointError


def _trained_only(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("blocks.")}


@pytest.mark.parametrize("kind", ["safetensors", "best_pth"])
def test_resume_from_the_trained_parameters_alone_says_so(make_mae_micro, tmp_path, kind):
    model = make_mae_micro()
    trained = _trained_only(model)
    assert 0 < len(trained) < len(model.state_dict())
    if kind == "safetensors":
        path = str(tmp_path / "checkpoint-1.safetensors")
        atomic_save_safetensors(trained, path)
    else:
        path = str(tmp_path / "best.pth")
        torch.save({"model": trained, "epoch": 1}, path)
    args = argparse.Namespace(resume=path, teacher=None)
    with pytest.raises(CheckpointError) as err:
        load_training_state(args, make_mae_micro())
    msg = str(err.value)
    assert "trained parameters" in msg and "checkpoint-<epoch>.pth" in msg and path in msg
    assert "Is --model" not in msg  # the architecture is right: the file is not a whole model


def test_resume_from_a_whole_model_still_loads(make_mae_micro, tmp_path):
    path = str(tmp_path / "pretrained.pth")
    src = make_mae_micro(seed=1)
    torch.save({"model": src.state_dict()}, path)
    model = make_mae_micro()
    ckpt, teacher = load_training_state(argparse.Namespace(resume=path, teacher=None), model)
    assert ckpt is None and teacher == path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))


def test_resume_from_another_architecture_keeps_the_model_hint(make_mae_micro, tmp_path):
    path = str(tmp_path / "other.pth")
    state = make_mae_micro().state_dict()
    state["pos_embed"] = torch.zeros(1, 3, state["pos_embed"].shape[-1])  # a mis-shaped key among all keys
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="is --model the architecture"):
        load_training_state(argparse.Namespace(resume=path, teacher=None), make_mae_micro())


def test_demo_empty_output_dir_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--output_dir"):
        demo.validate_args(demo.build_parser().parse_args(["--output_dir", ""]))
    monkeypatch.setattr(demo, "load_digits_5k", lambda *a, **k: pytest.fail("the demo started its work"))
    assert main(["demo", "--output_dir", "", "--no_progress"]) == 2
    assert "--output_dir" in capsys.readouterr().err
