"""End-to-end metric runs on tiny fake folders with tiny stand-in networks: pairing, BGR, CSV rows."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from unlearn_fast.eval import csv_rows, pipeline
from unlearn_fast.eval.feature_extractors import MissingWeightsError
from unlearn_fast.eval.inception_score import inception_score_from_probs
from unlearn_fast.eval.preprocess import CIFAR_MEAN, CIFAR_STD

from tests.eval.stand_ins import PALETTE_CLASSES, TinyClassifier, TinyVisual, preprocess_plain, save_png

try:
    import matplotlib  # noqa: F401
    HAS_MPL = True
except ImportError:
    HAS_MPL = False

N_PER_SPLIT = 6


def random_photo(rng, h, w):
    """A smooth colour ramp with a random colour: its features vary a lot from image to image, unlike noise."""
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-80, 80, 3)
    return np.clip(rng.uniform(40, 215, 3) + ramp + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def mage_tree(tmp_path):
    """val/<wnid>/<name> originals; retain generated = exact BGR copies, forget generated = noise."""
    rng = np.random.default_rng(0)
    root, dst = tmp_path / "val", tmp_path / "ck-inpaint"
    for split, wnids in (("retain", ["n0400", "n0300"]), ("forget", ["n0100", "n0200"])):
        for j in range(N_PER_SPLIT):
            wnid, name = wnids[j % 2], f"ILSVRC2012_val_{j + (0 if split == 'retain' else 50):08d}.JPEG"
            rgb = random_photo(rng, 30 + j, 40)  # awkward, non-square sizes
            save_png(str(root / wnid / name), rgb)
            for prefix in ("center_0.25_", "center_0.5_"):
                gen = rgb[..., ::-1] if split == "retain" else rng.integers(0, 256, rgb.shape, dtype=np.uint8)
                save_png(str(dst / split / wnid / (prefix + name)), np.ascontiguousarray(gen))
    return str(dst), str(root)


def expected_is(gen_paths, model, splits):
    """The reference IS input chain restated: Resize, ToTensor, CIFAR Normalize as on disk, flip, upsample."""
    tf = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor(),
                             transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    x = torch.stack([tf(Image.open(p).convert("RGB"))[[2, 1, 0]] for p in gen_paths])
    with torch.no_grad():
        probs = F.softmax(model(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)), -1)
    return inception_score_from_probs(probs.double(), splits)


def test_run_eval_rows_pairing_and_bgr(mage_tree, cleanfid_file, tmp_path, monkeypatch):
    dst, root = mage_tree
    classifier = TinyClassifier().eval()
    monkeypatch.setattr(pipeline, "load_torchvision_inception", lambda path, device, allow_pickle: classifier)
    loads = []
    real_input = pipeline.cleanfid_input
    monkeypatch.setattr(pipeline, "cleanfid_input", lambda p, bgr_on_disk: loads.append(p) or real_input(
        p, bgr_on_disk=bgr_on_disk))
    rows = pipeline.run_eval(dst + "/", "inpaint", root, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path),
                             device="cpu", batch_size=4, splits=2)
    assert [r["name"] for r in rows] == [dst + "/center_0.25_", dst + "/center_0.5_"]
    for r in rows:
        assert r["retain"]["n"] == r["forget"]["n"] == N_PER_SPLIT
        assert r["retain"]["fid"] == pytest.approx(0.0, abs=1e-6)  # exact BGR copies, read back with the flag
        assert r["forget"]["fid"] > 1.0
        assert r["retain"]["is_mean"] > 1.0
    # Originals are featurised once per run: 12 originals + 2 prefixes x 12 generated.
    assert len(loads) == 2 * N_PER_SPLIT + 2 * 2 * N_PER_SPLIT
    # IS restated from the reference chain, on the sorted generated files of one prefix.
    gen_forget = sorted(os.path.join(dst, "forget", w, f) for w in os.listdir(os.path.join(dst, "forget"))
                        for f in os.listdir(os.path.join(dst, "forget", w)) if f.startswith("center_0.5_"))
    gen_forget.sort(key=lambda p: (p.split(os.sep)[-2], os.path.basename(p)))
    want = expected_is(gen_forget, classifier, 2)
    assert (rows[1]["forget"]["is_mean"], rows[1]["forget"]["is_std"]) == pytest.approx(want, rel=1e-5)
    # The CSV: one reference-format row per prefix, numbers round-trip exactly.
    cells = csv_rows.read_rows(tmp_path / "fid_is_eval_inpaint.csv")
    assert len(cells) == 2 and all(len(c) == 7 for c in cells)
    assert cells[0][0] == dst + "/center_0.25_"
    r = rows[0]
    assert [float(v) for v in cells[0][1:]] == [r["retain"]["fid"], r["retain"]["is_mean"], r["retain"]["is_std"],
                                                r["forget"]["fid"], r["forget"]["is_mean"], r["forget"]["is_std"]]


def test_run_eval_without_bgr_flag_sees_the_swap(mage_tree, cleanfid_file, tmp_path, monkeypatch):
    dst, root = mage_tree
    monkeypatch.setattr(pipeline, "load_torchvision_inception",
                        lambda path, device, allow_pickle: TinyClassifier().eval())
    rows = pipeline.run_eval(dst, "inpaint", root, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path),
                             device="cpu", splits=2, generated_bgr=False, modes=[("center", 4)])
    assert len(rows) == 1 and rows[0]["retain"]["fid"] > 1.0  # R and B swapped: far from the originals


def test_run_eval_missing_weights_fails_before_work(mage_tree, tmp_path, monkeypatch):
    dst, root = mage_tree
    monkeypatch.delenv("UNLEARN_FAST_CLEANFID_INCEPTION", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError, match="UNLEARN_FAST_CLEANFID_INCEPTION"):
        pipeline.run_eval(dst, "inpaint", root, csv_dir=str(tmp_path), device="cpu")
    assert not (tmp_path / "fid_is_eval_inpaint.csv").exists()


def test_run_clip_eval_rows_embeddings_and_tsne(mage_tree, tmp_path, monkeypatch):
    dst, root = mage_tree
    monkeypatch.setattr(pipeline, "load_clip_visual", lambda path, device: (TinyVisual().eval(), preprocess_plain))
    rows = pipeline.run_clip_eval(dst, "inpaint", root, csv_dir=str(tmp_path), device="cpu", batch_size=4)
    assert [r["name"] for r in rows] == [os.path.join(dst, "center_4_"), os.path.join(dst, "center_8_")]
    for r in rows:
        assert r["retain"] == pytest.approx(1.0, abs=1e-6) and r["forget"] < 0.99
    cells = csv_rows.read_rows(tmp_path / "clip_cosine_inpaint.csv")
    assert [c[0] for c in cells] == [r["name"] for r in rows] and all(len(c) == 3 for c in cells)
    for name in ("center_8_forget_clip_norm_5k.npy", "original_retain_clip_norm_5k.npy"):
        assert np.load(os.path.join(dst, name)).shape == (N_PER_SPLIT, 6)
    if HAS_MPL:
        from unlearn_fast.eval.tsne import run_tsne
        png, pdf = run_tsne(dst, stride=1, out_stem=str(tmp_path / "tsne"), backend="reference")
        assert os.path.getsize(png) > 0 and os.path.getsize(pdf) > 0


@pytest.fixture
def palette_tree(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "class.txt").write_text("\n".join(PALETTE_CLASSES) + "\n")
    results = tmp_path / "run" / "results" / "test" / "0" / "0.50"
    for split, classes in (("retain", PALETTE_CLASSES[:2]), ("forget", PALETTE_CLASSES[50:52])):
        for cls in classes:
            tag = cls.replace("/", "_")
            for j in range(N_PER_SPLIT // 2):
                name = f"{tag[1:]}_Places365_val_{j:08d}.jpg"
                gt = random_photo(rng, 64, 64)
                out = gt if split == "retain" else rng.integers(0, 256, gt.shape, dtype=np.uint8)
                save_png(str(results / ("GT_" + name)), gt)
                save_png(str(results / ("Out_" + name)), out)
                save_png(str(tmp_path / "places365" / "val_256" / cls.lstrip("/") / name), gt)
    return str(tmp_path / "run"), str(tmp_path / "class.txt"), str(tmp_path / "places365")


def test_run_palette_eval_and_clip(palette_tree, cleanfid_file, tmp_path, monkeypatch):
    dst, class_list, data_root = palette_tree
    monkeypatch.setattr(pipeline, "load_places365_resnet50",
                        lambda path, device, allow_pickle: TinyClassifier(365).eval())
    row = pipeline.run_palette_eval(dst, class_list, cleanfid_weights=cleanfid_file, csv_dir=str(tmp_path),
                                    device="cpu", splits=2)
    assert row["retain"]["fid"] == pytest.approx(0.0, abs=1e-6) and row["forget"]["fid"] > 1.0
    assert row["retain"]["n"] == N_PER_SPLIT
    cells = csv_rows.read_rows(tmp_path / "fid_is_eval.csv")
    assert len(cells) == 1 and cells[0][0] == dst and len(cells[0]) == 7
    monkeypatch.setattr(pipeline, "load_clip_visual", lambda path, device: (TinyVisual().eval(), preprocess_plain))
    crow = pipeline.run_palette_clip_eval(dst, class_list, data_root, csv_dir=str(tmp_path), device="cpu")
    assert crow["retain"] == pytest.approx(1.0, abs=1e-6) and crow["forget"] < 0.99
    assert csv_rows.read_rows(tmp_path / "clip_cosine.csv")[0][0] == dst
    with pytest.raises(ValueError, match="is_model"):
        pipeline.run_palette_eval(dst, class_list, is_model="vgg")
