"""Red team of ``unlearn-fast audit RUN_DIR``: the audit rebuilt the run's training files from opt.yaml's flags and the
data folder *as it is now*, so an image added to (or removed from) a forget class folder since the run silently moved
images between the "forget_train" and "unseen" groups. A run now records its training files in
``RUN_DIR/data_split.json`` (per split: the count and a sha256 of the sorted paths relative to the data folder), and
the audit refuses a data folder that gives other files; a run without the record is audited as before, with a notice."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from PIL import Image

from unlearn_fast.cli import audit_command
from unlearn_fast.cli.main import main
from unlearn_fast.train.data_split import select_unlearning_files

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained

FORGET, RETAIN, PER_CLASS = ["cat", "dog"], ["bird"], 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch unlearning run on random images (cat, dog forgotten; bird retained; 5 per class trained, 3 unseen)."""
    root = make_class_tree(tmp_path_factory.mktemp("data") / "train", ("cat", "dog", "bird"), 8, seed=2)
    pre = save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pretrained.pth")
    out = tmp_path_factory.mktemp("out")
    assert main(micro_unlearn_argv(root, pre, out, "--forget_alpha", "1.0", per_class=PER_CLASS)) == 0
    return dict(root=str(root), pretrained=str(pre), out=str(out), run_dir=only_run_dir(out))


@pytest.fixture
def copies(run, tmp_path):
    """A copy of the run's data folder (that a test may change) and of its run directory, whose opt.yaml points at
    the copied data (as if the run had been made on it)."""
    data = tmp_path / "data" / "train"
    shutil.copytree(run["root"], data)
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    opt_path = run_dir / "opt.yaml"
    opt = json.loads(opt_path.read_text())
    opt["data_path"] = str(data)
    opt_path.write_text(json.dumps(opt, indent=4) + "\n")
    return str(data), str(run_dir)


def _digest(rel_paths) -> str:
    return hashlib.sha256("".join(p + "\n" for p in sorted(set(rel_paths))).encode()).hexdigest()


