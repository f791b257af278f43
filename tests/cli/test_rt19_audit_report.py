"""Red team of ``unlearn-fast audit RUN_DIR`` and ``unlearn-fast report RUN_DIR``: bad runs, checkpoints, data and
devices are one line on stderr (exit 2), nothing is half-written or destroyed, the AUC is what it claims."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pytest
import torch

from unlearn_fast.cli import audit_command
from unlearn_fast.cli.main import main
from unlearn_fast.eval import report as report_module
from unlearn_fast.eval.report import render_report, write_report

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch unlearning run on random images (cat, dog forgotten; bird retained; 5 per class trained, 3 unseen)."""
    root = make_class_tree(tmp_path_factory.mktemp("data") / "train", ("cat", "dog", "bird"), 8, seed=2)
    pre = save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pretrained.pth")
    out = tmp_path_factory.mktemp("out")
    assert main(micro_unlearn_argv(root, pre, out, "--forget_alpha", "1.0", "--lr", "3e-3", per_class=5)) == 0
    return dict(root=str(root), pretrained=str(pre), run_dir=only_run_dir(out))


@pytest.fixture
def run_copy(run, tmp_path):
    """A copy of the run's directory (opt.yaml, log.txt, checkpoints) that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(run["run_dir"], dst)
    return str(dst)


def fails_in_one_line(argv, capsys, *needles, rc=2) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == rc, f"exit {code}: {err}"
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("unlearn-fast: error: ") or rc != 2, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert len(err) < 400, f"a wall of text: {len(err)} characters"
    return err


def edit_opt_yaml(run_dir: str, **changes) -> None:
    path = os.path.join(run_dir, "opt.yaml")
    opt = json.load(open(path))
    opt.update(changes)
    with open(path, "w") as f:
        json.dump(opt, f)


# ---- the audit's numbers ------------------------------------------------------------------------------------------

def test_audit_auc_is_p_training_image_has_lower_error_ties_half(run, run_copy, monkeypatch, capsys):
    """Hand-made errors through the whole command: before, training [0.1, 0.3] vs unseen [0.2, 0.3] ->
    pairs 0.1<0.2, 0.1<0.3 (2 wins), 0.3>0.2 (0), 0.3=0.3 (a tie, 1/2): AUC 2.5 / 4; after, all equal: 0.5."""
    teacher = torch.load(run["pretrained"], weights_only=True)["model"]

    def fake_errors(model, images, task, *a, **k):
        assert images.shape[0] == 4  # --images 2: 2 trained + 2 unseen, trained first
        if all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items()):
            return torch.tensor([0.1, 0.3, 0.2, 0.3], dtype=torch.float64)
        return torch.full((4,), 0.5, dtype=torch.float64)
    monkeypatch.setattr(audit_command, "per_image_errors", fake_errors)
    assert main(["audit", run_copy, "--images", "2", "--device", "cpu", "--no_progress"]) == 0
    result = json.load(open(os.path.join(run_copy, "forget_audit.json")))
    for key in ("forget", "retain_control"):
        assert result[key]["before"]["auc"] == pytest.approx(0.625, abs=1e-12)
        assert result[key]["after"]["auc"] == 0.5
        assert result[key]["before"]["mean_error_forget_train"] == pytest.approx(0.2)
        assert result[key]["before"]["mean_error_unseen"] == pytest.approx(0.25)
    assert "0.625" in capsys.readouterr().out


def test_audit_loads_images_in_chunks_with_the_same_numbers(run, run_copy, monkeypatch):
    """--images 5000 on ImageNet would hold 10,000 images of a set in memory at once: images are loaded a chunk at
    a time, and the numbers do not depend on the chunk size."""
    whole = audit_command.run_audit(run_copy, images=5, device="cpu")
    sizes = []
    real_load = audit_command.load_eval_images

    def recording_load(paths, size):
        sizes.append(len(paths))
        return real_load(paths, size)
    monkeypatch.setattr(audit_command, "load_eval_images", recording_load)
    monkeypatch.setattr(audit_command, "AUDIT_CHUNK", 3)
    chunked = audit_command.run_audit(run_copy, images=5, device="cpu")
    # forget: 5 trained + 5 of the 6 unseen; retain: 5 trained + its 3 unseen
    assert sizes and max(sizes) <= 3 and sum(sizes) == 5 + 5 + 5 + 3
    for key in ("forget", "retain_control"):
        for when in ("before", "after"):
            for stat, value in whole[key][when].items():
                assert chunked[key][when][stat] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, when, stat)


def test_audit_shows_progress_and_says_when_fewer_images_exist(run_copy, capsys):
    assert main(["audit", run_copy, "--images", "1000", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "audit" in captured.err and "Traceback" not in captured.err  # the progress bar on stderr
    # 10 forget-class training files and 6 unseen exist: the user asked for 1000
    assert "fewer than --images 1000" in captured.out
    assert main(["audit", run_copy, "--images", "1", "--device", "cpu", "--no_progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "1 trained and 1 unseen" in captured.out and "coarse" in captured.out  # an AUC of 0, 0.5 or 1 only


# ---- bad run directories -------------------------------------------------------------------------------------------

def test_run_dir_missing_or_a_file_or_a_palette_run(tmp_path, capsys):
    fails_in_one_line(["audit", str(tmp_path / "nope")], capsys, "nope does not exist")
    (tmp_path / "afile").write_text("x")
    fails_in_one_line(["audit", str(tmp_path / "afile")], capsys, "afile is a file", "opt.yaml")
    palette = tmp_path / "palette_run"
    palette.mkdir()
    (palette / "config.json").write_text("{}")
    fails_in_one_line(["audit", str(palette)], capsys, "Palette", "MAE")


@pytest.mark.parametrize("case, needles", [
    ("yaml_of_another_tool", ("opt.yaml", "not an unlearn-fast opt.yaml")),
    ("palette_model", ("opt.yaml", "palette_micro", "MAE")),
    ("unknown_model", ("opt.yaml", "resnet50")),
    ("seed_null", ("opt.yaml", "seed")),
    ("input_size_text", ("opt.yaml", "input_size")),
])
def test_damaged_or_foreign_opt_yaml_is_one_line(run_copy, capsys, case, needles):
    if case == "yaml_of_another_tool":
        with open(os.path.join(run_copy, "opt.yaml"), "w") as f:
            f.write("weights: yolov5s.pt\nepochs: 300\n")
    else:
        edit_opt_yaml(run_copy, **{"palette_model": {"model": "palette_micro"},
                                   "unknown_model": {"model": "resnet50"},
                                   "seed_null": {"seed": None},
                                   "input_size_text": {"input_size": "big"}}[case])
    before = sorted(os.listdir(run_copy))
    err = fails_in_one_line(["audit", run_copy, "--device", "cpu"], capsys, *needles)
    assert "--model" not in err  # no flag the audit does not have
    assert sorted(os.listdir(run_copy)) == before


def test_no_checkpoint_yet_names_what_is_there(run_copy, capsys):
    for name in os.listdir(run_copy):
        if name.startswith("checkpoint-"):
            os.remove(os.path.join(run_copy, name))
    open(os.path.join(run_copy, ".tmp-x1checkpoint-0.pth"), "wb").write(b"half")  # a save in progress
    fails_in_one_line(["audit", run_copy], capsys, "no checkpoint-<epoch>.pth yet", "--checkpoint")
    with open(os.path.join(run_copy, "checkpoint-last.pth"), "wb") as f:
        f.write(b"x")
    fails_in_one_line(["audit", run_copy], capsys, "checkpoint-last.pth")


# ---- bad checkpoints -------------------------------------------------------------------------------------------------

def test_checkpoint_is_a_folder_or_damaged(run_copy, tmp_path, capsys):
    fails_in_one_line(["audit", run_copy, "--checkpoint", str(tmp_path), "--device", "cpu"], capsys, "is a folder")
    ckpt = os.path.join(run_copy, "checkpoint-0.pth")
    data = open(ckpt, "rb").read()
    with open(ckpt, "wb") as f:
        f.write(data[:4000])
    fails_in_one_line(["audit", run_copy, "--device", "cpu", "--no_progress"], capsys, "checkpoint-0.pth")
    assert not os.path.exists(os.path.join(run_copy, "forget_audit.json"))


def test_checkpoint_of_another_model_family_is_one_short_line(run_copy, tmp_path, capsys):
    mage = save_random_pretrained(tmp_path / "mage.pth", "mage_micro")
    err = fails_in_one_line(["audit", run_copy, "--checkpoint", mage, "--device", "cpu", "--no_progress"], capsys,
                            "mage_micro", "mae_micro", "mage.pth")
    assert "missing keys" not in err
    err = fails_in_one_line(["audit", run_copy, "--teacher", mage, "--device", "cpu", "--no_progress"], capsys,
                            "--teacher", "mage_micro", "mae_micro")
    assert not os.path.exists(os.path.join(run_copy, "forget_audit.json"))


def test_checkpoint_of_another_run_is_refused(run_copy, tmp_path, capsys):
    """Its training images are not this run's: the audit would compare the wrong images and write the numbers here."""
    ckpt = torch.load(os.path.join(run_copy, "checkpoint-0.pth"), weights_only=False)
    ckpt["args"].update(forget_classes="bird", retain_classes="cat,dog", output_dir="/elsewhere/other_run")
    other = tmp_path / "other_checkpoint-0.pth"
    torch.save(ckpt, other)
    fails_in_one_line(["audit", run_copy, "--checkpoint", str(other), "--device", "cpu"], capsys,
                      "another run", "forget_classes", "/elsewhere/other_run")
    assert not os.path.exists(os.path.join(run_copy, "forget_audit.json"))
    # the same run's args after a move (another data_path / output_dir) are this run
    ckpt["args"].update(forget_classes="cat,dog", retain_classes="bird", data_path="/moved")
    torch.save(ckpt, other)
    assert main(["audit", run_copy, "--checkpoint", str(other), "--images", "2", "--device", "cpu",
                 "--no_progress"]) == 0


