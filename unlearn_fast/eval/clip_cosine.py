"""CLIP cosine between each generated image and its original (§5.3).

score = mean_i < g_i / |g_i| , o_i / |o_i| >   over pairs (generated_i, original_i) matched by file name.

Embedding follows ``clip_embed.py``: the open_clip eval preprocess on the PIL image as read, then, for
BGR-on-disk generated files, a channel flip *after* the preprocess (so CLIP's per-channel normalisation was
applied in BGR order: a reference quirk kept for comparable numbers; ``flip_after_preprocess=False``
flips before instead). Embeddings are L2-normalised in float32 (as the reference), and the score is the mean
of the plain dot products of those float32 unit rows, accumulated in float64 (the reference reads them back
from text files as float64 and does not normalise again).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic_files import atomic_write_with
from .layout import ImagePair
from .preprocess import open_rgb

__all__ = ["paired_cosine_mean", "embed_images", "clip_cosine_for_pairs", "save_embeddings", "load_embeddings"]


def _as_2d_float64(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def paired_cosine_mean(generated: Any, original: Any, *, normalize: bool = True) -> float:
    """Mean over rows of the cosine between generated[i] and original[i]; both [N, D], numpy or torch."""
    g = _as_2d_float64(generated, "generated")
    o = _as_2d_float64(original, "original")
    if g.shape != o.shape:
        raise ValueError(f"generated and original embeddings must have one shape, got {g.shape} and {o.shape}")
    if g.shape[0] == 0:
        raise ValueError("no embedding pairs")
    if normalize:
        gn, on = np.linalg.norm(g, axis=1, keepdims=True), np.linalg.norm(o, axis=1, keepdims=True)
        if np.any(gn == 0) or np.any(on == 0):
            raise ValueError("an embedding is all zeros; its cosine is undefined")
        g, o = g / gn, o / on
    return float(np.mean(np.sum(g * o, axis=1)))


def _load_batch(paths: Sequence[str], preprocess: Callable, bgr_on_disk: bool,
                flip_after_preprocess: bool) -> torch.Tensor:
    batch = []
    for path in paths:
        img = open_rgb(path)  # a corrupt file: ValueError naming it
        if bgr_on_disk and not flip_after_preprocess:
            img = Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., ::-1]))
        x = preprocess(img)  # [3, 224, 224]
        if bgr_on_disk and flip_after_preprocess:
            x = x[[2, 1, 0]]
        batch.append(x)
    return torch.stack(batch)


@torch.no_grad()
def embed_images(paths: Sequence[str], model: torch.nn.Module, preprocess: Callable, *, bgr_on_disk: bool,
                 flip_after_preprocess: bool = True, batch_size: int = 64,
                 device: str | torch.device = "cpu", bar=None) -> np.ndarray:
    """L2-normalised embeddings float32 [N, D] of the image files ``paths`` (``model``: CLIP visual tower);
    ``bar`` (a progress bar) advances by each batch's images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images to embed are missing, e.g. {missing[:3]}")
    out = []
    for start in range(0, len(paths), batch_size):
        x = _load_batch(paths[start:start + batch_size], preprocess, bgr_on_disk, flip_after_preprocess)
        feats = model(x.to(device)).float()  # [B, D]
        out.append((feats / feats.norm(dim=-1, keepdim=True)).cpu())
        if bar is not None:
            bar.update(x.shape[0])
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out).numpy()


def clip_cosine_for_pairs(pairs: Sequence[ImagePair], model: torch.nn.Module, preprocess: Callable, *,
                          generated_bgr: bool = True, batch_size: int = 64, device: str | torch.device = "cpu",
                          original_embeddings: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean cosine, generated embeddings [N, D], original embeddings [N, D]) for name-matched pairs.

    ``original_embeddings`` (rows in the order of ``pairs``) skips re-embedding the originals.
    """
    if not pairs:
        raise ValueError("no image pairs to compare")
    gen = embed_images([p.generated for p in pairs], model, preprocess, bgr_on_disk=generated_bgr,
                       batch_size=batch_size, device=device)
    given = original_embeddings is not None  # given rows may not be unit length: normalise those
    if not given:
        original_embeddings = embed_images([p.original for p in pairs], model, preprocess, bgr_on_disk=False,
                                           batch_size=batch_size, device=device)
    return (paired_cosine_mean(gen, original_embeddings, normalize=given), gen, np.asarray(original_embeddings))


def save_embeddings(path: str, embeddings: np.ndarray, names: Sequence[str] | None = None) -> None:
    """Save [N, D] embeddings: ``.txt`` as the reference's ``np.savetxt``, else ``.npy`` (+ names in ``.names``).

    Each file is written whole or not at all (an interrupted run leaves the previous file, or none).
    """
    embeddings = np.asarray(embeddings)
    if names is not None and len(names) != embeddings.shape[0]:
        raise ValueError(f"{len(names)} names for {embeddings.shape[0]} embeddings")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".txt"):
        atomic_write_with(path, lambda f: np.savetxt(f, embeddings))
    else:
        atomic_write_with(path, lambda f: np.save(f, embeddings))
    if names is not None:
        atomic_write_with(path + ".names", lambda f: f.write("".join(n + "\n" for n in names).encode("utf-8")))


def load_embeddings(path: str) -> np.ndarray:
    """[N, D] float64 embeddings from a reference ``.txt`` (np.savetxt) or a ``.npy`` file.

    A damaged, empty, non-2-D or non-finite file is a ValueError naming it (e.g. one an interrupted run cut).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedding file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # loadtxt's "empty input file": reported below
            arr = np.loadtxt(path, ndmin=2) if path.endswith(".txt") else np.load(path)
        if not isinstance(arr, np.ndarray):  # an .npz archive
            raise ValueError(f"expected one array, got {type(arr).__name__}")
        arr = np.atleast_2d(np.asarray(arr, dtype=np.float64))
    except (ValueError, TypeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read embedding file {path} (damaged, or cut by an interrupted run?): "
                         f"{type(e).__name__}: {e}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"embedding file {path} holds an array of shape {arr.shape}, not embeddings [N, D]")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"embedding file {path} contains NaN or inf")
    return arr
