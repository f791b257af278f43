"""Red-team findings on the evaluation protocol (§5) and the audit / report / T-SNE commands: each test failed
before its fix. Tiny stand-in networks, nothing downloaded."""
import json
import os

import numpy as np
import pytest
import torch

from unlearn_fast.cli.audit_command import read_run_args
from unlearn_fast.cli.main import main
from unlearn_fast.eval import csv_rows, pipeline
from unlearn_fast.eval.report import render_report, write_report
from unlearn_fast.eval.tsne import run_tsne

from tests.eval.stand_ins import TinyClassifier, TinyVisual, preprocess_plain, save_png
from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained

N = 3  # generated images per split


@pytest.fixture
def stand_ins(monkeypatch):
    classifier, visual = TinyClassifier().eval(), TinyVisual().eval()
    monkeypatch.setattr(pipeline, "load_torchvision_inception", lambda path, device, allow_pickle: classifier)
    monkeypatch.setattr(pipeline, "load_clip_visual", lambda path, device: (visual, preprocess_plain))


def mage_tree(root):
    """<root>/imagenet/val/<wnid>/<name> originals; <root>/gen/<split>/<wnid>/center_0.25_<name>, R/B swapped
    copies of them (what testpaint.py's cv2.imwrite leaves) except the forget set's first image (noise)."""
    rng = np.random.default_rng(0)
    val, gen = os.path.join(root, "imagenet", "val"), os.path.join(root, "gen")
    for split, wnid in (("retain", "n02"), ("forget", "n01")):
        for j in range(N):
            name = f"ILSVRC2012_val_{j + (0 if split == 'retain' else 50):08d}.JPEG"
            rgb = rng.integers(0, 256, (21 + j, 30, 3), dtype=np.uint8)
            save_png(os.path.join(val, wnid, name), rgb)
            out = rgb[..., ::-1] if (split, j) != ("forget", 0) else rng.integers(0, 256, rgb.shape, dtype=np.uint8)
            save_png(os.path.join(gen, split, wnid, "center_0.25_" + name), np.ascontiguousarray(out))
    return gen, val


# ---- FID / IS / CLIP runs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["fid_is", "clip"])
def test_csv_dir_that_is_a_file_fails_before_any_image_is_read(tmp_path, stand_ins, cleanfid_file, monkeypatch,
                                                               metric):
    gen, val = mage_tree(str(tmp_path))
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    reads = []
    monkeypatch.setattr(pipeline, "cleanfid_input", lambda p, bgr_on_disk: reads.append(p))
    monkeypatch.setattr(pipeline, "embed_images", lambda paths, *a, **k: reads.append(paths))
    # before: FileExistsError from os.makedirs, a traceback, after the first ratio's metrics were computed
    with pytest.raises(ValueError, match=r"csv_dir \(--csv_dir\) .*results is not a folder"):
        if metric == "clip":
            pipeline.run_clip_eval(gen, "inpaint", val, csv_dir=str(blocker), device="cpu", modes=[("center", 4)])
        else:
            pipeline.run_eval(gen, "inpaint", val, cleanfid_weights=cleanfid_file, csv_dir=str(blocker),
                              device="cpu", splits=1, modes=[("center", 4)])
    assert reads == [] and blocker.read_text() == "not a folder"


def test_cli_eval_csv_dir_under_a_file_exits_2(tmp_path, stand_ins, cleanfid_file, capsys):
    gen, val = mage_tree(str(tmp_path))
    (tmp_path / "f").write_text("x")
    argv = ["eval", "--dst", gen, "--data_root", val, "--cleanfid_inception", cleanfid_file, "--device", "cpu",
            "--splits", "1", "--csv_dir", str(tmp_path / "f" / "sub")]
    assert main(argv) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_hidden_folder_in_the_generated_tree_is_skipped_like_the_reference_glob(tmp_path, stand_ins):
    gen, val = mage_tree(str(tmp_path))
    # a notebook's checkpoint folder: eval.py's glob 'retain/*/...' never enters it
    hidden = os.path.join(gen, "retain", ".ipynb_checkpoints", "center_0.25_ILSVRC2012_val_00000000.JPEG")
    save_png(hidden, np.zeros((8, 8, 3), np.uint8))
    rows = pipeline.run_clip_eval(gen, "inpaint", val, csv_dir=str(tmp_path), device="cpu", modes=[("center", 4)])
    assert rows[0]["retain"] == pytest.approx(1.0, abs=1e-6)  # before: "1 of 4 retain originals are missing"
    names = open(os.path.join(gen, "center_4_retain_clip_norm_5k.npy.names")).read().split()
    assert len(names) == N and not any(".ipynb" in n for n in names)


def test_clip_eval_takes_the_imagenet_root_as_clip_embed_does(tmp_path, stand_ins):
    gen, val = mage_tree(str(tmp_path))
    by_val = pipeline.run_clip_eval(gen, "inpaint", val, csv_dir=str(tmp_path / "a"), device="cpu",
                                    modes=[("center", 4)])
    # clip_embed.py's --data_root is ../dataset/imagenet1k/ (the originals are under its val/)
    by_root = pipeline.run_clip_eval(gen, "inpaint", os.path.dirname(val), csv_dir=str(tmp_path / "b"),
                                     device="cpu", modes=[("center", 4)])
    assert by_root == by_val
    assert csv_rows.read_rows(tmp_path / "b" / "clip_cosine_inpaint.csv")[0][0] == os.path.join(gen, "center_4_")


