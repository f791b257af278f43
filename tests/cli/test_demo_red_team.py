"""`unlearn-fast demo` against bad flags, unwritable folders and corrupt caches: each fails early with one message
naming the flag, or detects the fault and rebuilds; nothing half-written is left behind."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from unlearn_fast.cli import demo
from unlearn_fast.cli.main import main
from unlearn_fast.eval import digit_classifier as dc
from unlearn_fast.train import digits as dg
from unlearn_fast.atomic_files import OutputWriteError
from unlearn_fast.train.pretrain_mae import PretrainConfig, load_or_pretrain_mae
from tests.helpers import needs_digits


TINY = ["--pretrain_steps", "2", "--unlearn_steps", "2", "--holdout_per_class", "10", "--no_progress"]


# ---- flags: refused before any pretraining -------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite"),
    (["--pretrain_lr", "inf"], "--pretrain_lr must be a finite"),
    (["--forget_alpha", "inf"], "--forget_alpha must be a finite"),
    (["--retain_alpha", "nan"], "--retain_alpha must be a finite"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_non_finite_and_negative_flags_are_refused_before_pretraining(flags, message, tmp_path, monkeypatch):
    def no_pretraining(*a, **k):
        raise AssertionError("pretraining started despite a bad flag")
    monkeypatch.setattr(demo, "load_or_pretrain_mae", no_pretraining)
    args = demo.build_parser().parse_args(flags + ["--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=message):
        demo.run_demo(args)
    assert not (tmp_path / "out").exists()


@needs_digits
@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "100000"], r"4900 training digits remain .*--batch_size 100000"),
    (["--holdout_per_class", "499"], r"10 training digits remain after --holdout_per_class 499"),
    (["--forget_digits", "0", "--batch_size", "1000"], r"490 forget training digits remain"),
])
def test_batches_larger_than_the_data_name_the_flags(flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "load_or_pretrain_mae", lambda *a, **k: pytest.fail("pretraining started"))
    args = demo.build_parser().parse_args(["--holdout_per_class", "10"] + flags + ["--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=message):
        demo.run_demo(args)
    assert not (tmp_path / "o").exists()  # no empty output folder left behind


def test_output_dir_that_is_a_file_or_under_a_file_is_refused_up_front(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["demo", "--output_dir", str(f)]) == 2
    assert "is not a folder: it exists and is a file" in capsys.readouterr().err
    assert main(["demo", "--output_dir", str(f / "sub")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_read_only_output_dir_is_refused_up_front(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(out) else real(p, mode, *a, **k))
    with pytest.raises(ValueError, match="--output_dir .* not writable"):
        demo.validate_args(demo.build_parser().parse_args(["--output_dir", str(out)]))


# ---- caches: unwritable, corrupt ------------------------------------------------------------------------

def _tiny_pretrain(tmp_path):
    x = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return x, PretrainConfig(steps=3, batch_size=8, warmup_steps=1)


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_unwritable_pretraining_cache_is_a_warning_not_a_crash(tmp_path, monkeypatch, capsys):
    x, cfg = _tiny_pretrain(tmp_path)
    real_open, real_os_open = open, os.open

    def refuse(path):  # what a read-only folder does to a file created in it
        raise OSError(30, "Read-only file system", str(path))

    def read_only_open(path, mode="r", *a, **k):
        if "w" in mode and str(tmp_path) in str(path):
            refuse(path)
        return real_open(path, mode, *a, **k)

    def read_only_os_open(path, flags, *a, **k):  # the low-level open of tempfile.mkstemp
        if flags & os.O_CREAT and str(tmp_path) in str(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)
    monkeypatch.setattr("builtins.open", read_only_open)
    monkeypatch.setattr(os, "open", read_only_os_open)
    model, info = load_or_pretrain_mae(cfg, x, cache_dir=tmp_path, progress=False)
    assert info["path"] is None and not info["loaded"]
    assert "could not write the pretraining cache" in capsys.readouterr().out
    assert not os.listdir(tmp_path)  # no temporary file left


def test_corrupt_pretraining_cache_is_rebuilt_exactly_as_a_fresh_one(tmp_path):
    x, cfg = _tiny_pretrain(tmp_path)
    fresh, info = load_or_pretrain_mae(cfg, x, cache_dir=tmp_path, progress=False)
    path = info["path"]
    good = open(path, "rb").read()
    # 1. flipped bytes inside a tensor record: torch.load checks no CRC; the stored checksum must catch it
    with zipfile.ZipFile(path) as z:
        rec = z.getinfo([n for n in z.namelist() if "/data/" in n][0])
    start = rec.header_offset + 30 + len(rec.filename) + len(rec.extra)
    raw = bytearray(good)
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    open(path, "wb").write(bytes(raw))
    m, info = load_or_pretrain_mae(cfg, x, cache_dir=tmp_path, progress=False)
    assert not info["loaded"] and _same(m, fresh)
    assert open(path, "rb").read() == good  # rewritten with the right weights
    # 2. same key, one mis-shaped tensor and garbage elsewhere: a failed load must not seed the retraining
    blob = torch.load(path, weights_only=True)
    state = {k: torch.full_like(v, 7.0) for k, v in blob["model"].items()}
    state[next(iter(state))] = torch.zeros(3)
    torch.save({"model": state, "config": blob["config"], "steps": 3}, path)
    m, info = load_or_pretrain_mae(cfg, x, cache_dir=tmp_path, progress=False)
    assert not info["loaded"] and _same(m, fresh)
    # 3. a file from before checksums existed (no "checksum" key) still loads
    torch.save({k: v for k, v in blob.items() if k != "checksum"}, path)
    m, info = load_or_pretrain_mae(cfg, x, cache_dir=tmp_path, progress=False)
    assert info["loaded"] and _same(m, fresh)


@needs_digits
def test_digit_classifier_cache_write_failure_is_a_warning(tmp_path, monkeypatch, capsys):
    def failing_save(obj, path):
        raise OutputWriteError(f"cannot write {path}: Read-only file system")
    monkeypatch.setattr(dc, "atomic_save", failing_save)
    cfg = dc.DigitClassifierConfig(epochs=1, holdout_per_class=10)
    model = dc.load_or_train_digit_classifier(tmp_path, config=cfg)
    assert model.train_info["path"] is None
    assert "could not write the digit-classifier cache" in capsys.readouterr().out


@needs_digits
@pytest.mark.parametrize("damage", ["garbage", "flipped", "short"])
def test_corrupt_digits_npz_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("UNLEARN_FAST_CACHE", str(tmp_path))
    want_images, want_digits = dg.load_digits_5k()  # writes tmp_path/mnist_5k_v1.npz
    path = tmp_path / f"mnist_5k_v{dg._CACHE_VERSION}.npz"
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04garbage")
    elif damage == "flipped":  # zipfile's CRC check fails
        path.write_bytes(good[:3000] + bytes(b ^ 0xFF for b in good[3000:3100]) + good[3100:])
    else:  # a readable file with the wrong content
        with np.load(path) as d:
            np.savez(path, images=d["images"][:100], digits=d["digits"][:100], source_size=d["source_size"])
    images, digits = dg.load_digits_5k()
    assert np.array_equal(images, want_images) and np.array_equal(digits, want_digits)


# ---- outputs: written last, through temporary files -----------------------------------------------------

@needs_digits
def test_interrupted_run_keeps_the_previous_outputs_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"previous": true}')
    (out / "grid.png").write_bytes(b"old")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "train_loop", interrupted)
    args = demo.build_parser().parse_args(TINY + ["--output_dir", str(out), "--cache_dir", str(tmp_path / "c")])
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(args)
    assert json.loads((out / "metrics.json").read_text()) == {"previous": True}
    assert (out / "grid.png").read_bytes() == b"old" and sorted(os.listdir(out)) == ["grid.png", "metrics.json"]
    assert all(".tmp" not in p for p in os.listdir(tmp_path / "c"))


@needs_digits
def test_tiny_run_writes_only_complete_files_into_a_new_nested_output_dir(tmp_path):
    out = tmp_path / "a" / "b"
    args = demo.build_parser().parse_args(TINY + ["--forget_digits", "7,7", "--batch_size", "2",
                                                  "--output_dir", str(out), "--cache_dir", str(tmp_path / "c")])
    metrics = demo.run_demo(args)
    assert sorted(os.listdir(out)) == ["grid.png", "metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["config"]["forget_digits"] == [7] and metrics["config"]["forget_per_batch"] == 1
