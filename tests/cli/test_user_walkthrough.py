"""A first-time user's walk through the README's workflows: what they see (messages, --help, progress, printed
results) and what is left on disk (no half-written folder that looks complete, nothing overwritten unasked)."""
from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained
from unlearn_fast.cli import tools
from unlearn_fast.cli.main import main
from unlearn_fast.eval import pipeline
from unlearn_fast.eval.report import render_report
from unlearn_fast.train import progress
from unlearn_fast.train.image_datasets import load_rgb_image

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- images: no library noise -----------------------------------------------------------------------------

def test_palette_image_with_byte_transparency_loads_quietly_with_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).convert("P")
    image.info["transparency"] = bytes([0, 255] * 128)  # per-entry alpha, as many web PNGs have
    path = str(tmp_path / "p.png")
    image.save(path)
    with Image.open(path) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(im.info.get("transparency"), bytes)
        want = np.asarray(im.convert("RGB"))  # the reference's conversion
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load_rgb_image(path)
    assert [str(w.message) for w in caught] == []  # PIL warned once per DataLoader worker
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)


# ---- progress bars ----------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, interval", [(io.StringIO, 30.0), (_Terminal, 0.1)])
def test_progress_bar_redraws_rarely_into_a_log_file(monkeypatch, stream, interval):
    pytest.importorskip("tqdm")
    monkeypatch.setattr("sys.stderr", stream())
    bar = progress.progress_bar(10, True, "epoch 0")
    try:
        assert bar.mininterval == interval  # a redirected stderr got a redraw every 0.1 s
    finally:
        bar.close()
    assert progress.progress_bar(10, False, "x") is None


# ---- --help ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, shown", [("generate", ["(default: 16)", "(default: 0)", "--no_progress"]),
                                             ("eval", ["(default: 32)", "(default: 0)", "(default: 10)"]),
                                             ("audit", ["(default: 64)", "(default: auto)"])])
def test_help_shows_the_defaults(capsys, command, shown):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for piece in shown:
        assert piece in text


# ---- generate: staged output, never mixed with an earlier run ---------------------------------------------

@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_class_tree(root / "imagenet" / "val", ("fa", "ra"), 1, seed=0, size=(33, 41))
    return dict(root=str(root / "imagenet"), ckpt=save_random_pretrained(root / "mage.pth", "mage_micro"))


def _gen_argv(gen, out):
    return ["generate", "--task", "inpaint", "--ckpt_path", gen["ckpt"], "--model", "mage_micro", "--input_size", "32",
            "--data_root", gen["root"], "--forget_classes", "fa", "--retain_classes", "ra", "--device", "cpu",
            "--output", str(out), "--no_progress"]


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_generate_stages_then_refuses_to_write_into_a_filled_output(gen, tmp_path, capsys):
    out = tmp_path / "ckpt-inpaint"
    out.mkdir()  # an empty folder is fine: the complete one takes its place
    assert main(_gen_argv(gen, out)) == 0
    printed = capsys.readouterr().out
    assert "2 test images x 2 inpaint settings = 4 images" in printed and f"wrote 4 images under {out}" in printed
    assert _files(out) == ["forget/fa/center_0.25_0.png", "forget/fa/center_0.5_0.png",
                           "retain/ra/center_0.25_0.png", "retain/ra/center_0.5_0.png"]
    assert not os.path.exists(f"{out}.partial")
    before = {f: os.stat(out / f).st_mtime_ns for f in _files(out)}
    assert main(_gen_argv(gen, out)) == 2  # the reference would overwrite (and mix two runs' images)
    err = capsys.readouterr().err
    assert f"{out} already holds 4 files" in err and "--output" in err
    assert {f: os.stat(out / f).st_mtime_ns for f in _files(out)} == before
    assert not os.path.exists(f"{out}.partial")