def test_clip_score_is_the_plain_dot_of_the_stored_unit_rows(tmp_path, stand_ins):
    gen, val = mage_tree(str(tmp_path))
    by_val = pipeline.run_clip_eval(gen, "inpaint", val, csv_dir=str(tmp_path), device="cpu", modes=[("center", 4)])
    assert by_val[0]["retain"] == pytest.approx(1.0, abs=1e-6) and by_val[0]["forget"] < 0.999
    # clip_embed.py: np.mean(np.sum(gen * orig, 1)) of the float32 unit rows read back as float64, not normalised
    # again (before: normalised again in float64, off by ~3e-8)
    gen_emb = np.load(os.path.join(gen, "center_4_forget_clip_norm_5k.npy")).astype(np.float64)  # as np.loadtxt
    orig_emb = np.load(os.path.join(gen, "original_forget_clip_norm_5k.npy")).astype(np.float64)
    assert by_val[0]["forget"] == pytest.approx(float(np.mean(np.sum(gen_emb * orig_emb, 1))), abs=1e-12)
    assert np.allclose(np.linalg.norm(gen_emb, axis=1), 1.0, atol=1e-6)


# ---- the audit command -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    """A 1-epoch MAE unlearning run (4 trained images per forget class, 3 unseen)."""
    root = make_class_tree(tmp_path_factory.mktemp("data") / "train", ("cat", "bird"), 7, seed=3)
    pre = save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pretrained.pth")
    out = tmp_path_factory.mktemp("out")
    assert main(micro_unlearn_argv(root, pre, out, "--forget_alpha", "1.0", "--lr", "3e-3", forget="cat")) == 0
    return only_run_dir(out)


def test_audit_of_the_trained_parameters_file_equals_the_full_checkpoint(audit_run, tmp_path, capsys):
    full = os.path.join(audit_run, "checkpoint-0.pth")
    assert main(["audit", audit_run, "--device", "cpu", "--images", "3", "--checkpoint", full]) == 0
    want = json.load(open(os.path.join(audit_run, "forget_audit.json")))
    # before: "33 missing keys ... Is --model the architecture ...": the file holds the trained encoder only
    partial = os.path.join(audit_run, "checkpoint-0.safetensors")
    assert main(["audit", audit_run, "--device", "cpu", "--images", "3", "--checkpoint", partial]) == 0
    got = json.load(open(os.path.join(audit_run, "forget_audit.json")))
    for key in ("forget", "retain_control"):
        assert got[key]["after"] == want[key]["after"] and got[key]["before"] == want[key]["before"]
    # the same for a dict {"model": trained params} (best.pth's layout)
    trained = torch.load(full, weights_only=True)["model"]
    encoder_only = {k: v for k, v in trained.items() if not k.startswith("decoder")}
    torch.save({"model": encoder_only}, tmp_path / "best.pth")
    assert main(["audit", audit_run, "--device", "cpu", "--images", "3", "--checkpoint",
                 str(tmp_path / "best.pth")]) == 0
    assert json.load(open(os.path.join(audit_run, "forget_audit.json")))["forget"]["after"] == want["forget"]["after"]
    capsys.readouterr()


def test_audit_opt_yaml_that_is_not_text_names_the_file(tmp_path, capsys):
    (tmp_path / "opt.yaml").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match=r"opt.yaml is not readable \(not UTF-8"):
        read_run_args(str(tmp_path))  # before: a bare UnicodeDecodeError naming no file
    assert main(["audit", str(tmp_path), "--device", "cpu"]) == 2
    assert "opt.yaml is not readable" in capsys.readouterr().err
    assert not (tmp_path / "forget_audit.json").exists()


# ---- report and T-SNE --------------------------------------------------------------------------------------

def test_report_survives_undecodable_and_oversized_values(tmp_path, capsys):
    (tmp_path / "forget_audit.json").write_bytes(b"\xff\xfe junk")
    (tmp_path / "log.txt").write_text('{"epoch": 0, "train_loss": 0.5}\n{"epoch": 1, "train_loss": 1' + "0" * 400
                                      + "}\n" + '{"epoch": 2, "train_loss": 0.25}\n')
    page = render_report(str(tmp_path))  # before: UnicodeDecodeError, then OverflowError (int too large)
    assert "forget_audit.json is unreadable" in page and "Training curves" in page
    assert page.count("<polyline") == 1  # the two finite points are drawn, the huge one dropped
    (tmp_path / "metrics.json").write_bytes(b"\xff\xfe junk")
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        render_report(str(tmp_path))


def test_report_out_under_a_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "opt.yaml").write_text("{}")  # a run directory (report refuses a folder that is none)
    out = tmp_path / "afile" / "report.html"
    with pytest.raises(ValueError, match="afile is not a folder: it exists and is a file"):  # before: FileExistsError
        write_report(str(tmp_path), str(out))
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert "is not a folder: it exists and is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


def test_tsne_folder_with_glob_characters_and_too_few_points(tmp_path):
    folder = tmp_path / "run[1]"  # before: glob read "[1]" as a character class: "no embedding file"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("center_8_forget", "center_8_retain", "original_forget", "original_retain"):
        np.save(folder / f"{name}_clip_norm_5k.npy", rng.normal(size=(7, 5)))
    with pytest.raises(ValueError, match=r"gives 4 \(1, 1, 1, 1\); lower the stride \(--stride\)"):
        run_tsne(str(folder), out_stem=str(tmp_path / "t"))  # the default stride 100 keeps 1 row per file
    pytest.importorskip("matplotlib")
    png, pdf = run_tsne(str(folder), stride=1, out_stem=str(tmp_path / "t"), backend="reference")
    assert os.path.getsize(png) > 0 and os.path.getsize(pdf) > 0