def _add_image(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
    return path


def _one_error_line(argv, capsys, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("unlearn-fast: error: "), err
    assert len(err) < 400, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


# ---- what a run records -------------------------------------------------------------------------------------------

def test_run_records_its_training_files_relative_to_the_data_folder(run):
    path = os.path.join(run["run_dir"], "data_split.json")
    record = json.load(open(path))
    items = select_unlearning_files(run["root"], FORGET, RETAIN, PER_CLASS, seed=0)
    forget = [os.path.relpath(p, run["root"]) for p, lab in items if lab < 0]
    retain = [os.path.relpath(p, run["root"]) for p, lab in items if lab > 0]
    assert record["data_path"] == run["root"]
    assert record["forget"] == {"count": 2 * PER_CLASS, "sha256": _digest(forget)}
    assert record["retain"] == {"count": PER_CLASS, "sha256": _digest(retain)}
    opt = json.load(open(os.path.join(run["run_dir"], "opt.yaml")))
    assert not [k for k in opt if "data_split" in k or "sha256" in k]  # opt.yaml keeps the official trainer's keys
    assert not [n for n in os.listdir(run["run_dir"]) if n.startswith(".tmp")]


# ---- the audit checks it ------------------------------------------------------------------------------------------

def test_image_added_to_a_forget_class_after_the_run_is_refused_not_silently_audited(copies, capsys):
    data, run_dir = copies
    added = _add_image(os.path.join(data, "cat"), "3_new.png")  # one the seeded per-class pick now takes
    # the fault: rebuilt from the flags, the new image counts as one the model trained on
    rebuilt = {p for p, lab in select_unlearning_files(data, FORGET, RETAIN, PER_CLASS, seed=0) if lab < 0}
    assert added in rebuilt
    before = sorted(os.listdir(run_dir))
    err = _one_error_line(["audit", run_dir, "--images", "2", "--device", "cpu", "--no_progress"], capsys,
                          "forget split", "10 files recorded, 10 now (other files)", "data_split.json", "--data_path")
    assert "restore" in err
    assert sorted(os.listdir(run_dir)) == before  # no forget_audit.json of wrong numbers


def test_images_removed_from_a_forget_class_are_refused_with_both_counts(copies, capsys):
    data, run_dir = copies
    dog = os.path.join(data, "dog")
    for name in sorted(os.listdir(dog))[:5]:  # 8 -> 3 files: the run trained on 5 of dog's
        os.unlink(os.path.join(dog, name))
    _one_error_line(["audit", run_dir, "--images", "2", "--device", "cpu", "--no_progress"], capsys,
                    "forget split", "10 files recorded, 8 now;", "--data_path")


def test_retain_class_change_is_refused_naming_the_retain_split(copies, capsys):
    data, run_dir = copies
    _add_image(os.path.join(data, "bird"), "added_later.png")
    for name in sorted(os.listdir(os.path.join(data, "bird")))[:4]:
        os.unlink(os.path.join(data, "bird", name))  # 9 -> 5 files: which 5 the run would now take differs
    _one_error_line(["audit", run_dir, "--images", "2", "--device", "cpu", "--no_progress"], capsys,
                    "retain split", "5 files recorded, 5 now (other files)", "--data_path")


def test_the_run_data_moved_elsewhere_still_matches(run, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "imgs"
    shutil.copytree(run["root"], moved)
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    assert main(["audit", str(run_dir), "--images", "2", "--device", "cpu", "--no_progress",
                 "--data_path", str(moved)]) == 0
    assert capsys.readouterr().err == ""
    assert json.load(open(run_dir / "forget_audit.json"))["config"]["trained_files_checked"] is True


def test_data_path_pointing_at_the_run_data_makes_a_changed_folder_pass(run, copies, capsys):
    data, run_dir = copies
    _add_image(os.path.join(data, "cat"), "3_new.png")
    argv = ["audit", run_dir, "--images", "2", "--device", "cpu", "--no_progress"]
    assert main(argv) == 2
    assert main(argv + ["--data_path", run["root"]]) == 0  # the unchanged data the run was made on


def test_run_without_a_record_is_audited_as_before_with_one_notice(copies, capsys):
    data, run_dir = copies
    os.unlink(os.path.join(run_dir, "data_split.json"))  # a run made before the record existed
    assert main(["audit", run_dir, "--images", "2", "--device", "cpu", "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_split.json" in err and "cannot be checked" in err, err
    assert json.load(open(os.path.join(run_dir, "forget_audit.json")))["config"]["trained_files_checked"] is False


@pytest.mark.parametrize("content", ["{not json", json.dumps({"forget": {"count": 10}}), json.dumps([1, 2])])
def test_damaged_record_is_one_line(copies, capsys, content):
    _, run_dir = copies
    with open(os.path.join(run_dir, "data_split.json"), "w") as f:
        f.write(content)
    _one_error_line(["audit", run_dir, "--device", "cpu", "--no_progress"], capsys, "data_split.json")


def test_measure_audit_api_refuses_too(copies):
    data, run_dir = copies
    _add_image(os.path.join(data, "dog"), "3_new.png")
    with pytest.raises(ValueError, match="forget"):
        audit_command.measure_audit(run_dir, images=2, device="cpu")


# ---- resume and baselines -----------------------------------------------------------------------------------------

def test_resume_on_changed_data_warns_and_keeps_the_interrupted_runs_record(run, copies, tmp_path, capsys):
    data, run_dir = copies
    recorded = open(os.path.join(run_dir, "data_split.json")).read()
    ckpt = os.path.join(run_dir, "checkpoint-0.pth")
    argv = micro_unlearn_argv(data, ckpt, tmp_path / "same", "--forget_alpha", "1.0", per_class=PER_CLASS, epochs=2)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "training files" not in out
    same = json.load(open(os.path.join(only_run_dir(tmp_path / "same"), "data_split.json")))
    assert same == {**json.loads(recorded), "data_path": data}  # the same files, under the data path given now

    _add_image(os.path.join(data, "cat"), "3_new.png")
    argv = micro_unlearn_argv(data, ckpt, tmp_path / "changed", "--forget_alpha", "1.0", per_class=PER_CLASS,
                              epochs=2)
    assert main(argv) == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if "training files" in line]
    assert len(warning) == 1 and "warning" in warning[0] and "forget" in warning[0], warning
    resumed = only_run_dir(tmp_path / "changed")
    assert open(os.path.join(resumed, "data_split.json")).read() == recorded  # not rewritten differently


def test_baseline_run_records_the_same_training_files(run, tmp_path):
    out = tmp_path / "baseline"
    argv = micro_unlearn_argv(run["root"], run["pretrained"], out, per_class=PER_CLASS)
    argv[0] = "baseline"
    assert main(argv + ["--loss_type", "encoder_noise", "--max_steps_per_epoch", "1"]) == 0
    mine = json.load(open(os.path.join(only_run_dir(out), "data_split.json")))
    assert mine == json.load(open(os.path.join(run["run_dir"], "data_split.json")))