def test_generate_stopped_midway_leaves_only_a_partial_folder(gen, tmp_path, capsys, monkeypatch):
    from unlearn_fast.models import mage_generate
    real = mage_generate.run_paint

    def stopped_after_one_batch(model, batches, out_dir, task, **kw):
        first = next(iter(batches))
        real(model, [first], out_dir, task, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(mage_generate, "run_paint", stopped_after_one_batch)
    out = tmp_path / "out"
    argv = _gen_argv(gen, out) + ["--batch_size", "1"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"2 of 4 images are kept in {out}.partial; run the same command again to continue" in err
    images = [f for f in _files(f"{out}.partial") if not os.path.basename(f).startswith(".")]
    assert not out.exists() and len(images) == 2  # eval cannot take it for a complete folder
    monkeypatch.setattr(mage_generate, "run_paint", real)
    assert main(argv) == 0  # the same command continues the stopped one (rt18)
    assert "continuing the stopped generate" in capsys.readouterr().out and len(_files(out)) == 4

    def fails_before_writing(*a, **kw):
        raise ValueError("the generated images hold NaN or inf values")

    monkeypatch.setattr(mage_generate, "run_paint", fails_before_writing)
    out2 = tmp_path / "out2"
    assert main(_gen_argv(gen, out2)) == 2
    assert "NaN" in capsys.readouterr().err
    assert not out2.exists() and not os.path.exists(f"{out2}.partial")  # nothing written: nothing to clean up


# ---- eval: the results are printed, not only appended to a CSV --------------------------------------------

def test_eval_prints_what_it_appended(tmp_path, capsys, monkeypatch):
    dst = tmp_path / "ckpt-inpaint"
    dst.mkdir()
    rows = [{"name": os.path.join(str(dst), f"center_{r}_"),
             "retain": {"fid": 12.5, "is_mean": 3.25, "is_std": 0.5, "n": 7},
             "forget": {"fid": 40.0, "is_mean": 1.5, "is_std": 0.25, "n": 7}} for r in (0.25, 0.5)]
    monkeypatch.setattr(pipeline, "run_eval", lambda *a, **kw: rows)
    assert main(["eval", "--dst", str(dst), "--csv_dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FID retain" in out and "center_0.25_" in out and "center_0.5_" in out
    assert "12.500" in out and "3.250 ± 0.500" in out and "40.000" in out
    assert f"appended 2 row(s) to {os.path.join(str(tmp_path), 'fid_is_eval_inpaint.csv')}" in out
    clip = {"name": str(dst), "retain": 0.875, "forget": 0.5}
    monkeypatch.setattr(pipeline, "run_palette_clip_eval", lambda *a, **kw: clip)
    (tmp_path / "class.txt").write_text("a\n")
    assert main(["eval", "--dst", str(dst), "--palette_class_list", str(tmp_path / "class.txt"), "--clip",
                 "--csv_dir", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CLIP retain" in out and "0.8750" in out and "0.5000" in out and "clip_cosine.csv" in out


# ---- audit and report after a run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """cat has 6 images (4 trained, 2 unseen); bird has 4, all trained: no retain-class control."""
    data = tmp_path_factory.mktemp("data") / "train"
    make_class_tree(data, ("cat",), 6, seed=1)
    make_class_tree(data, ("bird",), 4, seed=2)
    pre = save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pre.pth")
    out = tmp_path_factory.mktemp("out")
    assert main(micro_unlearn_argv(data, pre, out, "--forget_alpha", "0.5", forget="cat", retain="bird",
                                   per_class=4)) == 0
    return dict(data=str(data), pre=pre, run_dir=only_run_dir(out))


def test_audit_says_what_it_compares_and_why_a_row_is_missing(run, capsys):
    assert main(["audit", run["run_dir"], "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"before = {run['pre']}" in out and "checkpoint-0.pth" in out
    assert "forget classes 4 trained + 2 unseen" in out
    assert "no retain-class control: the run trained on every image of its retain classes" in out
    result = json.load(open(os.path.join(run["run_dir"], "forget_audit.json")))
    assert "retain_control" not in result and result["retain_control_skipped"]
    page = render_report(run["run_dir"])
    assert "after = " in page and "checkpoint-0.pth" in page  # which checkpoint the (latest) audit compared
    assert "No retain-class control" in page
    assert "Run settings (opt.yaml)" in page and ">forget_alpha<" in page and ">0.5<" in page


def test_audit_of_a_run_that_left_no_unseen_forget_image(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(micro_unlearn_argv(run["data"], run["pre"], out, forget="cat", retain="bird", per_class=6,
                                   batch=6)) == 0
    capsys.readouterr()
    assert main(["audit", only_run_dir(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot audit" in err and "trained on every image of its forget classes" in err
    assert "lower --num_image_per_class" in err


def test_report_of_a_palette_run_folder_is_not_blank(tmp_path):
    run = tmp_path / "train_inpainting_places2_x"
    run.mkdir()
    (run / "train.log").write_text(
        "26-11-27 14:58:37.147 - INFO: Begin model train.\n"
        + "".join(f"26-11-27 14:58:5{i}.419 - INFO: train/mse_loss: {1.5 - 0.25 * i}\t\n" for i in range(4))
        + "26-11-27 14:59:50.998 - INFO: epoch: 1\t\n")
    (run / "config.json").write_text(json.dumps({"name": "train_x", "unlearn_fast": {
        "approach": "ours", "forget_alpha": 0.1, "nested": {"a": 1}}}))
    page = render_report(str(run))
    assert "Training curves" in page and "train/mse_loss" in page and "<polyline" in page
    assert "Run settings (config.json)" in page and ">ours<" in page and ">nested<" not in page


def test_formatted_eval_rows_handle_names_outside_dst():
    table = tools.format_eval_rows([{"name": "/x/y/run", "retain": 0.5, "forget": 0.25}], "/elsewhere")
    assert table.splitlines()[1].split() == ["run", "0.5000", "0.2500"]
