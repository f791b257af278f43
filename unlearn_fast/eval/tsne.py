"""T-SNE of CLIP embeddings: unlearned vs original, forget vs retain (§5.4, the paper's Figure 4).

Two backends, both with the reference settings (perplexity 20, 1000 iterations, learning rate 500,
early exaggeration 4, random init, no PCA):

- ``"reference"``: this module's own exact-gradient t-SNE in float64 numpy, the algorithm of
  ``tsne_visual.py``: per-point binary search of the Gaussian precision to the target perplexity
  (tolerance 1e-5, 50 tries), P symmetrised and clamped at 1e-21, Student-t Q clamped at 1e-12,
  gradient without the constant factor 4, momentum 0.5 then 0.8 after 20 iterations, adaptive gains
  (+0.2 / x0.8, min 0.01), exaggeration x4 until iteration 100, init ``randn`` (seeded here).
- ``"sklearn"``: ``sklearn.manifold.TSNE(method="exact", init="random")``. sklearn's gradient carries the
  constant factor 4 that the reference's omits, so the reference step size 500 is passed as
  ``learning_rate=500 / 4``. Its exaggeration phase lasts 250 iterations and its init is scaled by 1e-4,
  so pictures differ in detail. The iteration argument is
  ``max_iter`` (sklearn >= 1.5) or ``n_iter`` (older); the installed version is checked.

``"reference"`` is the default (what ``tsne_visual.py`` computes; 200 points take about a second);
``"auto"`` uses sklearn when installed, else the reference backend. matplotlib is imported only by
:func:`plot_tsne` (a clear ImportError if it is missing). The figure is the reference's: 8 x 6 in, font size 20.
"""
from __future__ import annotations

import glob
import inspect
import os
from typing import Sequence

import numpy as np

from ..atomic_files import atomic_write_with
from ..train.run_outputs import check_creatable_dir
from .clip_cosine import load_embeddings

__all__ = ["tsne_embed", "tsne_reference", "conditional_probabilities", "plot_tsne", "run_tsne", "TSNE_LABELS",
           "available_memory_bytes"]

_NN_MATRICES = 6  # [N, N] float64 arrays alive at once in either exact backend (distances, P, Q, W, temporaries)

TSNE_LABELS = ("Unlearn-Forget Set", "Unlearn-Retain Set", "Original-Forget Set", "Original-Retain Set")


def _squared_distances(x: np.ndarray) -> np.ndarray:
    sq = np.sum(x * x, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)  # [N, N]


def _entropy_and_p(d: np.ndarray, beta: float) -> tuple[float, np.ndarray]:
    p = np.exp(-(d - d.min()) * beta)  # shifting by min(d) leaves P and H unchanged, avoids underflow
    s = p.sum()
    h = np.log(s) + beta * np.sum((d - d.min()) * p) / s
    return float(h), p / s


def conditional_probabilities(x: np.ndarray, perplexity: float = 20.0, tol: float = 1e-5,
                              max_tries: int = 50) -> np.ndarray:
    """P[i, j] = p(j | i) [N, N], each row's Gaussian precision found by bisection to ``perplexity``."""
    n = x.shape[0]
    d = _squared_distances(x)
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d[i], i)
        beta, beta_min, beta_max = 1.0, None, None
        h, pi = _entropy_and_p(di, beta)
        tries = 0
        while abs(h - target) > tol and tries < max_tries:
            if h > target:  # too flat: raise the precision
                beta_min = beta
                beta = beta * 2.0 if beta_max is None else (beta + beta_max) / 2.0
            else:
                beta_max = beta
                beta = beta / 2.0 if beta_min is None else (beta + beta_min) / 2.0
            h, pi = _entropy_and_p(di, beta)
            tries += 1
        p[i, np.arange(n) != i] = pi
    return p


