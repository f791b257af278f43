"""Checkpoints (REFERENCE.md §1.7, §11): atomic writes, the reference layout with a plain-dict ``args``,
the safetensors side file, official Namespace checkpoints, and clear errors."""
from __future__ import annotations

import argparse
import os
import stat

import pytest
import torch

from unlearn_fast.atomic_files import atomic_save, atomic_save_safetensors
from unlearn_fast.train.checkpoint import (CheckpointError, args_as_dict, load_checkpoint_file, load_model_state,
                                           model_state_from, save_unlearn_checkpoint)
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")


def test_atomic_save_leaves_only_the_target(tmp_path):
    path = tmp_path / "x.pth"
    atomic_save({"a": torch.arange(3)}, str(path))
    atomic_save({"a": torch.arange(4)}, str(path))  # overwrite
    assert os.listdir(tmp_path) == ["x.pth"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(4))


def test_atomic_save_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.pth"
    atomic_save({"a": torch.ones(2)}, str(path))
    with pytest.raises(Exception):
        atomic_save({"f": lambda: None}, str(path))  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == ["x.pth"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_atomic_save_safetensors(tmp_path):
    from safetensors.torch import load_file
    t = torch.arange(6, dtype=torch.float32).view(2, 3).t()  # non-contiguous is fine
    atomic_save_safetensors({"w": t}, str(tmp_path / "p.safetensors"))
    assert os.listdir(tmp_path) == ["p.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "p.safetensors"))["w"], t)


def _trained_setup(make_mae_micro):
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    loss = setup.student.forward_encoder_task(torch.rand(2, 3, 32, 32),
                                              setup.student.sample_task(torch.rand(2, 3, 32, 32))).pow(2).mean()
    loss.backward()
    setup.optimizer.step()
    return setup


def test_save_unlearn_checkpoint_layout(make_mae_micro, tmp_path):
    from safetensors.torch import load_file
    setup = _trained_setup(make_mae_micro)
    args = argparse.Namespace(epochs=6, blr=1e-4, lr=None, output_dir=str(tmp_path), device=torch.device("cpu"),
                              resume="", mask_ratio_mu=0.55)
    trainable = [n for n, p in setup.student.named_parameters() if p.requires_grad]
    path = save_unlearn_checkpoint(str(tmp_path), 3, setup.student, setup.optimizer, setup.scaler, args, trainable,
                                   position={"global_step": 12})
    assert path == str(tmp_path / "checkpoint-3.pth")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pth", "checkpoint-3.safetensors"]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no allow-list needed
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["unlearn_fast"] == {"global_step": 12}
    assert type(ckpt["args"]) is dict and ckpt["args"]["epochs"] == 6 and ckpt["args"]["lr"] is None
    assert ckpt["args"]["device"] == "cpu"  # non-plain values become strings
    # the full model state (decoder included), as the reference writes it
    assert list(ckpt["model"]) == list(setup.student.state_dict())
    assert all(torch.equal(ckpt["model"][k], v) for k, v in setup.student.state_dict().items())
    assert len(ckpt["optimizer"]["state"]) == len(trainable)
    side = load_file(str(tmp_path / "checkpoint-3.safetensors"))
    assert sorted(side) == sorted(trainable) and "decoder_pred.weight" not in side
    assert all(torch.equal(side[n], setup.student.state_dict()[n]) for n in trainable)
    # the saved optimizer restores into a fresh one
    fresh = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32")
    fresh.optimizer.load_state_dict(ckpt["optimizer"])
    load_model_state(fresh.student, ckpt["model"], path)


def test_tag_names_the_file(make_mae_micro, tmp_path):
    setup = _trained_setup(make_mae_micro)
    path = save_unlearn_checkpoint(str(tmp_path), 0, setup.student, setup.optimizer, setup.scaler, None, [],
                                   tag="last")
    assert os.path.basename(path) == "checkpoint-last.pth"
    assert load_checkpoint_file(path)["args"] == {}


def test_official_checkpoint_with_pickled_namespace_loads(make_mae_micro, tmp_path):
    model = make_mae_micro()
    path = str(tmp_path / "checkpoint-5.pth")
    ns = argparse.Namespace(model="mae_micro", forget_alpha=0.2, opendata_to_forget_ratio=None)
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 5, "scaler": {}, "args": ns}, path)
    with pytest.raises(Exception):  # what plain torch>=2.6 does with it
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].forget_alpha == 0.2
    assert args_as_dict(ckpt["args"]) == {"model": "mae_micro", "forget_alpha": 0.2, "opendata_to_forget_ratio": None}
    other = make_mae_micro(seed=7)
    load_model_state(other, model_state_from(ckpt, path), path)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": _NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint_file(path)


