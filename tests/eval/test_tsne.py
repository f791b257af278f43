"""T-SNE: perplexity calibration, cluster separation for both backends, plotting, run_tsne on embedding files."""
import importlib
import sys

import numpy as np
import pytest

from unlearn_fast.eval import tsne

try:
    import sklearn  # noqa: F401
    HAS_SKLEARN = True
except ImportError:
    HAS_SKLEARN = False
try:
    import matplotlib  # noqa: F401
    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def blobs(n_per=23, d=20, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 8
    x = np.concatenate([c + rng.standard_normal((n_per, d)) for c in centers])
    return x, np.repeat(np.arange(k), n_per)


def nearest_neighbour_agreement(y, labels):
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float(np.mean(labels[d.argmin(1)] == labels))


def test_conditional_probabilities_hit_the_target_perplexity():
    x, _ = blobs(n_per=15, d=5)
    p = tsne.conditional_probabilities(x, perplexity=20.0)
    assert np.allclose(p.sum(1), 1.0) and np.all(np.diag(p) == 0)
    rows = np.where(p > 0, p, 1.0)
    entropy = -np.sum(np.where(p > 0, p * np.log(rows), 0.0), axis=1)
    np.testing.assert_allclose(np.exp(entropy), 20.0, rtol=1e-4)


def test_reference_backend_separates_clusters_and_is_seeded():
    x, labels = blobs()
    y = tsne.tsne_embed(x, backend="reference", n_iter=300, seed=1)
    assert y.shape == (69, 2) and np.all(np.isfinite(y))
    assert nearest_neighbour_agreement(y, labels) == 1.0
    np.testing.assert_array_equal(y, tsne.tsne_embed(x, backend="reference", n_iter=300, seed=1))
    assert not np.array_equal(y, tsne.tsne_embed(x, backend="reference", n_iter=300, seed=2))


def test_reference_gradient_is_the_vectorised_loop():
    # grad_i = sum_j (P_ij - Q_ij) num_ij (y_i - y_j): compare the matrix form with the per-point loop.
    rng = np.random.default_rng(3)
    y, p = rng.standard_normal((9, 2)), rng.random((9, 9))
    p = (p + p.T) / (p + p.T).sum()
    num = 1 / (1 + tsne._squared_distances(y))
    np.fill_diagonal(num, 0)
    q = num / num.sum()
    w = (p - q) * num
    vec = w.sum(1)[:, None] * y - w @ y
    loop = np.stack([np.sum(((p - q)[:, i] * num[:, i])[:, None] * (y[i] - y), 0) for i in range(9)])
    np.testing.assert_allclose(vec, loop, atol=1e-12)


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed")
def test_sklearn_backend_separates_clusters():
    x, labels = blobs()
    y = tsne.tsne_embed(x, backend="sklearn", seed=0)  # sklearn exaggerates for 250 iterations
    assert y.shape == (69, 2)
    assert nearest_neighbour_agreement(y, labels) == 1.0


def test_input_errors():
    with pytest.raises(ValueError, match="more points than the perplexity"):
        tsne.tsne_embed(np.random.rand(10, 3))
    with pytest.raises(ValueError, match="backend"):
        tsne.tsne_embed(np.random.rand(30, 3), backend="umap")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        tsne.tsne_embed(np.random.rand(30))


def test_module_import_does_not_import_matplotlib(monkeypatch):
    # With matplotlib made unimportable, (re)importing the module must still work.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    importlib.reload(tsne)
    assert callable(tsne.tsne_embed)


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_run_tsne_reads_embeddings_and_writes_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    d = 16
    centers = rng.standard_normal((4, d)) * 5
    files = {"center_8_forget_clip_norm_5k.npy": 0, "center_8_retain_clip_norm_5k.txt": 1,
             "original_forget_clip_norm_5k.npy": 2, "original_retain_clip_norm_5k.npy": 3}
    for name, i in files.items():
        emb = centers[i] + rng.standard_normal((300, d))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        (np.savetxt if name.endswith(".txt") else np.save)(str(tmp_path / name), emb)
    png, pdf = tsne.run_tsne(str(tmp_path), crop_size=8, stride=10, out_stem=str(tmp_path / "fig"),
                             backend="reference")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(pdf, "rb").read(5) == b"%PDF-"
    with pytest.raises(FileNotFoundError, match="_4_forget_clip_norm_5k"):
        tsne.run_tsne(str(tmp_path), crop_size=4)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        tsne.plot_tsne(np.zeros((4, 2)), [0, 1, 2, 3], "/tmp/never")


def test_auto_backend_without_sklearn_is_the_reference(monkeypatch):
    x, _ = blobs(n_per=8, d=4)
    want = tsne.tsne_embed(x, backend="reference", n_iter=50, seed=3)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    np.testing.assert_array_equal(tsne.tsne_embed(x, n_iter=50, seed=3), want)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        tsne.tsne_embed(x, backend="sklearn")
