"""Faults during the long evaluation commands (``generate``, ``eval``, ``palette-test``): Ctrl-C and SIGTERM in
the middle of the work, a full disk at an image or CSV write, inputs that change or break mid-run, and the rerun
after a stop. Each stop is one line saying what was kept and how to go on; no half-written image or row is
left where a later eval would count it; a rerun of ``generate`` / ``palette-test`` continues the stopped one
(and only the same job: another checkpoint or other flags are refused instead of mixed in)."""
from __future__ import annotations

import errno
import fcntl
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import unlearn_fast.cli.unfinished_output as unfinished_output
import unlearn_fast.models.mage_generate as mage_generate
from unlearn_fast.cli.main import main
from unlearn_fast.eval import pipeline

from tests.eval.stand_ins import TinyClassifier, TinyInceptionScript, TinyVisual, preprocess_plain, save_png
from tests.helpers import make_class_tree, save_random_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


def _files(folder):
    """Every file under ``folder`` (relative paths, sorted), hidden ones included."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _images(folder):
    return [f for f in _files(folder) if not os.path.basename(f).startswith(".")]


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- generate --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    """A class tree of 2 + 2 test images and two different mage_micro checkpoints."""
    root = tmp_path_factory.mktemp("rt18_gen")
    make_class_tree(root / "data" / "val", ("fa", "ra"), 2, seed=0, size=(37, 45))
    return dict(root=str(root), data=str(root / "data"),
                ckpt=save_random_pretrained(root / "mage.pth", "mage_micro", seed=0),
                other=save_random_pretrained(root / "other.pth", "mage_micro", seed=1))


def _gen_argv(gen_data, out, *extra, ckpt=None):
    return ["generate", "--task", "inpaint", "--ckpt_path", ckpt or gen_data["ckpt"], "--model", "mage_micro",
            "--input_size", "32", "--data_root", gen_data["data"], "--forget_classes", "fa", "--retain_classes", "ra",
            "--device", "cpu", "--batch_size", "1", "--no_progress", "--output", str(out), *extra]


@pytest.fixture
def fast_paint(monkeypatch):
    """paint_batch replaced by a cheap deterministic stand-in; ``calls`` counts the images painted, and
    ``fault[call]`` (a callable) runs at that call."""
    state = dict(calls=0, fault={})

    def paint(model, images, mode, ratio, seed=0, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] in state["fault"]:
            state["fault"][state["calls"]]()
        return (images * (1 - ratio)).clamp(0, 1)
    monkeypatch.setattr(mage_generate, "paint_batch", paint)
    return state


def _interrupt():
    raise KeyboardInterrupt


def test_generate_ctrl_c_keeps_the_finished_images_and_the_rerun_continues(gen_data, tmp_path, fast_paint, capsys):
    full = tmp_path / "full"
    assert main(_gen_argv(gen_data, full)) == 0
    assert fast_paint["calls"] == 8  # 4 test images x 2 settings
    capsys.readouterr()

    out = tmp_path / "out"
    fast_paint.update(calls=0, fault={4: _interrupt})  # Ctrl-C while the 2nd test image's 2nd setting is painted
    assert main(_gen_argv(gen_data, out)) == 130
    line = _one_line(capsys.readouterr().err)
    staging = f"{out}.partial"
    assert "interrupted" in line and f"3 of 8 images are kept in {staging}" in line and "same command" in line
    assert not out.exists() and len(_images(staging)) == 3

    fast_paint.update(calls=0, fault={})
    assert main(_gen_argv(gen_data, out)) == 0
    assert "continu" in capsys.readouterr().out
    assert fast_paint["calls"] == 6  # the 1st test image was kept; the 2nd (half done) and the others are painted
    assert not os.path.exists(staging) and _files(out) == _files(full)  # no record or temporary file left
    for f in _files(full):
        assert (out / f).read_bytes() == (full / f).read_bytes()


def test_generate_sigterm_exits_143_with_one_line(gen_data, tmp_path, fast_paint, capsys):
    out = tmp_path / "out"
    fast_paint["fault"] = {3: lambda: os.kill(os.getpid(), signal.SIGTERM)}
    assert main(_gen_argv(gen_data, out)) == 143  # before: the default SIGTERM killed it without a word
    line = _one_line(capsys.readouterr().err)
    assert "terminated" in line and f"2 of 8 images are kept in {out}.partial" in line
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


def test_generate_stop_in_the_middle_of_an_image_write_leaves_no_half_file(gen_data, tmp_path, fast_paint,
                                                                            monkeypatch, capsys):
    real_save, saves = Image.Image.save, []

    def save_half_then_stop(self, fp, *args, **kwargs):
        saves.append(fp)
        real_save(self, fp, *args, **kwargs)
        if len(saves) == 3:  # the bytes of the 3rd image are out; a Ctrl-C lands before it is complete
            if isinstance(fp, (str, os.PathLike)):
                with open(fp, "r+b") as fh:
                    fh.truncate(os.path.getsize(fp) // 2)
            raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", save_half_then_stop)
    out = tmp_path / "out"
    assert main(_gen_argv(gen_data, out)) == 130
    line = _one_line(capsys.readouterr().err)
    assert "2 of 8 images are kept" in line
    assert _images(f"{out}.partial") == ["forget/fa/center_0.25_0.png", "forget/fa/center_0.5_0.png"]
    for f in _images(f"{out}.partial"):  # each kept file decodes in full
        with Image.open(os.path.join(f"{out}.partial", f)) as img:
            img.load()
    assert not [f for f in _files(f"{out}.partial") if ".tmp" in f]  # the half-written temporary file is gone


def test_generate_disk_full_at_an_image_write_is_one_line_and_keeps_the_rest(gen_data, tmp_path, fast_paint,
                                                                             monkeypatch, capsys):
    real_save, saves = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 5:
            if isinstance(fp, (str, os.PathLike)):
                with open(fp, "wb") as fh:
                    fh.write(b"\x89PNG\r\n")  # what the disk took before it was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    assert main(_gen_argv(gen_data, out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "center_0.25_0.png" in line  # names the file it could not write
    assert f"4 of 8 images are kept in {out}.partial" in line and "same command" in line
    assert len(_images(f"{out}.partial")) == 4 and not [f for f in _files(f"{out}.partial") if ".tmp" in f]


def test_generate_rerun_with_another_checkpoint_or_seed_is_refused_not_mixed(gen_data, tmp_path, fast_paint,
                                                                            capsys):
    out = tmp_path / "out"
    fast_paint["fault"] = {3: _interrupt}
    assert main(_gen_argv(gen_data, out)) == 130
    kept = {f: (tmp_path / "out.partial" / f).read_bytes() for f in _files(f"{out}.partial")}
    capsys.readouterr()
    fast_paint.update(calls=0, fault={})
    for argv, needle in ((_gen_argv(gen_data, out, ckpt=gen_data["other"]), "--ckpt_path"),
                         (_gen_argv(gen_data, out, "--seed", "3"), "--seed"),
                         (_gen_argv(gen_data, out, "--channel_order", "rgb"), "--channel_order"),
                         (_gen_argv(gen_data, out, "--per_class", "1"), "test images")):
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err)
        assert needle in line and f"delete {out}.partial" in line, line
    assert fast_paint["calls"] == 0 and not out.exists()
    assert {f: (tmp_path / "out.partial" / f).read_bytes() for f in _files(f"{out}.partial")} == kept


def test_generate_checkpoint_rewritten_in_place_is_another_checkpoint(gen_data, tmp_path, fast_paint, capsys):
    ckpt = str(tmp_path / "ckpt.pth")
    save_random_pretrained(ckpt, "mage_micro", seed=0)
    out = tmp_path / "out"
    fast_paint["fault"] = {3: _interrupt}
    assert main(_gen_argv(gen_data, out, ckpt=ckpt)) == 130
    save_random_pretrained(ckpt, "mage_micro", seed=1)  # the same path and size, other weights (a later epoch)
    capsys.readouterr()
    assert main(_gen_argv(gen_data, out, ckpt=ckpt)) == 2
    assert "--ckpt_path" in _one_line(capsys.readouterr().err)


def test_generate_refuses_a_partial_folder_another_generate_is_writing(gen_data, tmp_path, fast_paint, capsys):
    out = tmp_path / "out"
    fast_paint["fault"] = {3: _interrupt}
    assert main(_gen_argv(gen_data, out)) == 130
    capsys.readouterr()
    fd = os.open(f"{out}.partial", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running generate holds it
        assert main(_gen_argv(gen_data, out)) == 2
    finally:
        os.close(fd)
    assert "running" in _one_line(capsys.readouterr().err) and fast_paint["calls"] == 3  # nothing painted
    assert main(_gen_argv(gen_data, out)) == 0  # once it is gone, the folder is continued


def test_generate_partial_folder_without_a_record_is_refused(gen_data, tmp_path, fast_paint, capsys):
    out = tmp_path / "out"
    save_png(str(tmp_path / "out.partial" / "forget" / "fa" / "center_0.25_0.png"), np.zeros((4, 4, 3), np.uint8))
    assert main(_gen_argv(gen_data, out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"delete {out}.partial" in line and fast_paint["calls"] == 0


def test_generate_test_image_deleted_mid_run_is_one_line(gen_data, tmp_path, fast_paint, capsys):
    data = tmp_path / "data"
    make_class_tree(data / "val", ("fa", "ra"), 2, seed=0, size=(37, 45))
    fast_paint["fault"] = {2: lambda: os.remove(data / "val" / "ra" / "1.png")}  # listed and checked, then gone
    argv = _gen_argv(gen_data, tmp_path / "out")
    argv[argv.index("--data_root") + 1] = str(data)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "ra/1.png" in line and "6 of 8 images are kept" in line  # the 3 test images before it are done


def test_generate_unreadable_test_image_is_one_line_before_any_work(gen_data, tmp_path, fast_paint, capsys):
    data = tmp_path / "data"
    make_class_tree(data / "val", ("fa", "ra"), 2, seed=0, size=(37, 45))
    (data / "val" / "ra" / "1.png").write_bytes(b"junk")
    argv = _gen_argv(gen_data, tmp_path / "out")
    argv[argv.index("--data_root") + 1] = str(data)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)  # before: "1 of 4 images cannot be read:" and the file on a 2nd line
    assert "ra/1.png" in line and fast_paint["calls"] == 0 and not (tmp_path / "out.partial").exists()


# ---- eval ------------------------------------------------------------------------------------------------

N = 4  # generated images per split and ratio


@pytest.fixture
def eval_tree(tmp_path, monkeypatch):
    """gen/ (center_0.25_ and center_0.5_ of 4 + 4 images), val/ originals, a clean-fid stand-in; the IS and
    CLIP networks are stand-ins whose ``calls`` count the batches and ``fault[call]`` runs at that call."""
    import warnings
    rng = np.random.default_rng(0)
    for split, wnid in (("retain", "n02"), ("forget", "n01")):
        for j in range(N):
            name = f"ILSVRC2012_val_{j + (0 if split == 'retain' else 50):08d}.JPEG"
            rgb = rng.integers(0, 256, (20 + j, 27, 3), dtype=np.uint8)
            save_png(str(tmp_path / "val" / wnid / name), rgb)
            for prefix in ("center_0.25_", "center_0.5_"):
                save_png(str(tmp_path / "gen" / split / wnid / (prefix + name)), np.ascontiguousarray(rgb[..., ::-1]))
    inception = str(tmp_path / "inception-2015-12-05.pt")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyInceptionScript().eval()).save(inception)
    state = dict(calls=0, fault={})
    classifier, visual = TinyClassifier().eval(), TinyVisual().eval()

    def counted(net):
        def forward(x):
            state["calls"] += 1
            if state["calls"] in state["fault"]:
                state["fault"][state["calls"]]()
            return net(x)
        return forward
    monkeypatch.setattr(pipeline, "load_torchvision_inception", lambda path, device, allow_pickle: counted(classifier))
    monkeypatch.setattr(pipeline, "load_clip_visual", lambda path, device: (counted(visual), preprocess_plain))
    state.update(gen=str(tmp_path / "gen"), val=str(tmp_path / "val"), inception=inception, csv=str(tmp_path / "csv"))
    return state


def _eval_argv(tree, *extra, dst=None):
    return ["eval", "--dst", dst or tree["gen"], "--data_root", tree["val"], "--cleanfid_inception", tree["inception"],
            "--splits", "2", "--batch_size", "4", "--csv_dir", tree["csv"], "--device", "cpu", "--no_progress", *extra]


def _csv_lines(tree, name="fid_is_eval_inpaint.csv"):
    path = os.path.join(tree["csv"], name)
    return open(path).read().splitlines() if os.path.exists(path) else []


def test_eval_ctrl_c_says_which_rows_were_appended(eval_tree, capsys):
    eval_tree["fault"] = {3: _interrupt}  # IS batches: 1 retain + 1 forget per setting; the 3rd is center_0.5_'s
    assert main(_eval_argv(eval_tree)) == 130
    line = _one_line(capsys.readouterr().err)
    csv = os.path.join(eval_tree["csv"], "fid_is_eval_inpaint.csv")
    assert "interrupted" in line and f"1 of 2 rows were appended to {csv}" in line
    rows = _csv_lines(eval_tree)
    assert len(rows) == 1 and rows[0].startswith(os.path.join(eval_tree["gen"], "center_0.25_\t"))
    assert len(rows[0].split("\t")) == 7


def test_eval_sigterm_exits_143_with_one_line(eval_tree, capsys):
    eval_tree["fault"] = {2: lambda: os.kill(os.getpid(), signal.SIGTERM)}
    assert main(_eval_argv(eval_tree, "--clip")) == 143  # before: killed on the spot, without a word
    line = _one_line(capsys.readouterr().err)
    assert "terminated" in line and "0 of 2 rows" in line
    assert _csv_lines(eval_tree, "clip_cosine_inpaint.csv") == []


def test_eval_disk_full_at_the_csv_write_keeps_the_earlier_rows(eval_tree, monkeypatch, capsys):
    from unlearn_fast import atomic_files
    real, writes = atomic_files.atomic_write_with, []

    def write(path, fn, mode=None):
        writes.append(path)
        if len(writes) == 2:
            raise atomic_files.OutputWriteError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
        return real(path, fn, mode=mode)
    monkeypatch.setattr(atomic_files, "atomic_write_with", write)
    assert main(_eval_argv(eval_tree)) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "fid_is_eval_inpaint.csv" in line
    assert "1 of 2 rows were appended" in line
    assert len(_csv_lines(eval_tree)) == 1


def test_eval_unreadable_generated_image_mid_run_says_what_was_appended(eval_tree, capsys):
    bad = os.path.join(eval_tree["gen"], "forget", "n01", "center_0.5_ILSVRC2012_val_00000051.JPEG")
    with open(bad, "r+b") as fh:  # a truncated image, as a killed cv2.imwrite of the reference leaves it
        fh.truncate(os.path.getsize(bad) // 2)
    assert main(_eval_argv(eval_tree)) == 2
    line = _one_line(capsys.readouterr().err)
    assert bad in line and "1 of 2 rows were appended" in line
    assert len(_csv_lines(eval_tree)) == 1


def test_eval_image_deleted_after_listing_is_one_line(eval_tree, capsys):
    gone = os.path.join(eval_tree["gen"], "retain", "n02", "center_0.5_ILSVRC2012_val_00000002.JPEG")
    eval_tree["fault"] = {1: lambda: os.remove(gone)}
    assert main(_eval_argv(eval_tree)) == 2
    line = _one_line(capsys.readouterr().err)
    assert gone in line and "1 of 2 rows were appended" in line


def test_eval_refuses_the_partial_folder_of_a_stopped_generate(gen_data, tmp_path, fast_paint, eval_tree, capsys):
    out = tmp_path / "out"
    fast_paint["fault"] = {3: _interrupt}
    assert main(_gen_argv(gen_data, out)) == 130
    capsys.readouterr()
    assert main(_eval_argv(eval_tree, dst=f"{out}.partial")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "generate" in line and "unfinished" in line and eval_tree["calls"] == 0


def test_eval_empty_generated_folder_is_one_line(eval_tree, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(_eval_argv(eval_tree, dst=str(tmp_path / "empty"))) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no generated" in line and eval_tree["calls"] == 0


def test_eval_shows_a_progress_bar_of_the_images(eval_tree, capsys):
    argv = [a for a in _eval_argv(eval_tree) if a != "--no_progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    # tqdm's bar (before: hours of FID with no sign of life) over 2 settings x 2 splits x 4 images, FID + IS
    # each, and the 8 originals once
    assert "eval" in err and "|" in err and "/40 " in err


# ---- palette-test ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def places(tmp_path_factory):
    from tests.cli.test_palette_official_outputs import CLASSES
    from tests.helpers import make_places_tree
    return make_places_tree(tmp_path_factory.mktemp("rt18_places"), CLASSES, (("train_256", 1), ("val_256", 1)),
                            ext="jpg", size=(36, 40), seed=1, first=1)


def _palette_test(places, tmp_path, name, *extra, batch=2, ckpt=None):
    """``unlearn-fast palette-test`` of a copy of ``ckpt`` (default: the fixture's) in ``tmp_path/name``: 5 test
    images in batches of ``batch``, 3 sampler steps. Returns (exit code, the results folder)."""
    from tests.cli.test_palette_official_outputs import _config, _test_argv, _write
    copy = tmp_path / name / "16_Network.pth"
    if not copy.exists():
        copy.parent.mkdir(parents=True)
        copy.write_bytes(open(ckpt or places["ckpt"], "rb").read())
    cfg = _write(tmp_path, _config(places, test_batch=batch), f"{name}.json")
    code = main(["palette-test", *_test_argv(places, cfg, copy, "--max_images", "5", *extra)])
    return code, os.path.join(str(copy)[:-len(".pth")], "results", "test", "0", "0.50")


@pytest.fixture
def counted_restore(monkeypatch):
    """palette_restore counting its batches; ``fault[call]`` runs at that call."""
    from unlearn_fast.cli import palette_command
    real, state = palette_command.palette_restore, dict(calls=0, fault={})

    def restore(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] in state["fault"]:
            state["fault"][state["calls"]]()
        return real(*args, **kwargs)
    monkeypatch.setattr(palette_command, "palette_restore", restore)
    return state


def _test_mae(results):
    log = open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(results)))),
                            "test.log")).read()
    return [line.split("test/mae: ")[1] for line in log.splitlines() if "test/mae: " in line]


def test_palette_test_ctrl_c_then_the_rerun_continues_to_the_same_images(places, tmp_path, counted_restore, capsys):
    code, full = _palette_test(places, tmp_path, "full")
    assert code == 0 and counted_restore["calls"] == 3
    capsys.readouterr()

    counted_restore.update(calls=0, fault={2: _interrupt})  # Ctrl-C while the 2nd batch is sampled
    code, results = _palette_test(places, tmp_path, "stopped")
    assert code == 130
    line = _one_line(capsys.readouterr().err)  # before: its own line on stdout, then main's "interrupted"
    assert "interrupted" in line and f"2 of 5 images are kept in {results}.partial" in line and "same command" in line
    assert len(_images(f"{results}.partial")) == 8 and not os.path.exists(results)

    counted_restore.update(calls=0, fault={})
    code, results = _palette_test(places, tmp_path, "stopped")  # before: refused until the folder was deleted
    assert code == 0 and counted_restore["calls"] == 2 and "continuing" in capsys.readouterr().out
    assert _files(results) == _files(full) and not os.path.exists(f"{results}.partial")
    for f in _files(full):  # the same pixels as the uninterrupted test (noise keyed by the batch index)
        assert np.array_equal(np.asarray(Image.open(os.path.join(results, f))),
                              np.asarray(Image.open(os.path.join(full, f)))), f
    assert _test_mae(results) == _test_mae(full)  # test/mae over all 3 batches, the first from the stopped run


def test_palette_test_sigterm_exits_143_with_one_line(places, tmp_path, counted_restore, capsys):
    counted_restore["fault"] = {2: lambda: os.kill(os.getpid(), signal.SIGTERM)}
    code, results = _palette_test(places, tmp_path, "t")
    assert code == 143
    line = _one_line(capsys.readouterr().err)
    assert "terminated" in line and "2 of 5 images are kept" in line


def test_palette_test_rerun_with_another_checkpoint_or_batch_is_refused(places, tmp_path, counted_restore, capsys):
    counted_restore["fault"] = {2: _interrupt}
    code, results = _palette_test(places, tmp_path, "t")
    assert code == 130
    kept = {f: open(os.path.join(f"{results}.partial", f), "rb").read() for f in _files(f"{results}.partial")}
    capsys.readouterr()
    counted_restore.update(calls=0, fault={})
    code, _ = _palette_test(places, tmp_path, "t", batch=3)  # batch i's noise is drawn from (seed, i)
    assert code == 2 and "batch size" in _one_line(capsys.readouterr().err)
    other = tmp_path / "other.pth"
    torch.save({k: v + 0.01 if v.is_floating_point() else v
                for k, v in torch.load(places["ckpt"], weights_only=True).items()}, other)
    (tmp_path / "t" / "16_Network.pth").write_bytes(other.read_bytes())  # a later epoch written over the file
    code, _ = _palette_test(places, tmp_path, "t")
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--ckpt" in line and f"delete {results}.partial" in line
    assert counted_restore["calls"] == 0
    assert {f: open(os.path.join(f"{results}.partial", f), "rb").read() for f in _files(f"{results}.partial")} == kept


def test_palette_test_disk_full_is_one_line_and_leaves_no_half_image(places, tmp_path, monkeypatch, capsys):
    real_save, saves = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 10:  # the 2nd batch's 2nd image
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    code, results = _palette_test(places, tmp_path, "t")
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "2 of 5 images are kept" in line
    assert not [f for f in _files(f"{results}.partial") if ".tmp" in f]


def test_eval_refuses_a_stopped_palette_test(places, tmp_path, counted_restore, eval_tree, capsys):
    counted_restore["fault"] = {2: _interrupt}
    code, results = _palette_test(places, tmp_path, "t")
    assert code == 130
    capsys.readouterr()
    for dst in (f"{results}.partial", os.path.join(str(tmp_path), "t", "16_Network")):
        assert main(["eval", "--dst", dst, "--palette_class_list", places["class_list"], "--cleanfid_inception",
                     eval_tree["inception"], "--device", "cpu", "--no_progress", "--csv_dir", eval_tree["csv"]]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "unfinished" in line and "palette-test" in line, line


# ---- tsne ------------------------------------------------------------------------------------------------

def test_tsne_disk_full_at_the_figure_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    rng = np.random.default_rng(0)
    for name in ("center_8_forget", "center_8_retain", "original_forget", "original_retain"):
        emb = rng.standard_normal((60, 8))
        np.save(str(tmp_path / f"{name}_clip_norm_5k.npy"), emb / np.linalg.norm(emb, axis=1, keepdims=True))
    monkeypatch.chdir(tmp_path)
    argv = ["tsne", "--ckpt_folder", str(tmp_path), "--stride", "5"]
    assert main(argv) == 0
    before = (tmp_path / "vqgan_mask_ratio_tsne.png").read_bytes()
    capsys.readouterr()
    real = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        fmt = kwargs.get("format") or str(fname).rsplit(".", 1)[-1]
        if fmt != "png":
            return real(self, fname, *args, **kwargs)
        if isinstance(fname, (str, os.PathLike)):
            with open(fname, "wb") as fh:
                fh.write(b"\x89PNG\r\n")
        else:
            fname.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, "savefig", savefig)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "vqgan_mask_ratio_tsne.png" in line  # before: no file named
    assert (tmp_path / "vqgan_mask_ratio_tsne.png").read_bytes() == before  # before: a truncated figure
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


# ---- report ----------------------------------------------------------------------------------------------

def test_report_skips_half_written_temporaries_and_figures_gone_since_the_listing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text('{"epoch": 0, "train_loss": 1.0}\n')
    save_png(str(run / "grid.png"), np.zeros((4, 4, 3), np.uint8))
    (run / ".tmp-abc123vqgan_mask_ratio_tsne.png").write_bytes(b"\x89PNG\r\n")  # a tsne killed mid-write
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: real_isfile(p) or os.path.basename(p) == "gone.png")
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": real_listdir(p) + (["gone.png"] if str(p) == str(run) else []))
    assert main(["report", str(run)]) == 0  # before: "No such file or directory: .../gone.png", exit 2
    monkeypatch.undo()
    capsys.readouterr()
    page = (run / "report.html").read_text()
    assert 'alt="grid.png"' in page and ".tmp-" not in page and "gone.png" not in page


def test_generate_disk_full_at_the_record_leaves_no_folder_a_rerun_would_refuse(gen_data, tmp_path, fast_paint,
                                                                                monkeypatch, capsys):
    from unlearn_fast.atomic_files import OutputWriteError

    def full(path, text):
        raise OutputWriteError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
    monkeypatch.setattr(unfinished_output, "atomic_write_text", full)
    out = tmp_path / "out"
    assert main(_gen_argv(gen_data, out)) == 2
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    assert not os.path.exists(f"{out}.partial")  # before: an empty .partial that the rerun refused
    monkeypatch.undo()
    assert main(_gen_argv(gen_data, out)) == 0


def test_generate_output_named_like_an_unfinished_one_is_refused(gen_data, tmp_path, fast_paint, capsys):
    out = tmp_path / "gen.partial"  # eval refuses such a folder as an unfinished generate's
    assert main(_gen_argv(gen_data, out)) == 2
    assert "--output" in _one_line(capsys.readouterr().err) and not out.exists() and fast_paint["calls"] == 0


@pytest.fixture
def own_places(tmp_path):
    """A places tree of the test's own (its images are deleted or broken)."""
    from tests.cli.test_palette_official_outputs import CLASSES
    from tests.helpers import make_places_tree
    return make_places_tree(tmp_path / "own", CLASSES, (("train_256", 1), ("val_256", 1)), ext="jpg", size=(36, 40),
                            seed=1, first=1)


def _fifth_test_image(places):
    from unlearn_fast.train.palette_data import read_class_list, select_places365_test
    items = select_places365_test(places["root"], read_class_list(places["class_list"]), 100)
    return items[4][0]


def test_palette_test_image_deleted_mid_run_is_one_line(own_places, tmp_path, counted_restore, capsys):
    gone = _fifth_test_image(own_places)
    counted_restore["fault"] = {1: lambda: os.remove(gone)}  # listed and checked, then gone before its batch
    code, results = _palette_test(own_places, tmp_path, "t")
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert os.path.basename(gone) in line and "4 of 5 images are kept" in line


def test_palette_test_unreadable_test_image_is_one_line_before_any_sampling(own_places, tmp_path, counted_restore,
                                                                           capsys):
    bad = _fifth_test_image(own_places)
    with open(bad, "r+b") as fh:
        fh.truncate(os.path.getsize(bad) // 2)
    code, results = _palette_test(own_places, tmp_path, "t")
    assert code == 2  # before: found at the 3rd batch, after sampling the first two
    line = _one_line(capsys.readouterr().err)
    assert os.path.basename(bad) in line and counted_restore["calls"] == 0 and not os.path.exists(f"{results}.partial")


def test_generate_rerun_repaints_an_image_a_crash_left_empty(gen_data, tmp_path, fast_paint, capsys):
    out = tmp_path / "out"
    fast_paint["fault"] = {3: _interrupt}
    assert main(_gen_argv(gen_data, out)) == 130
    open(os.path.join(f"{out}.partial", "forget", "fa", "center_0.5_0.png"), "wb").close()  # renamed, never synced
    fast_paint.update(calls=0, fault={})
    assert main(_gen_argv(gen_data, out)) == 0
    assert fast_paint["calls"] == 8 and os.path.getsize(out / "forget" / "fa" / "center_0.5_0.png") > 0
