"""``unlearn-fast audit RUN_DIR``: membership AUC of forget-class images, before vs after, from the run dir."""
from __future__ import annotations

import json
import os

import pytest
import torch

import unlearn_fast
from unlearn_fast.cli.audit_command import read_run_args
from unlearn_fast.cli.main import main
from unlearn_fast.eval.forget_audit import membership_auc
from unlearn_fast.eval.periodic_eval import mae_inpaint_errors
from unlearn_fast.eval.report import render_report
from unlearn_fast.train.data_split import seeded_shuffle, select_unlearning_files
from unlearn_fast.train.holdout_split import select_holdout_files
from unlearn_fast.train.image_datasets import load_eval_images
from unlearn_fast.train.seeding import derive_seed

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch unlearning run on random images (5 per class trained, 3 unseen)."""
    root = make_class_tree(tmp_path_factory.mktemp("data") / "train", ("cat", "dog", "bird"), 8, seed=2)
    pre = save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pretrained.pth")
    out = tmp_path_factory.mktemp("out")
    assert main(micro_unlearn_argv(root, pre, out, "--forget_alpha", "1.0", "--lr", "3e-3", per_class=5,
                                   epochs=2)) == 0
    return dict(root=str(root), pretrained=str(pre), run_dir=only_run_dir(out))


def test_audit_matches_a_plain_restatement(run, capsys):
    assert main(["audit", run["run_dir"], "--images", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "forget classes" in printed and "retain classes" in printed
    result = json.load(open(os.path.join(run["run_dir"], "forget_audit.json")))
    assert result["config"]["checkpoint"].endswith("checkpoint-1.pth")
    assert result["config"]["teacher"] == os.path.abspath(run["pretrained"])
    # restated: seen = 4 of the run's forget training files, unseen = 4 held-out forget files; fixed masks
    items = select_unlearning_files(run["root"], ["cat", "dog"], ["bird"], 5, seed=0)
    seen = seeded_shuffle(sorted({p for p, lab in items if lab < 0}), 0, "audit", "forget")[:4]
    unseen = select_holdout_files(run["root"], ["cat", "dog"], ["bird"], [p for p, _ in items], 4, 0).forget
    assert len(unseen) == 4 and not set(seen) & set(unseen)
    x = load_eval_images(seen + unseen, 32)
    for when, path in (("before", run["pretrained"]), ("after", os.path.join(run["run_dir"], "checkpoint-1.pth"))):
        model = unlearn_fast.create_model("mae_micro")
        model.load_state_dict(torch.load(path, weights_only=True)["model"])
        model.eval()
        task = model.sample_task(x, torch.Generator().manual_seed(derive_seed(0, "audit", "forget")))
        e = mae_inpaint_errors(model, x, task).double()
        assert result["forget"][when]["auc"] == pytest.approx(membership_auc(e[:4], e[4:]), abs=1e-12)
        assert result["forget"][when]["mean_error_unseen"] == pytest.approx(e[4:].mean().item(), rel=1e-6)
    assert result["forget"]["after"]["mean_error_forget_train"] != result["forget"]["before"]["mean_error_forget_train"]
    # the retain control: bird has 3 unseen files
    assert result["retain_control"]["before"]["n_unseen"] == 3
    # the report shows the audit table
    page = render_report(run["run_dir"])
    assert "Forget audit" in page and f"{result['forget']['after']['auc']:.4f}" in page


def test_opt_yaml_appended_twice_reads_the_last(tmp_path):
    (tmp_path / "opt.yaml").write_text(json.dumps({"seed": 1}, indent=2) + "\n" + json.dumps({"seed": 2}) + "\n")
    assert read_run_args(str(tmp_path)) == {"seed": 2}


@pytest.mark.parametrize("case, message", [
    ("no_run_dir", "not a run directory"),
    ("no_opt", "no opt.yaml"),
    ("bad_checkpoint", "checkpoint file not found"),
    ("moved_data", "does not exist"),
    ("images_0", "--images must be >= 1"),
])
def test_audit_bad_input_one_clear_error(run, tmp_path, capsys, case, message):
    argv = ["audit", run["run_dir"], "--device", "cpu"]
    if case == "no_run_dir":
        argv[1] = str(tmp_path / "nope")
    elif case == "no_opt":
        argv[1] = str(tmp_path)
    elif case == "bad_checkpoint":
        argv += ["--checkpoint", str(tmp_path / "missing.pth")]
    elif case == "moved_data":
        argv += ["--data_path", str(tmp_path / "gone")]
    elif case == "images_0":
        argv += ["--images", "0"]
    before = sorted(os.listdir(run["run_dir"]))
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(run["run_dir"])) == before  # nothing written
