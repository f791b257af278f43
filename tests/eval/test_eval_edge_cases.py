"""Bad and unusual input for the evaluation commands: each fails with one clear error, before any CSV row or
image is half-written, or works as the reference layout says (red-team findings, one test each)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.cli.main import main
from unlearn_fast.eval import csv_rows, pipeline
from unlearn_fast.eval.clip_cosine import embed_images
from unlearn_fast.eval.report import write_report
from unlearn_fast.eval.tsne import run_tsne
from unlearn_fast.models import create_model
from unlearn_fast.models.mage_generate import paint_batch, run_paint

from tests.eval.stand_ins import PALETTE_CLASSES, TinyClassifier, TinyVisual, preprocess_plain, save_png
from tests.helpers import make_class_tree, save_random_pretrained

N = 4  # generated images per split and ratio


@pytest.fixture
def stand_ins(monkeypatch):
    torch.manual_seed(1)
    classifier, visual = TinyClassifier().eval(), TinyVisual().eval()
    monkeypatch.setattr(pipeline, "load_torchvision_inception", lambda path, device, allow_pickle: classifier)
    monkeypatch.setattr(pipeline, "load_clip_visual", lambda path, device: (visual, preprocess_plain))


def make_mage_tree(root, names=None):
    """val/<wnid>/<name> originals and gen/<split>/<wnid>/<prefix><name> for center_0.25_ and center_0.5_."""
    rng = np.random.default_rng(0)
    for split, wnid in (("retain", "n02"), ("forget", "n01")):
        for j in range(N):
            name = names[j] if names else f"ILSVRC2012_val_{j + (0 if split == 'retain' else 50):08d}.JPEG"
            rgb = rng.integers(0, 256, (20 + j, 27, 3), dtype=np.uint8)
            save_png(os.path.join(root, "val", wnid, name), rgb)
            for prefix in ("center_0.25_", "center_0.5_"):
                save_png(os.path.join(root, "gen", split, wnid, prefix + name), np.ascontiguousarray(rgb[..., ::-1]))
    return os.path.join(root, "gen"), os.path.join(root, "val")


def forget_file(dst, prefix="center_0.25_", j=0):
    return os.path.join(dst, "forget", "n01", f"{prefix}ILSVRC2012_val_{50 + j:08d}.JPEG")


# ---- FID / IS / CLIP over generated folders --------------------------------------------------------------

def test_clip_eval_corrupt_image_is_one_clear_error(tmp_path, stand_ins):
    dst, val = make_mage_tree(str(tmp_path))
    open(forget_file(dst), "wb").close()  # an empty file: PIL cannot identify it
    with pytest.raises(ValueError, match="cannot decode image .*center_0.25_ILSVRC2012_val_00000050"):
        pipeline.run_clip_eval(dst, "inpaint", val, csv_dir=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="cannot decode image"):
        embed_images([forget_file(dst)], TinyVisual(), preprocess_plain, bgr_on_disk=True)
    assert not (tmp_path / "clip_cosine_inpaint.csv").exists()


def test_eval_checks_every_ratio_before_writing_a_row(tmp_path, stand_ins, cleanfid_file):
    dst, val = make_mage_tree(str(tmp_path))
    for j in range(N):
        os.remove(forget_file(dst, "center_0.5_", j))  # the second ratio of the forget set was never generated
    with pytest.raises(FileNotFoundError, match="no generated forget images with prefix 'center_0.5_'"):
        pipeline.run_eval(dst, "inpaint", val, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path),
                          device="cpu", splits=2)
    assert not (tmp_path / "fid_is_eval_inpaint.csv").exists()  # before: the center_0.25_ row was appended
    with pytest.raises(FileNotFoundError, match="center_0.5_"):
        pipeline.run_clip_eval(dst, "inpaint", val, csv_dir=str(tmp_path), device="cpu")
    assert not (tmp_path / "clip_cosine_inpaint.csv").exists()


def test_too_few_images_for_the_is_splits_fails_before_featurising(tmp_path, stand_ins, cleanfid_file,
                                                                    monkeypatch):
    dst, val = make_mage_tree(str(tmp_path))
    loads = []
    monkeypatch.setattr(pipeline, "cleanfid_input", lambda p, bgr_on_disk: loads.append(p))
    with pytest.raises(ValueError, match=r"4 image\(s\) for an Inception Score over 10 splits.*--splits"):
        pipeline.run_eval(dst, "inpaint", val, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path), device="cpu")
    assert loads == [] and not (tmp_path / "fid_is_eval_inpaint.csv").exists()


def test_cli_eval_splits_and_name_pattern(tmp_path, stand_ins, cleanfid_file, capsys):
    names = [f"img{j}.png" for j in range(N)]  # generate's output for a non-ImageNet class-folder dataset
    dst, val = make_mage_tree(str(tmp_path), names)
    argv = ["eval", "--dst", dst, "--data_root", val, "--cleanfid_inception", cleanfid_file,
            "--csv_dir", str(tmp_path), "--device", "cpu", "--splits", "2"]
    assert main(argv) == 2
    assert "none of the 4 generated retain files with prefix 'center_0.25_'" in capsys.readouterr().err
    assert main(argv + ["--name_pattern", "*"]) == 0
    cells = csv_rows.read_rows(tmp_path / "fid_is_eval_inpaint.csv")
    assert [c[0] for c in cells] == [os.path.join(dst, "center_0.25_"), os.path.join(dst, "center_0.5_")]
    assert all(len(c) == 7 for c in cells)
    assert float(cells[0][1]) == pytest.approx(0.0, abs=1e-6)  # exact BGR copies of the originals
    assert main(argv[:-1] + ["0", "--name_pattern", "*"]) == 2
    assert "--splits must be >= 1" in capsys.readouterr().err


def test_stray_folder_with_a_generated_name_is_ignored(tmp_path, stand_ins, cleanfid_file):
    dst, val = make_mage_tree(str(tmp_path))
    os.makedirs(forget_file(dst, j=9))  # a directory, not an image
    rows = pipeline.run_eval(dst, "inpaint", val, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path),
                             device="cpu", splits=2, modes=[("center", 4)])
    assert rows[0]["forget"]["n"] == N


def test_uneven_counts_between_ratios_warn(tmp_path, stand_ins, capsys):
    dst, val = make_mage_tree(str(tmp_path))
    os.remove(forget_file(dst, "center_0.5_", 1))  # an interrupted generation
    pipeline.run_clip_eval(dst, "inpaint", val, csv_dir=str(tmp_path), device="cpu")
    err = capsys.readouterr().err
    assert "forget image counts differ" in err and "center_4: 4" in err and "center_8: 3" in err


def test_worker_errors_keep_just_the_message(tmp_path, stand_ins, cleanfid_file):
    dst, val = make_mage_tree(str(tmp_path))
    open(forget_file(dst), "wb").write(b"not a jpeg")
    with pytest.raises(ValueError) as info:
        pipeline.run_eval(dst, "inpaint", val, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path),
                          device="cpu", splits=2, num_workers=1, modes=[("center", 4)])
    assert str(info.value).startswith("cannot decode image") and "Traceback" not in str(info.value)


# ---- Palette ---------------------------------------------------------------------------------------------

@pytest.fixture
def palette_tree(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "class.txt").write_text("\n".join(PALETTE_CLASSES) + "\n")
    results = tmp_path / "16_Network" / "results" / "test" / "0" / "0.50"
    for cls in (PALETTE_CLASSES[0], PALETTE_CLASSES[50]):
        for j in range(N):
            name = f"{cls.replace('/', '_')[1:]}_Places365_val_{j:08d}.jpg"
            gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            save_png(str(results / ("GT_" + name)), gt)
            save_png(str(results / ("Out_" + name)), gt)
            save_png(str(tmp_path / "places365" / "val_256" / cls.lstrip("/") / name), gt)
    return str(tmp_path / "16_Network"), str(results), str(tmp_path / "class.txt"), str(tmp_path / "places365")


def test_palette_cli_clip_runs_the_clip_metric(palette_tree, tmp_path, stand_ins):
    ckpt_dir, _, class_list, places = palette_tree
    assert main(["eval", "--dst", ckpt_dir, "--palette_class_list", class_list, "--clip", "--data_root", places,
                 "--csv_dir", str(tmp_path), "--device", "cpu"]) == 0
    cells = csv_rows.read_rows(tmp_path / "clip_cosine.csv")  # before: FID/IS ran instead, --clip ignored
    assert len(cells) == 1 and cells[0][0] == ckpt_dir and len(cells[0]) == 3
    assert float(cells[0][1]) == pytest.approx(1.0, abs=1e-6) and float(cells[0][2]) == pytest.approx(1.0, abs=1e-6)
    assert not (tmp_path / "fid_is_eval.csv").exists()


def test_palette_dst_may_be_the_results_folder(palette_tree, tmp_path, stand_ins, cleanfid_file, monkeypatch):
    ckpt_dir, results, class_list, _ = palette_tree
    places = TinyClassifier(365).eval()
    monkeypatch.setattr(pipeline, "load_places365_resnet50", lambda path, device, allow_pickle: places)
    by_ckpt = pipeline.run_palette_eval(ckpt_dir, class_list, cleanfid_weights=cleanfid_file,
                                        csv_dir=str(tmp_path), device="cpu", splits=2)
    by_results = pipeline.run_palette_eval(results, class_list, cleanfid_weights=cleanfid_file,
                                           csv_dir=str(tmp_path), device="cpu", splits=2)
    assert by_results["retain"] == by_ckpt["retain"] and by_results["forget"]["n"] == N
    with pytest.raises(FileNotFoundError, match="holds Out_ images"):
        pipeline.run_palette_eval(str(tmp_path), class_list, cleanfid_weights=cleanfid_file, device="cpu")


# ---- generation ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_class_tree(root / "data" / "val", ("fa", "ra"), 2, seed=0, size=(37, 45))
    return str(root), save_random_pretrained(root / "mage.pth", "mage_micro")


def gen_argv(root, ckpt, out, *extra):
    return ["generate", "--task", "inpaint", "--ckpt_path", ckpt, "--model", "mage_micro", "--input_size", "32",
            "--data_root", os.path.join(root, "data"), "--forget_classes", "fa", "--retain_classes", "ra",
            "--device", "cpu", "--output", out, *extra]


def test_generate_writes_the_format_of_the_name(gen_setup, tmp_path):
    root, ckpt = gen_setup
    out = str(tmp_path / "out")
    assert main(gen_argv(root, ckpt, out, "--per_class", "1")) == 0
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert files == ["forget/fa/center_0.25_0.png", "forget/fa/center_0.5_0.png",
                     "retain/ra/center_0.25_0.png", "retain/ra/center_0.5_0.png"]
    for f in files:  # before: JPEG bytes under a .png name (cv2.imwrite picks the format by extension)
        with Image.open(os.path.join(out, f)) as img:
            assert img.format == "PNG" and img.size == (32, 32)


@pytest.mark.parametrize("extra, message", [
    (["--per_class", "0"], "--per_class must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--vqgan_ckpt", "/nonexistent/vq.ckpt"], "--vqgan_ckpt not found"),
])
def test_generate_bad_flags_one_clear_error(gen_setup, tmp_path, capsys, extra, message):
    root, ckpt = gen_setup
    assert main(gen_argv(root, ckpt, str(tmp_path / "out"), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_corrupt_input_fails_before_writing(gen_setup, tmp_path, capsys):
    root, ckpt = gen_setup
    data = tmp_path / "data" / "val"
    make_class_tree(data, ("fa", "ra"), 2, seed=0, size=(37, 45))
    (data / "ra" / "1.png").write_bytes(b"junk")
    argv = gen_argv(root, ckpt, str(tmp_path / "out"))
    argv[argv.index("--data_root") + 1] = str(tmp_path / "data")
    assert main(argv) == 2
    assert "ra/1.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_paint_takes_a_one_pass_generator(tmp_path):
    torch.manual_seed(0)
    model = create_model("mage_micro").eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    batches = ((x[i:i + 2], ["retain", "forget"][:len(x[i:i + 2])], ["n1", "n2"][:len(x[i:i + 2])],
                [f"im{i}.png", f"im{i + 1}.png"][:len(x[i:i + 2])]) for i in range(0, 3, 2))
    paths = run_paint(model, batches, str(tmp_path), "inpaint", channel_order="rgb")
    assert len(paths) == 3 * 2  # every image, both ratios, from a generator that can be iterated only once
    want = paint_batch(model, x, "center", 0.5)  # the whole set in one batch: same pixels
    got = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths
                       if "center_0.5_" in p]).float()
    assert (got - torch.floor((want * 255).clamp(0, 255))).abs().max().item() <= 1.0  # lossless PNG; float ties


# ---- report and tsne -------------------------------------------------------------------------------------

def test_report_skips_a_folder_named_png_and_refuses_a_folder_as_output(tmp_path, capsys):
    (tmp_path / "grid.png").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "real.png")
    (tmp_path / "opt.yaml").write_text("{}")  # a run directory (report refuses a folder that is none)
    path = write_report(str(tmp_path))
    page = open(path).read()
    assert "real.png" in page and 'alt="grid.png"' not in page
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "grid.png")]) == 2
    assert "--out is a folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a folder"):
        write_report(str(tmp_path), str(tmp_path / "grid.png"))


def test_tsne_bad_stride_and_mismatched_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("center_8_forget", "center_8_retain", "original_forget", "original_retain"):
        np.save(tmp_path / f"{name}_clip_norm_5k.npy", rng.normal(size=(8, 6)))
    for stride in (0, -1):
        with pytest.raises(ValueError, match="stride must be a positive integer"):
            run_tsne(str(tmp_path), stride=stride, out_stem=str(tmp_path / "t"))
    np.save(tmp_path / "original_retain_clip_norm_5k.npy", rng.normal(size=(8, 5)))
    with pytest.raises(ValueError, match="differ in dimension.*original_retain_clip_norm_5k.npy"):
        run_tsne(str(tmp_path), stride=1, out_stem=str(tmp_path / "t"))