class _NotAllowed:
    pass


def test_truncated_missing_and_wrong_content(make_mae_micro, tmp_path):
    model = make_mae_micro()
    good = str(tmp_path / "good.pth")
    torch.save({"model": model.state_dict()}, good)
    data = open(good, "rb").read()
    bad = str(tmp_path / "truncated.pth")
    with open(bad, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint_file(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))
    tensor_file = str(tmp_path / "tensor.pth")
    torch.save(torch.ones(2), tensor_file)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint_file(tensor_file)
    with pytest.raises(CheckpointError, match="no model state dict"):
        model_state_from({"model": {"a": 1}}, "x.pth")
    assert model_state_from({"w": torch.ones(1)}) == {"w": torch.ones(1)}  # a bare state dict


def test_wrong_architecture_names_missing_unexpected_and_shapes(make_mae_micro):
    small = make_mae_micro().state_dict()
    deeper = make_mae_micro(depth=3)
    with pytest.raises(CheckpointError) as info:
        load_model_state(deeper, small, "small.pth")
    msg = str(info.value)
    assert "missing keys" in msg and "blocks.2.norm1.weight" in msg and "small.pth" in msg and "--model" in msg
    state = dict(small)
    state["extra.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(extra.weight\)"):
        load_model_state(make_mae_micro(), state)
    wide = make_mae_micro(embed_dim=64, num_heads=4)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(cls_token: file \(1, 1, 128\) vs model"):
        load_model_state(wide, small)
    # non-strict: missing/unexpected keys are tolerated, shape mismatches are not
    state.pop("norm.weight")
    load_model_state(make_mae_micro(), state, strict=False)


def test_nan_or_meta_weights_are_refused_before_loading(make_mae_micro):
    """What --resume loads: weights of a diverged run (NaN / inf) or without data (meta) are named, and the model
    keeps its own weights."""
    model = make_mae_micro()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    state["norm.bias"][1] = float("inf")
    with pytest.raises(CheckpointError, match=r"run.pth': 2 tensors hold NaN or inf values \(.*diverged"):
        load_model_state(model, state, "run.pth")
    meta = {k: torch.empty_like(v, device="meta") for k, v in before.items()}
    with pytest.raises(CheckpointError, match="hold no data"):
        load_model_state(model, meta, "meta.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """mkstemp makes 0600 files: checkpoints and logs were unreadable to the group where torch.save's are not."""
    from unlearn_fast.atomic_files import atomic_save
    old = os.umask(umask)
    try:
        atomic_save({"x": torch.zeros(1)}, str(tmp_path / "c.pth"))
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.pth").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "c.pth").st_mode) == 0o666 & ~umask


def test_appending_to_a_log_behaves_as_open_a_for_links_and_modes(tmp_path):
    """log.txt through a link, or made private by its owner: the reference's open(path, "a") writes into the
    link's target and keeps the file's mode; before, the link became a plain file and the mode 0644."""
    from unlearn_fast.atomic_files import atomic_append_text
    target = tmp_path / "shared" / "log.txt"
    target.parent.mkdir()
    target.write_text("a\n")
    os.chmod(target, 0o600)
    link = tmp_path / "log.txt"
    link.symlink_to(target)
    atomic_append_text(str(link), "b\n")
    assert link.is_symlink() and target.read_text() == "a\nb\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert sorted(os.listdir(target.parent)) == ["log.txt"]


def test_a_mismatch_leads_with_what_fits(make_mae_micro):
    """The conclusion first: an MAE file made for another image size names the --input_size it needs; a file of
    another registered architecture names the --model it fits (models built on the meta device)."""
    import unlearn_fast
    small = make_mae_micro().state_dict()
    wide = unlearn_fast.create_model("mae_micro", img_size=64)
    with pytest.raises(CheckpointError, match=r"does not fit model MaskedAutoencoderViT: its position tables are "
                                              r"for 32-pixel images: pass --input_size 32; 2 shape mismatches"
                                              r" \(pos_embed[^;]*\)$"):  # the grid told once, not again in tokens
        load_model_state(wide, small, "run.pth")
    default_micro = unlearn_fast.create_model("mae_micro").state_dict()
    with pytest.raises(CheckpointError, match=r"does not fit model MaskedGenerativeEncoderViT: the file fits "
                                              r"--model mae_micro \(at its default --input_size\); "):
        load_model_state(unlearn_fast.create_model("mage_micro"), default_micro, "mae.pth")
