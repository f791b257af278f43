"""Red-team round 17: the MAGE evaluation against the official scripts (testpaint.py, eval.py, clip_embed.py,
tsne_visual.py; REFERENCE.md §5.1-§5.4), line by line. Each ``finding`` test failed before its fix (the comment
says how); the others pin behaviour that was checked to agree with the official scripts."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from unlearn_fast.cli.main import main
from unlearn_fast.eval import tsne
from unlearn_fast.models.mage_generate import write_paint_outputs

def unit_clusters(n_per, d=12, k=4, seed=0):
    """k clusters of unit vectors (like CLIP rows), [k * n_per, d] float64."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3
    x = np.concatenate([c + rng.standard_normal((n_per, d)) for c in centers])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def official_tsne(x: np.ndarray, y0: np.ndarray, n_iter: int, perplexity: float = 20.0, eta: float = 500.0) -> np.ndarray:
    """tsne_visual.py's t-SNE restated in float64 torch, point by point as it loops (REFERENCE.md §5.4):
    bisection of each row's precision from beta = 1 (tol 1e-5, 50 tries), P symmetrised, x4, clamped at 1e-21;
    per point gradient sum_j (P - Q)_ji num_ji (y_i - y_j); gains +0.2 / x0.8 (min 0.01); momentum 0.5 -> 0.8
    after 20 iterations; step 500; P / 4 after iteration 100."""
    X = torch.tensor(x, dtype=torch.float64)
    n = X.shape[0]
    sq = (X * X).sum(1)
    D = sq[:, None] + sq[None, :] - 2 * X @ X.T
    P = torch.zeros(n, n, dtype=torch.float64)
    log_u = math.log(perplexity)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        di = D[i, others]

        def h_beta(b):
            p = torch.exp(-di * b)
            return torch.log(p.sum()) + b * (di * p).sum() / p.sum(), p / p.sum()

        beta, lo, hi = 1.0, None, None
        h, row = h_beta(beta)
        tries = 0
        while abs(float(h) - log_u) > 1e-5 and tries < 50:
            if float(h) > log_u:
                lo = beta
                beta = beta * 2 if hi is None else (beta + hi) / 2
            else:
                hi = beta
                beta = beta / 2 if lo is None else (beta + lo) / 2
            h, row = h_beta(beta)
            tries += 1
        P[i, others] = row
    P = P + P.T
    P = torch.clamp_min(P / P.sum() * 4.0, 1e-21)
    Y = torch.tensor(y0, dtype=torch.float64)
    iY, gains = torch.zeros_like(Y), torch.ones_like(Y)
    for it in range(n_iter):
        sy = (Y * Y).sum(1)
        num = 1.0 / (1.0 + sy[:, None] + sy[None, :] - 2 * Y @ Y.T)
        num.fill_diagonal_(0.0)
        Q = torch.clamp_min(num / num.sum(), 1e-12)
        PQ = P - Q
        dY = torch.stack([((PQ[:, i] * num[:, i])[:, None] * (Y[i] - Y)).sum(0) for i in range(n)])
        momentum = 0.5 if it < 20 else 0.8
        gains = torch.where((dY > 0) != (iY > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        iY = momentum * iY - eta * gains * dY
        Y = Y + iY
        Y = Y - Y.mean(0)
        if it == 100:
            P = P / 4.0
    return Y.numpy()


# ---- T-SNE (tsne_visual.py) ----------------------------------------------------------------------------------

def test_reference_backend_is_tsne_visual_step_by_step():
    # sound. At the reference step 500 the map is chaotic (a 1e-16 difference grows to O(1) within ~50
    # iterations), so the whole schedule (momentum switch at 20, exaggeration off after 100) is compared at a
    # gentle step; ending the exaggeration one iteration early moves the result by > 0.05 there.
    x = unit_clusters(10)  # 40 points > perplexity 20
    y0 = np.random.default_rng(7).standard_normal((40, 2))  # tsne_reference's init for seed 7
    want = official_tsne(x, y0, 130, eta=10.0)
    np.testing.assert_allclose(tsne.tsne_reference(x, n_iter=130, seed=7, learning_rate=10.0), want, rtol=0,
                               atol=1e-12)
    want = official_tsne(x, y0, 12)
    # at the reference step the rounding of the machine's BLAS (1e-16) grows ~1e7-fold in 12 iterations (1.35e-9
    # measured on an AVX2-only EPYC); learning rate 490 for 500, or 11 iterations, move it by ~9-11
    np.testing.assert_allclose(tsne.tsne_reference(x, n_iter=12, seed=7), want, rtol=0, atol=1e-7)


def test_finding_default_backend_is_the_reference_algorithm(tmp_path, monkeypatch):
    # before: backend "auto" (the default of tsne_embed, run_tsne and so of `unlearn-fast tsne`, which has no
    # backend flag) ran sklearn's TSNE whenever scikit-learn was installed: 250 exaggerated iterations, init
    # scaled by 1e-4, early stopping; not tsne_visual.py's algorithm
    x = unit_clusters(6)
    np.testing.assert_array_equal(tsne.tsne_embed(x, n_iter=40, seed=3),
                                  tsne.tsne_embed(x, n_iter=40, seed=3, backend="reference"))

    def no_sklearn(*a, **k):
        raise AssertionError("the default T-SNE ran sklearn")

    monkeypatch.setattr(tsne, "_sklearn_tsne", no_sklearn)
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    for stem in ("center_8_forget", "center_8_retain", "original_forget", "original_retain"):
        np.save(tmp_path / f"{stem}_clip_norm_5k.npy", rng.normal(size=(6, 5)))
    monkeypatch.chdir(tmp_path)
    assert main(["tsne", "--ckpt_folder", str(tmp_path), "--stride", "1"]) == 0
    assert (tmp_path / "vqgan_mask_ratio_tsne.png").is_file() and (tmp_path / "vqgan_mask_ratio_tsne.pdf").is_file()


def _capture_tsne(monkeypatch):
    seen = {}

    def fake_embed(x, **kw):
        seen["x"], seen["kw"] = np.array(x), kw
        return np.zeros((len(x), 2))

    def fake_plot(points, labels, out_stem, **kw):
        seen["labels"] = np.array(labels)
        return out_stem + ".png", out_stem + ".pdf"

    monkeypatch.setattr(tsne, "tsne_embed", fake_embed)
    monkeypatch.setattr(tsne, "plot_tsne", fake_plot)
    return seen


def test_finding_originals_come_from_pretrained_like_tsne_visual(tmp_path, monkeypatch):
    # tsne_visual.py reads the originals from ./pretrained/{forget,retain}_clip_norm_5k.txt (written once by
    # clip_embed.py from the sorted full_test.csv images). Before: without --original_folder they were looked
    # for only in the generated folder, where <F>/{forget,retain}_clip_norm_5k.txt is what clip_embed.py
    # --scan_mode 0 writes: embeddings of the *generated* images, silently taken for the originals.
    pytest.importorskip("matplotlib")
    folder, pretrained = tmp_path / "ck-inpaint", tmp_path / "pretrained"
    folder.mkdir()
    pretrained.mkdir()
    rng = np.random.default_rng(1)
    files = {}
    for name, where in (("center_8_forget", folder), ("center_8_retain", folder), ("forget", pretrained),
                        ("retain", pretrained), ("forget", folder), ("retain", folder)):
        rows = rng.normal(size=(1000, 4))
        np.savetxt(where / f"{name}_clip_norm_5k.txt", rows)  # the reference's np.savetxt files
        files[(name, where)] = rows
    seen = _capture_tsne(monkeypatch)
    monkeypatch.chdir(tmp_path)
    tsne.run_tsne(str(folder), out_stem=str(tmp_path / "fig"))
    want = np.concatenate([files[("center_8_forget", folder)][::100], files[("center_8_retain", folder)][::100],
                           files[("forget", pretrained)][::100], files[("retain", pretrained)][::100]])
    np.testing.assert_array_equal(seen["x"], want)  # every 100th row, in tsne_visual.py's order
    np.testing.assert_array_equal(seen["labels"], np.repeat([0, 1, 2, 3], 10))
    # an explicit --original_folder takes the reference names there; our own original_* files come first
    tsne.run_tsne(str(folder), original_folder=str(folder), out_stem=str(tmp_path / "fig"))
    np.testing.assert_array_equal(seen["x"][20:30], files[("forget", folder)][::100])
    np.save(folder / "original_forget_clip_norm_5k.npy", files[("forget", pretrained)])
    np.save(folder / "original_retain_clip_norm_5k.npy", files[("retain", pretrained)])
    tsne.run_tsne(str(folder), out_stem=str(tmp_path / "fig"))
    np.testing.assert_array_equal(seen["x"], want)
    os.remove(folder / "original_retain_clip_norm_5k.npy")
    os.remove(pretrained / "retain_clip_norm_5k.txt")
    with pytest.raises(FileNotFoundError, match="retain_clip_norm_5k"):
        tsne.run_tsne(str(folder), out_stem=str(tmp_path / "fig"))


def test_finding_figure_uses_the_reference_font_size(tmp_path, monkeypatch):
    # tsne_visual.py sets plt.rcParams['font.size'] = 20 (legend and ticks 20 pt); before: matplotlib's 10 pt
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    before = plt.rcParams["font.size"]
    pts = np.random.default_rng(0).normal(size=(8, 2))
    tsne.plot_tsne(pts, np.repeat([0, 1, 2, 3], 2), str(tmp_path / "fig"))
    fig = figs[0]
    ax = fig.axes[0]
    assert [t.get_fontsize() for t in ax.get_legend().get_texts()] == [20.0] * 4
    assert ax.get_xticklabels()[0].get_fontsize() == 20.0
    assert tuple(fig.get_size_inches()) == (8.0, 6.0) and ax.get_title() == "(b) VQ-GAN"
    assert plt.rcParams["font.size"] == before  # the global settings are left alone
    real_close(fig)


# ---- image files (testpaint.py's cv2.imwrite) -------------------------------------------------------------

def _ijg_table(base, quality):
    """libjpeg's jpeg_set_quality scaling of a standard table (force_baseline: values clamped to 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((b * scale + 50) // 100, 1), 255) for b in base]


_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def test_jpeg_files_are_what_cv2_imwrite_writes(tmp_path):
    # sound: baseline JPEG, libjpeg quality-95 tables, 4:2:0 chroma, floor(clip(x * 255)), R/B swapped. With
    # opencv-python 4.10 the files were byte-identical to cv2.imwrite(path, clip(x * 255).int()) of the RGB array.
    x = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    path = write_paint_outputs(x, str(tmp_path), ["forget"], ["n01443537"], ["ILSVRC2012_val_00000236.JPEG"],
                               "outpaint", 3 / 16)[0]
    assert path == str(tmp_path / "forget" / "n01443537" / "outpaint_0.1875_ILSVRC2012_val_00000236.JPEG")
    with Image.open(path) as img:
        assert img.format == "JPEG" and not img.info.get("progressive") and JpegImagePlugin.get_sampling(img) == 2
        q = img.quantization
        # zig-zag order in the file; the standard tables are in natural order, compare as sorted multisets
        assert sorted(q[0]) == sorted(_ijg_table(_LUMA, 95)) and sorted(q[1]) == sorted(_ijg_table(_CHROMA, 95))
    try:
        import cv2
    except ImportError:
        return
    ref = str(tmp_path / "ref.JPEG")
    cv2.imwrite(ref, torch.clip(x[0].permute(1, 2, 0) * 255, 0, 255).int().numpy())
    assert open(ref, "rb").read() == open(path, "rb").read()


def test_png_files_hold_the_floor_of_the_composite_in_bgr(tmp_path):
    # sound: testpaint.py truncates (.int() of clip(x * 255)), it does not round; 0.9 * 255 = 229.5 -> 229
    x = torch.tensor([0.9, 0.5, 1.0 / 255 - 1e-6, 1.2, -0.1, 0.0]).view(1, 3, 1, 2).expand(1, 3, 3, 2).clone()
    path = write_paint_outputs(x, str(tmp_path), ["retain"], ["n0"], ["a.png"], "center", 0.5)[0]
    got = np.asarray(Image.open(path)).astype(int)  # [H, W, 3] as stored: B, G, R of the array
    want = np.floor(np.clip(x[0].permute(1, 2, 0).numpy() * 255, 0, 255)).astype(int)[..., ::-1]
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 2] == 229 and got[0, 1, 2] == 127  # R of pixel 0 is 0.9 (B on disk), of pixel 1 is 0.5


def test_outpaint_files_are_the_names_eval_py_and_clip_embed_py_glob(tmp_path):
    # sound: testpaint.py names <mode>_<str(k / 16.0)>_<name> under <split>/<wnid>/; eval.py globs
    # <split>/*/<mode>_<k / 16.0>_ILSVRC2012_*.JPEG for k = 1..13, clip_embed.py <split>/*/<mode>_<k / 16.0>_*.JPEG
    # for k in {4, 8}
    import fnmatch

    from unlearn_fast.eval import layout
    from unlearn_fast.models import create_model
    from unlearn_fast.models.mage_generate import run_paint
    torch.manual_seed(0)
    model = create_model("mage_micro").eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    name = "ILSVRC2012_val_00037846.JPEG"
    paths = run_paint(model, [(x, ["forget"], ["n01443537"], [name])], str(tmp_path), "outpaint")
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    assert rel == [f"forget/n01443537/outpaint_{k / 16.0}_{name}" for k in range(1, 14)]
    for k in range(1, 14):
        hits = [r for r in rel if fnmatch.fnmatchcase(r, f"forget/*/outpaint_{k / 16.0}_ILSVRC2012_*.JPEG")]
        assert len(hits) == 1 and layout.generated_prefix("outpaint", k) == f"outpaint_{k / 16.0}_"
    for k in (4, 8):
        assert sum(fnmatch.fnmatchcase(r, f"forget/*/outpaint_{k / 16.0}_*.JPEG") for r in rel) == 1


def test_the_official_scripts_short_and_unused_flags_are_accepted(monkeypatch):
    """eval.py's ``-d`` (its --dst) and tsne_visual.py's --ratio / --cuda parse as in the official scripts."""
    import unlearn_fast.cli.tools as tools
    import unlearn_fast.eval.tsne as tsne_mod
    seen = {}
    monkeypatch.setattr(tsne_mod, "run_tsne", lambda folder, **kw: seen.update(folder=folder, **kw) or ("a", "b"))
    assert tools.tsne_main(["--ckpt_folder", "F", "--ratio", "65", "--cuda", "1", "--crop_size", "8"]) == 0
    assert seen["folder"] == "F" and seen["crop_size"] == 8

def test_eval_takes_d_as_its_dst(tmp_path, capsys):
    missing = str(tmp_path / "generated")
    rc = main(["eval", "-d", missing, "--task", "inpaint"])
    err = capsys.readouterr().err
    assert rc == 2 and missing in err and "unrecognized" not in err and "required" not in err, err