def tsne_reference(x: np.ndarray, *, n_components: int = 2, perplexity: float = 20.0, n_iter: int = 1000,
                   learning_rate: float = 500.0, early_exaggeration: float = 4.0, exaggeration_iters: int = 100,
                   seed: int = 0) -> np.ndarray:
    """The reference t-SNE (see module docstring) of x [N, D]; returns float64 [N, n_components]."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, n_components))
    update = np.zeros_like(y)
    gains = np.ones_like(y)
    p = conditional_probabilities(x, perplexity)
    p = p + p.T
    p = np.maximum(p / p.sum() * early_exaggeration, 1e-21)
    for it in range(n_iter):
        num = 1.0 / (1.0 + _squared_distances(y))  # [N, N] Student-t kernel
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        w = (p - q) * num  # [N, N], symmetric
        grad = w.sum(axis=1)[:, None] * y - w @ y  # sum_j w_ij (y_i - y_j)
        momentum = 0.5 if it < 20 else 0.8
        same_sign = (grad > 0) == (update > 0)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        update = momentum * update - learning_rate * gains * grad
        y = y + update
        y = y - y.mean(axis=0)
        if it == exaggeration_iters:
            p = p / early_exaggeration
    return y


def _sklearn_tsne(x: np.ndarray, *, perplexity, n_iter, learning_rate, early_exaggeration, seed) -> np.ndarray:
    from sklearn.manifold import TSNE

    params = inspect.signature(TSNE).parameters
    iter_kw = {"max_iter": n_iter} if "max_iter" in params else {"n_iter": n_iter}
    # learning_rate is in the reference's convention (gradient without the factor 4); sklearn's has it.
    return TSNE(n_components=2, perplexity=perplexity, learning_rate=learning_rate / 4.0,
                early_exaggeration=early_exaggeration, init="random", method="exact",
                random_state=seed, **iter_kw).fit_transform(x)


def _sklearn_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def available_memory_bytes() -> int | None:
    """Memory the process could still take (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(n: int) -> None:
    """Exact t-SNE holds several [N, N] matrices: refuse a size that cannot fit instead of swapping or being killed."""
    need, free = _NN_MATRICES * 8 * n * n, available_memory_bytes()
    if free is not None and need > free:
        raise ValueError(f"exact t-SNE of {n} points needs about {need / 2 ** 20:.0f} MiB ({_NN_MATRICES} [N, N] "
                         f"float64 matrices), more than the {free / 2 ** 20:.0f} MiB free; use fewer points "
                         "(tsne: raise --stride; the reference keeps every 100th row)")


def tsne_embed(x, *, perplexity: float = 20.0, n_iter: int = 1000, learning_rate: float = 500.0,
               early_exaggeration: float = 4.0, seed: int = 0, backend: str = "reference") -> np.ndarray:
    """2-D t-SNE of x [N, D] (numpy or torch); backend "reference" (tsne_visual.py's algorithm) | "sklearn" |
    "auto" (sklearn when installed)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or inf")
    if x.shape[0] <= perplexity:
        raise ValueError(f"t-SNE needs more points than the perplexity: N={x.shape[0]}, perplexity={perplexity}")
    if backend not in ("auto", "sklearn", "reference"):
        raise ValueError(f"backend must be 'auto', 'sklearn' or 'reference', got {backend!r}")
    if backend == "auto":
        backend = "sklearn" if _sklearn_available() else "reference"
    _check_memory(x.shape[0])
    kw = dict(perplexity=perplexity, n_iter=n_iter, learning_rate=learning_rate,
              early_exaggeration=early_exaggeration, seed=seed)
    if backend == "sklearn":
        if not _sklearn_available():
            raise ImportError("backend='sklearn' needs scikit-learn (pip install scikit-learn); "
                              "backend='reference' needs nothing")
        return _sklearn_tsne(x, **kw)
    return tsne_reference(x, **kw)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting the T-SNE needs matplotlib: pip install matplotlib") from e
    return plt


def plot_tsne(points: np.ndarray, labels: Sequence[int], out_stem: str, *,
              label_names: Sequence[str] = TSNE_LABELS, title: str = "(b) VQ-GAN") -> tuple[str, str]:
    """Scatter plot of 2-D points coloured by integer labels; writes ``<out_stem>.png`` and ``.pdf``."""
    plt = _pyplot()
    points = np.asarray(points)
    labels = np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or labels.shape != (points.shape[0],):
        raise ValueError(f"need points [N, 2] and labels [N], got {points.shape} and {labels.shape}")
    markers, colors = ["s", "s", "x", "x"], ["red", "blue", "green", "#ED7D31"]
    with plt.rc_context({"font.size": 20}):  # tsne_visual.py's rcParams, without changing the caller's
        fig, ax = plt.subplots(figsize=(8, 6))
        for i, name in enumerate(label_names):
            sel = labels == i
            if sel.any():
                ax.scatter(points[sel, 0], points[sel, 1], s=160, marker=markers[i % 4], color=colors[i % 4],
                           label=name, linewidths=4 if markers[i % 4] == "x" else 1)
        ax.legend()
        ax.grid(True)
        ax.set_title(title)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out_stem)), exist_ok=True)
        png, pdf = out_stem + ".png", out_stem + ".pdf"
        try:
            for path, fmt in ((png, "png"), (pdf, "pdf")):  # whole or not at all; a failed write names the file
                atomic_write_with(path, lambda fh, fmt=fmt: fig.savefig(fh, format=fmt))
        finally:
            plt.close(fig)
    return png, pdf


def _find_one(folder: str, stem_pattern: str) -> str:
    for ext in (".npy", ".txt"):
        hits = sorted(glob.glob(os.path.join(glob.escape(folder), stem_pattern + ext)))  # "[" in a path is literal
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no embedding file {stem_pattern}.npy or .txt in {folder}")


def _find_originals(ckpt_folder: str, original_folder: str | None, split: str) -> str:
    """The originals' embeddings: ``original_<split>_clip_norm_5k.*`` (what run_clip_eval writes) in
    ``original_folder`` or ``ckpt_folder``; else the reference's ``<split>_clip_norm_5k.*`` in ``original_folder``,
    by default ``./pretrained/`` (tsne_visual.py's place). Never ``<ckpt_folder>/<split>_clip_norm_5k``: there
    clip_embed.py ``--scan_mode 0`` keeps embeddings of the generated images."""
    ours, reference = original_folder or ckpt_folder, original_folder or "pretrained"
    for folder, stem in ((ours, f"original_{split}_clip_norm_5k"), (reference, f"{split}_clip_norm_5k")):
        try:
            return _find_one(folder, stem)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(f"no embeddings of the original {split} images: neither original_{split}_clip_norm_5k"
                            f".npy/.txt in {ours} (eval --clip) nor {split}_clip_norm_5k.npy/.txt in {reference} "
                            "(clip_embed.py); pass the folder with --original_folder")


def run_tsne(ckpt_folder: str, *, original_folder: str | None = None, crop_size: int = 8, stride: int = 100,
             out_stem: str = "vqgan_mask_ratio_tsne", title: str = "(b) VQ-GAN", seed: int = 0,
             backend: str = "reference") -> tuple[str, str]:
    """T-SNE figure from the CLIP embeddings that :func:`run_clip_eval` (or the reference) wrote.

    Reads ``<ckpt_folder>/*_<crop_size>_{forget,retain}_clip_norm_5k.{npy,txt}`` and the originals' (see
    :func:`_find_originals`: ``<ckpt_folder>/original_*``, else ``./pretrained/{forget,retain}_clip_norm_5k.*``
    as tsne_visual.py), keeps every ``stride``-th row, and writes ``<out_stem>.png`` and ``.pdf``.
    Returns the two paths.
    """
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    check_creatable_dir(os.path.dirname(os.path.abspath(out_stem)), "the T-SNE figure's folder")  # before the work
    paths = [_find_one(ckpt_folder, f"*_{crop_size}_{split}_clip_norm_5k") for split in ("forget", "retain")]
    paths += [_find_originals(ckpt_folder, original_folder, split) for split in ("forget", "retain")]
    sets = [load_embeddings(p) for p in paths]
    dims = {p: s.shape[1] for p, s in zip(paths, sets)}
    if len(set(dims.values())) > 1:
        raise ValueError(f"the embedding files differ in dimension: {dims}")
    sets = [s[::stride] for s in sets]
    x = np.concatenate(sets)  # [4 * n, D]
    if x.shape[0] <= 20:  # the reference perplexity
        raise ValueError(f"t-SNE needs more than 20 points: every {stride}-th row of the four embedding files "
                         f"gives {x.shape[0]} ({', '.join(str(len(s)) for s in sets)}); lower the stride (--stride)")
    labels = np.concatenate([np.full(len(s), i) for i, s in enumerate(sets)])
    _pyplot()  # a missing matplotlib is reported before the t-SNE runs, not after
    y = tsne_embed(x, seed=seed, backend=backend)
    return plot_tsne(y, labels, out_stem, title=title)
