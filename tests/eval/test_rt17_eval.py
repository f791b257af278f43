"""Red-team round 17 of the evaluation code: bad image files, damaged or linked output files, flags out of range.
Each test failed before its fix (the comment says how). Tiny stand-in networks, nothing downloaded."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_fast.cli.main import main
from unlearn_fast.eval import clip_cosine, csv_rows, layout, pipeline, tsne
from unlearn_fast.eval.clip_cosine import load_embeddings, save_embeddings
from unlearn_fast.eval.preprocess import read_image_rgb

from tests.eval.stand_ins import PALETTE_CLASSES, TinyClassifier, TinyVisual, preprocess_plain, save_png

N = 3  # generated images per split and ratio
PREFIXES = ("center_0.25_", "center_0.5_")


@pytest.fixture
def stand_ins(monkeypatch):
    classifier, visual = TinyClassifier().eval(), TinyVisual().eval()
    monkeypatch.setattr(pipeline, "load_torchvision_inception", lambda path, device, allow_pickle: classifier)
    monkeypatch.setattr(pipeline, "load_clip_visual", lambda path, device: (visual, preprocess_plain))


@pytest.fixture
def reads(monkeypatch):
    """Every image the pipeline decodes (FID, IS and CLIP inputs), in order."""
    seen = []
    for name in ("cleanfid_input", "mage_is_input"):
        real = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda p, bgr_on_disk, _real=real: seen.append(p) or _real(
            p, bgr_on_disk=bgr_on_disk))
    real_open = clip_cosine.open_rgb
    monkeypatch.setattr(clip_cosine, "open_rgb", lambda p: seen.append(p) or real_open(p))
    return seen


def mage_tree(root):
    """<root>/val/<wnid>/<name> originals and <root>/gen/<split>/<wnid>/<prefix><name> R/B-swapped copies."""
    rng = np.random.default_rng(0)
    for split, wnid in (("retain", "n02"), ("forget", "n01")):
        for j in range(N):
            name = f"ILSVRC2012_val_{j + (0 if split == 'retain' else 50):08d}.JPEG"
            rgb = rng.integers(0, 256, (19 + j, 26, 3), dtype=np.uint8)
            save_png(os.path.join(root, "val", wnid, name), rgb)
            for prefix in PREFIXES:
                save_png(os.path.join(root, "gen", split, wnid, prefix + name), np.ascontiguousarray(rgb[..., ::-1]))
    return os.path.join(root, "gen"), os.path.join(root, "val")


def gen_file(dst, prefix="center_0.5_", j=0):
    return os.path.join(dst, "forget", "n01", f"{prefix}ILSVRC2012_val_{50 + j:08d}.JPEG")


def run_fid(dst, val, cleanfid_file, csv_dir, **kw):
    return pipeline.run_eval(dst, "inpaint", val, cleanfid_weights=cleanfid_file, csv_dir=str(csv_dir),
                             device="cpu", **{"splits": 1, **kw})


# ---- image files -------------------------------------------------------------------------------------------

def test_16_bit_greyscale_png_keeps_its_brightness(tmp_path):
    grey16 = (np.arange(12 * 20).reshape(12, 20) * 273).astype(np.uint16)  # 0 .. 65247
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    got = read_image_rgb(str(tmp_path / "g16.png"))  # before: every value above 255 clipped: a white image
    want = np.round(grey16 / 257.0).astype(np.uint8)  # round(v / 257): the usual 16 -> 8 bit reduction
    assert got.shape == (12, 20, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f32.tif")  # before: silently black
    with pytest.raises(ValueError, match=r"f32.tif: a 32-bit float image.*8-bit"):
        read_image_rgb(str(tmp_path / "f32.tif"))
    rgb8 = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # 8-bit files: unchanged
    Image.fromarray(rgb8).save(tmp_path / "rgb.png")
    Image.fromarray(rgb8[..., 0]).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_image_rgb(str(tmp_path / "rgb.png")), rgb8)
    np.testing.assert_array_equal(read_image_rgb(str(tmp_path / "l.png")), np.repeat(rgb8[..., :1], 3, axis=2))


@pytest.mark.parametrize("metric", ["fid_is", "clip"])
@pytest.mark.parametrize("which", ["generated", "original"])
def test_zero_byte_image_fails_before_any_row_or_network(tmp_path, stand_ins, cleanfid_file, reads, metric, which):
    dst, val = mage_tree(str(tmp_path))
    empty = gen_file(dst) if which == "generated" else os.path.join(val, "n01", "ILSVRC2012_val_00000051.JPEG")
    open(empty, "wb").close()  # what an interrupted generation (or copy) leaves
    # before: the center_0.25_ row was appended, then "cannot decode image" at the center_0.5_ ratio
    with pytest.raises(ValueError, match=r"1 empty \(0-byte\) file.*" + os.path.basename(empty)):
        if metric == "clip":
            pipeline.run_clip_eval(dst, "inpaint", val, csv_dir=str(tmp_path), device="cpu")
        else:
            run_fid(dst, val, cleanfid_file, tmp_path)
    assert reads == [] and not any(f.endswith(".csv") for f in os.listdir(tmp_path))


def test_broken_link_in_the_generated_folder_is_an_error_not_a_smaller_set(tmp_path, stand_ins, cleanfid_file):
    dst, val = mage_tree(str(tmp_path))
    os.remove(gen_file(dst, "center_0.25_", 1))
    os.symlink(str(tmp_path / "moved_away.JPEG"), gen_file(dst, "center_0.25_", 1))
    # before: the link was skipped and the forget FID silently used 2 images instead of 3
    with pytest.raises(FileNotFoundError, match=r"broken link.*center_0.25_ILSVRC2012_val_00000051"):
        run_fid(dst, val, cleanfid_file, tmp_path, modes=[("center", 4)])
    assert not (tmp_path / "fid_is_eval_inpaint.csv").exists()
    os.symlink(gen_file(dst, "center_0.5_", 1), str(tmp_path / "good_link"))  # a working link is read as a file
    os.remove(gen_file(dst, "center_0.25_", 1))
    os.symlink(str(tmp_path / "good_link"), gen_file(dst, "center_0.25_", 1))
    rows = run_fid(dst, val, cleanfid_file, tmp_path, modes=[("center", 4)])
    assert rows[0]["forget"]["n"] == N


def test_broken_link_among_palette_outputs_is_an_error(tmp_path):
    results = tmp_path / "results" / "test" / "0" / "0.50"
    name = f"{PALETTE_CLASSES[50].replace('/', '_')[1:]}_Places365_val_00000001.jpg"
    save_png(str(results / ("GT_" + name)), np.zeros((4, 4, 3), np.uint8))
    os.symlink(str(tmp_path / "gone.jpg"), str(results / ("Out_" + name)))
    with pytest.raises(FileNotFoundError, match="broken link.*Out_"):
        layout.collect_palette_pairs(str(tmp_path), PALETTE_CLASSES[50:100])


def test_class_list_with_a_byte_order_mark_keeps_its_first_class(tmp_path):
    path = tmp_path / "class.txt"
    path.write_text("\n".join(PALETTE_CLASSES) + "\n", encoding="utf-8-sig")  # saved by a Windows editor
    classes = layout.read_class_list(str(path))
    assert classes == PALETTE_CLASSES  # before: "\ufeff/a/cls0", whose Out_ images then matched nothing


# ---- output files ------------------------------------------------------------------------------------------

def test_symlinked_results_csv_receives_the_row_and_stays_a_link(tmp_path):
    shared = tmp_path / "shared" / "fid_is_eval_inpaint.csv"
    shared.parent.mkdir()
    shared.write_text("old\t1.0\n")
    link = tmp_path / "fid_is_eval_inpaint.csv"
    link.symlink_to(shared)
    csv_rows.append_rows_atomic(link, ["new\t2.0\n"])
    # before: the link was replaced by a regular file and the shared CSV never got the row
    assert link.is_symlink() and shared.read_text() == "old\t1.0\nnew\t2.0\n"
    assert sorted(os.listdir(shared.parent)) == ["fid_is_eval_inpaint.csv"]  # no temp file left


def test_damaged_embedding_files_name_the_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = rng.normal(size=(30, 6)).astype(np.float32)
    save_embeddings(str(tmp_path / "good.npy"), good)
    np.testing.assert_array_equal(load_embeddings(str(tmp_path / "good.npy")), good.astype(np.float64))
    blob = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[:len(blob) // 2])
    (tmp_path / "zero.npy").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan], [1.0, 2.0]]))
    # before: a numpy message without the file (EOFError for the empty .npy: a traceback from the CLI),
    # an empty .txt loaded as shape (1, 0), a 3-D array accepted
    for name in ("cut.npy", "zero.npy", "empty.txt", "cube.npy", "nan.npy"):
        with pytest.raises(ValueError, match=f"embedding file .*{name}"):
            load_embeddings(str(tmp_path / name))
    for stem in ("center_8_forget", "center_8_retain", "original_forget", "original_retain"):
        np.save(tmp_path / f"{stem}_clip_norm_5k.npy", good)
    (tmp_path / "original_retain_clip_norm_5k.npy").write_bytes(b"")  # an interrupted eval --clip
    assert main(["tsne", "--ckpt_folder", str(tmp_path), "--stride", "1"]) == 2
    assert "original_retain_clip_norm_5k.npy" in capsys.readouterr().err


def test_interrupted_embedding_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "center_8_forget_clip_norm_5k.npy")
    old = np.eye(3, dtype=np.float32)
    save_embeddings(path, old, ["a", "b", "c"])
    real_save = np.save

    def interrupted(file, arr, *a, **k):
        real_save(file, arr, *a, **k)
        raise KeyboardInterrupt  # Ctrl-C after the bytes went out, before the file was complete on disk
    monkeypatch.setattr(clip_cosine.np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_embeddings(path, np.zeros((5, 3), np.float32), list("vwxyz"))
    monkeypatch.undo()
    # before: np.save wrote straight to the target: a new file paired with the old names, or a torn one
    np.testing.assert_array_equal(np.load(path), old)
    assert open(path + ".names").read() == "a\nb\nc\n"
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path), os.path.basename(path) + ".names"]


@pytest.mark.parametrize("palette", [False, True])
def test_clip_embedding_folder_not_writable_fails_before_embedding(tmp_path, stand_ins, reads, monkeypatch, palette):
    if palette:
        results = tmp_path / "run" / "results" / "test" / "0" / "0.50"
        (tmp_path / "class.txt").write_text("\n".join(PALETTE_CLASSES) + "\n")
        for cls in (PALETTE_CLASSES[0], PALETTE_CLASSES[50]):
            for j in range(2):
                name = f"{cls.replace('/', '_')[1:]}_Places365_val_{j:08d}.jpg"
                for path in (results / ("Out_" + name), tmp_path / "p365" / "val_256" / cls.lstrip("/") / name):
                    save_png(str(path), np.full((8, 8, 3), 40 * j, np.uint8))
        folder = str(tmp_path / "run")
    else:
        folder, val = mage_tree(str(tmp_path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: (os.path.abspath(p) != folder
                                                            and real_access(p, mode, **k)))  # a read-only share
    # before: PermissionError from np.save after the first split had been embedded
    with pytest.raises(ValueError, match="not writable"):
        if palette:
            pipeline.run_palette_clip_eval(folder, str(tmp_path / "class.txt"), str(tmp_path / "p365"),
                                           csv_dir=str(tmp_path / "csv"), device="cpu")
        else:
            pipeline.run_clip_eval(folder, "inpaint", val, csv_dir=str(tmp_path / "csv"), device="cpu")
    assert reads == []


# ---- arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"fid_method": "sqrtm"}, "fid_method must be one of"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"splits": 2.5}, "splits must be a positive integer"),
    ({"splits": True}, "splits must be a positive integer"),
])
def test_bad_arguments_fail_before_any_network_or_image(tmp_path, stand_ins, cleanfid_file, reads, monkeypatch,
                                                        kw, message):
    dst, val = mage_tree(str(tmp_path))
    loaded = []
    monkeypatch.setattr(pipeline, "load_cleanfid_inception", lambda *a, **k: loaded.append(a))
    # before: the networks were loaded and (fid_method, splits) the first split's images featurised first
    with pytest.raises(ValueError, match=message):
        run_fid(dst, val, cleanfid_file, tmp_path, **kw)
    assert loaded == [] and reads == []


def test_a_folder_name_the_csv_cannot_hold_fails_before_any_image(tmp_path, stand_ins, cleanfid_file, reads):
    dst, val = mage_tree(str(tmp_path))
    tabbed = str(tmp_path / "ck\tinpaint")
    os.rename(dst, tabbed)
    # before: "a CSV cell may not contain a tab" when the first row was written, after its metrics
    with pytest.raises(ValueError, match="tab or newline"):
        run_fid(tabbed, val, cleanfid_file, tmp_path)
    with pytest.raises(ValueError, match="tab or newline"):
        pipeline.run_clip_eval(tabbed, "inpaint", val, csv_dir=str(tmp_path), device="cpu")
    assert reads == []


# ---- T-SNE -------------------------------------------------------------------------------------------------

def _embedding_folder(folder, rows):
    rng = np.random.default_rng(0)
    for stem in ("center_8_forget", "center_8_retain", "original_forget", "original_retain"):
        np.save(os.path.join(folder, f"{stem}_clip_norm_5k.npy"), rng.normal(size=(rows, 5)))


def test_tsne_too_large_for_memory_names_the_stride(tmp_path, monkeypatch):
    _embedding_folder(str(tmp_path), 100)
    monkeypatch.setattr(tsne, "available_memory_bytes", lambda: 4 * 2 ** 20)  # 4 MiB free
    # before: the exact O(N^2) t-SNE ran with 400 points regardless (5000-row files, --stride 1: 20,000 points,
    # several 3.2 GB matrices: the machine swaps or the process is killed)
    with pytest.raises(ValueError, match=r"400 points .*MiB.*--stride"):
        tsne.tsne_embed(np.zeros((400, 3)), backend="reference")
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=r"400 points .*MiB.*--stride"):
        tsne.run_tsne(str(tmp_path), stride=1, out_stem=str(tmp_path / "t"), backend="reference")


def test_tsne_without_matplotlib_or_output_folder_fails_before_the_embedding(tmp_path, monkeypatch):
    _embedding_folder(str(tmp_path), 30)
    ran = []
    monkeypatch.setattr(tsne, "tsne_embed", lambda x, **k: ran.append(x) or np.zeros((len(x), 2)))
    (tmp_path / "afile").write_text("x")
    # before: the t-SNE (1000 exact iterations) ran first, then makedirs failed on the output folder
    with pytest.raises(ValueError, match="not a folder"):
        tsne.run_tsne(str(tmp_path), stride=1, out_stem=str(tmp_path / "afile" / "t"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        tsne.run_tsne(str(tmp_path), stride=1, out_stem=str(tmp_path / "t"))
    assert ran == []


# ---- domain metrics ----------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 2-image sets: a singular covariance
def test_domain_metrics_of_non_finite_outputs_say_so():
    from unlearn_fast.eval.domain_metrics import domain_metrics

    class Stub:  # linear features of the flattened image; probabilities = softmax of the first 10
        w = torch.randn(3 * 32 * 32, 12, generator=torch.Generator().manual_seed(0)) / 16

        def features(self, x):
            return x.flatten(1).float() @ self.w

        def probs(self, x):
            return torch.softmax(self.features(x)[:, :10], dim=-1)

        def embed(self, x):
            return torch.nn.functional.normalize(self.features(x), dim=-1)
    gen = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    orig, labels = gen.clone(), torch.arange(7) % 10
    gen[3, 1, 5, 5] = float("nan")  # a diverged model's reconstruction
    # before: "probs must be finite and non-negative", from inside the Inception Score
    with pytest.raises(ValueError, match="generated has 1 of 7 images with NaN or inf pixels"):
        domain_metrics(gen, orig, labels, Stub(), [0, 1])
    gen[3, 1, 5, 5] = orig[3, 1, 5, 5]
    assert domain_metrics(gen, orig, labels, Stub(), [0, 1])["retain"]["domain_cosine"] == pytest.approx(1.0, abs=1e-6)