# ---- data and device -------------------------------------------------------------------------------------------------

def test_data_moved_says_where_it_was_recorded(run_copy, tmp_path, capsys):
    edit_opt_yaml(run_copy, data_path=str(tmp_path / "gone"))
    fails_in_one_line(["audit", run_copy, "--device", "cpu"], capsys, "gone", "opt.yaml", "--data_path")


@pytest.mark.parametrize("device", ["mps", "xla", "cuda:x"])
def test_unsupported_device_is_one_line(run_copy, capsys, device):
    fails_in_one_line(["audit", run_copy, "--device", device], capsys, "--device")


# ---- interrupted, read-only ------------------------------------------------------------------------------------------

def test_ctrl_c_during_the_audit_keeps_the_earlier_audit(run_copy, monkeypatch, capsys):
    earlier = os.path.join(run_copy, "forget_audit.json")
    with open(earlier, "w") as f:
        f.write('{"earlier": true}\n')

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(audit_command, "per_image_errors", interrupted)
    assert main(["audit", run_copy, "--device", "cpu", "--no_progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "unlearn-fast: interrupted" and "Traceback" not in err
    assert open(earlier).read() == '{"earlier": true}\n'
    assert not [n for n in os.listdir(run_copy) if n.startswith(".tmp")]


def test_read_only_run_dir_still_prints_the_numbers(run_copy, monkeypatch, capsys):
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **k):  # a read-only folder, also where chmod is ignored (root)
        if dir is not None and os.path.abspath(dir) == os.path.abspath(run_copy):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code = main(["audit", run_copy, "--images", "2", "--device", "cpu", "--no_progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "forget classes" in captured.out and "AUC before" in captured.out
    assert captured.err.count("\n") == 1 and "forget_audit.json" in captured.err and "Traceback" not in captured.err
    assert "not saved" in captured.err
    assert not os.path.exists(os.path.join(run_copy, "forget_audit.json"))


# ---- report ----------------------------------------------------------------------------------------------------------

def test_report_says_which_files_it_could_not_read(run_copy, capsys):
    with open(os.path.join(run_copy, "opt.yaml"), "wb") as f:
        f.write(b'{"model": "mae_micro", \xff')  # damaged and not UTF-8
    with open(os.path.join(run_copy, "forget_audit.json"), "wb") as f:
        f.write(b"\xff\xfe")
    assert main(["report", run_copy]) == 0
    err = capsys.readouterr().err
    assert "opt.yaml" in err and "forget_audit.json" in err and "Traceback" not in err
    assert err.count("\n") == 2  # one warning a file
    page = open(os.path.join(run_copy, "report.html"), encoding="utf-8").read()
    assert "opt.yaml is unreadable" in page and "forget_audit.json is unreadable" in page


def test_report_of_an_audit_file_without_numbers_says_so(tmp_path):
    (tmp_path / "log.txt").write_text('{"train_loss": 1.0, "epoch": 0}\n')
    (tmp_path / "forget_audit.json").write_text('{"forget": {"before": {"auc": 0.5}, "after": 3}}')
    page = render_report(str(tmp_path))
    assert "holds no audit numbers" in page


def test_report_damaged_metrics_says_what_to_do_and_keeps_the_old_report(tmp_path, capsys):
    (tmp_path / "log.txt").write_text('{"train_loss": 1.0, "epoch": 0}\n')
    assert main(["report", str(tmp_path)]) == 0
    old = (tmp_path / "report.html").read_bytes()
    (tmp_path / "metrics.json").write_text('{"after": ')
    fails_in_one_line(["report", str(tmp_path)], capsys, "metrics.json", "move it aside")
    assert (tmp_path / "report.html").read_bytes() == old


@pytest.mark.parametrize("victim", ["log.txt", "opt.yaml", "notes.md"])
def test_report_out_never_overwrites_a_file_that_is_not_a_report(run_copy, capsys, victim):
    path = os.path.join(run_copy, victim)
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("my notes\n")
    kept = open(path, "rb").read()
    fails_in_one_line(["report", run_copy, "--out", path], capsys, victim, "not an HTML")
    assert open(path, "rb").read() == kept


def test_report_twice_rewrites_its_own_page_atomically(run_copy, monkeypatch):
    first = write_report(run_copy)
    page = open(first, "rb").read()
    written = []
    real = report_module.atomic_write_text
    monkeypatch.setattr(report_module, "atomic_write_text", lambda p, t: (written.append(p), real(p, t)))
    assert write_report(run_copy) == first and written == [first]
    assert open(first, "rb").read() == page
    assert not [n for n in os.listdir(run_copy) if n.startswith(".tmp")]
    other = os.path.join(run_copy, "other.html")  # a page of ours under another name is replaced too
    with open(other, "w") as f:
        f.write("<!DOCTYPE html>\n<html><body>old</body></html>\n")
    assert write_report(run_copy, other) == other and "unlearn_fast run" in open(other).read()


def test_report_title_of_dot_is_the_folder_name(run_copy, monkeypatch):
    monkeypatch.chdir(run_copy)
    assert "<title>unlearn_fast run: run</title>" in render_report(".")


def test_report_of_a_huge_log_stays_small(tmp_path):
    lines = [json.dumps({"train_loss": 1.0 / (e + 1), "train_lr": 1e-4, "epoch": e}) for e in range(20000)]
    lines[12345] = json.dumps({"train_loss": 99.0, "train_lr": 1e-4, "epoch": 12345})  # a spike must survive
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n" + "x" * (3 << 20) + "\n")  # and a 3 MB garbage line
    eval_rows = [json.dumps({"epoch": e, "retain_mse": 0.1, "forget_mse": 0.2}) for e in range(5000)]
    (tmp_path / "eval_log.txt").write_text("\n".join(eval_rows) + "\n")
    page = render_report(str(tmp_path))
    assert len(page) < 2_000_000
    curves = re.findall(r'points="([^"]+)"', page)
    assert curves and all(len(points.split()) <= 2000 for points in curves)
    assert "1 unreadable line" in page
    loss_ys = [float(p.split(",")[1]) for p in curves[0].split()]  # train_loss, the first curve
    assert min(loss_ys) == pytest.approx(30.0, abs=0.1)  # the chart's top edge (y = 30 px): the 99.0 spike is drawn
    assert "rows left out" in page and page.count("<tr>") < 600


def test_mage_run_whose_vqgan_file_moved_is_audited(run_copy, tmp_path, capsys):
    """Every checkpoint of a MAGE run holds the vqgan.* weights: the VQGAN file opt.yaml names is not needed (it
    may have moved, and the audit has no flag to say where)."""
    mage = save_random_pretrained(tmp_path / "mage.pth", "mage_micro")
    edit_opt_yaml(run_copy, model="mage_micro", teacher_checkpoint=mage, vqgan_ckpt=str(tmp_path / "gone.ckpt"))
    for name in os.listdir(run_copy):
        if name.startswith("checkpoint-"):
            os.remove(os.path.join(run_copy, name))
    shutil.copy(mage, os.path.join(run_copy, "checkpoint-0.pth"))
    assert main(["audit", run_copy, "--images", "2", "--device", "cpu", "--no_progress"]) == 0, capsys.readouterr().err
    result = json.load(open(os.path.join(run_copy, "forget_audit.json")))
    assert result["config"]["model"] == "mage_micro"
    assert result["forget"]["before"] == result["forget"]["after"]  # the same weights before and after


def test_report_names_a_huge_image_instead_of_embedding_it(tmp_path, monkeypatch):
    from PIL import Image
    (tmp_path / "log.txt").write_text('{"train_loss": 1.0, "epoch": 0}\n')
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "small.png")
    Image.effect_noise((256, 256), 64).convert("RGB").save(tmp_path / "huge.png")  # noise: ~190 KB
    monkeypatch.setattr(report_module, "MAX_EMBEDDED_IMAGE_BYTES", 100_000)
    warnings = []
    page = render_report(str(tmp_path), warn=warnings.append)
    assert page.count("<img") == 1 and 'alt="small.png"' in page
    assert "huge.png" in page and "too large to embed" in page and len(page) < 60_000
    assert len(warnings) == 1 and "huge.png" in warnings[0]


def test_report_of_a_palette_run_with_a_damaged_config_says_so(tmp_path):
    (tmp_path / "train.log").write_text("26-11-27 14:58:50.419 - INFO: train/mse_loss: 1.5\t\n")
    (tmp_path / "config.json").write_bytes(b'{"name": "x", \xff')
    warnings = []
    page = render_report(str(tmp_path), warn=warnings.append)
    assert "config.json is unreadable" in page and len(warnings) == 1 and "config.json" in warnings[0]
    assert "train/mse_loss" in page  # the rest is still reported


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_report_names_a_missing_folder_or_a_file(tmp_path, capsys, kind):
    target = tmp_path / "run"
    if kind == "file":
        target.write_text("not a folder")
    fails_in_one_line(["report", str(target)], capsys, "does not exist" if kind == "missing" else "is a file")
