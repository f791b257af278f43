"""End-to-end metric runs over generated folders, writing the reference CSV rows (§5.2, §5.3, §5.5).

    from unlearn_fast.eval import run_eval, run_clip_eval
    run_eval("out/checkpoint-5-inpaint/", "inpaint", "../dataset/imagenet1k/val/")        # fid_is_eval_inpaint.csv
    run_clip_eval("out/checkpoint-5-inpaint/", "inpaint", "../dataset/imagenet1k/val/")   # clip_cosine_inpaint.csv

Deliberate differences from the reference scripts (numbers are the same up to float round-off):
- images are paired with their originals by file name and visited in sorted order (the reference used
  glob order; FID does not depend on order, the IS splits do);
- the original images' features are computed once per run, not once per (mode, ratio);
- batch sizes are free (reference: IS batch 2, FID batch 32); CLIP embeddings go to ``.npy`` (or ``.txt``).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..train.progress import progress_bar
from ..train.run_outputs import check_creatable_dir
from . import csv_rows, layout
from .clip_cosine import embed_images, paired_cosine_mean, save_embeddings
from .feature_extractors import (load_cleanfid_inception, load_clip_visual, load_places365_resnet50,
                                 load_torchvision_inception)
from .frechet import METHODS as FID_METHODS
from .frechet import fid_from_features
from .inception_score import PALETTE_SHUFFLE_SEED, inception_score_from_probs
from .preprocess import cleanfid_input, mage_is_input, places365_is_input, upsample_for_inception

__all__ = ["cleanfid_features", "classifier_probs", "originals_root", "run_eval", "run_clip_eval", "run_palette_eval",
           "run_palette_clip_eval"]


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[str], load: Callable[[str], torch.Tensor]):
        self.paths, self.load = list(paths), load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(self.paths[i])


def _batches(paths, load, batch_size: int, num_workers: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not paths:
        raise ValueError("no images to evaluate")
    loader = DataLoader(_ImageFiles(paths, load), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ValueError, FileNotFoundError) as e:
            text = str(e).strip()
            if "DataLoader worker" in text:  # a worker's error carries its whole traceback: keep the message
                raise type(e)(text.splitlines()[-1].split(": ", 1)[-1]) from None
            raise
        yield batch


def _check_csv_target(csv_dir: str, csv_name: str) -> None:
    """Fail before any network runs if the CSV cannot be appended there (a file where the folder should be)."""
    path = os.path.join(csv_dir, csv_name)
    if os.path.isdir(path):
        raise ValueError(f"the CSV path {path} is a folder; pass another csv_dir (--csv_dir)")
    check_creatable_dir(csv_dir, "csv_dir (--csv_dir)")  # a folder, or one that can be made, and writable


def _check_run_args(*, batch_size: int, num_workers: int = 0, splits: int | None = None,
                    fid_method: str | None = None) -> None:
    """Flags out of range: one clear error before any network is loaded or image read (not after the first set)."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    if splits is not None and (not is_int(splits) or splits < 1):
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    if fid_method is not None and fid_method not in FID_METHODS:
        raise ValueError(f"fid_method must be one of {FID_METHODS}, got {fid_method!r}")


def _check_row_names(names) -> None:
    """A first cell the CSV cannot hold (a tab or newline in the folder's path) fails now, not at the first row."""
    for name in names:
        csv_rows.format_value(name)


def _check_embedding_dir(folder: str, targets) -> None:
    """The CLIP embeddings go next to the images: a read-only folder fails before any image is embedded."""
    check_creatable_dir(folder, "the folder the CLIP embeddings are written to")
    blocked = [t for t in targets if os.path.isdir(t)]
    if blocked:
        raise ValueError(f"cannot write CLIP embeddings: {blocked[0]} is a folder")


def _check_pair_files(pairs, what: str) -> None:
    layout.check_nonempty_files([p.generated for p in pairs], f"generated {what}")
    layout.check_nonempty_files(sorted({p.original for p in pairs}), f"originals of {what}")


def _check_counts(n: int, what: str, splits: int | None) -> None:
    """FID needs two images for a covariance; the IS needs one per split (checked before any work)."""
    if n < 2:
        raise ValueError(f"{what}: {n} image(s); the FID needs at least 2")
    if splits is not None and n < splits:
        raise ValueError(f"{what}: {n} image(s) for an Inception Score over {splits} splits; "
                         f"lower the splits (--splits) or generate more images")


def _warn_uneven(plan: dict, where: str) -> None:
    """A split whose image count differs between ratios usually means an interrupted generation."""
    for split in layout.SPLITS:
        counts = {key: len(per_split[split]) for key, per_split in plan.items()}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{m}_{k}: {n}" for (m, k), n in counts.items())
            print(f"unlearn_fast: warning: the {split} image counts differ between ratios under {where} ({shown}); "
                  "was the generation interrupted?", file=sys.stderr)


def originals_root(dst: str, data_root: str) -> str:
    """The folder holding ``<wnid>/<name>`` originals: ``data_root`` (eval.py's ``.../imagenet1k/val/``), or its
    ``val/`` when only that has the generated class folders (clip_embed.py's ``--data_root ../dataset/imagenet1k/``)."""
    wnids = {w for split in layout.SPLITS if os.path.isdir(os.path.join(dst, split))
             for w in os.listdir(os.path.join(dst, split)) if not w.startswith(".")}
    val = os.path.join(data_root, "val")
    if wnids and not any(os.path.isdir(os.path.join(data_root, w)) for w in wnids) and any(
            os.path.isdir(os.path.join(val, w)) for w in wnids):
        return val
    return data_root


def _mage_plan(dst: str, data_root: str, modes, name_pattern: str, splits: int | None) -> dict:
    """{(mode, k): {split: pairs}} for every ratio, collected and checked before any network runs."""
    data_root = originals_root(dst, data_root)
    plan = {}
    for mode, k in modes:
        prefix = layout.generated_prefix(mode, k)
        plan[(mode, k)] = {}
        for split in layout.SPLITS:
            pairs = layout.collect_mage_pairs(dst, split, prefix, data_root, name_pattern=name_pattern)
            if not pairs:
                raise FileNotFoundError(f"no generated {split} images with prefix {prefix!r} under {dst}")
            if splits is not None:
                _check_counts(len(pairs), f"{split} {prefix} under {dst}", splits)
            _check_pair_files(pairs, f"{split} {prefix} images under {dst}")
            plan[(mode, k)][split] = pairs
    _warn_uneven(plan, dst)
    return plan


class _BgrLoader:  # a picklable partial, so DataLoader workers can use it
    def __init__(self, fn, bgr_on_disk: bool):
        self.fn, self.bgr_on_disk = fn, bgr_on_disk

    def __call__(self, path: str) -> torch.Tensor:
        return self.fn(path, bgr_on_disk=self.bgr_on_disk)


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


@contextlib.contextmanager
def _images_bar(total: int, progress: bool, desc: str):
    """The progress bar of a run's image passes (closed however the run ends), or None."""
    bar = progress_bar(total, progress, desc)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def cleanfid_features(paths: Sequence[str], extractor: torch.nn.Module, *, bgr_on_disk: bool,
                      batch_size: int = 32, num_workers: int = 0, device=None, bar=None) -> np.ndarray:
    """clean-fid features float32 [N, D] of image files (clean resize to 299, then the torchscript Inception);
    ``bar`` (a progress bar) advances by each batch's images."""
    dev = _device(device)
    load = _BgrLoader(cleanfid_input, bgr_on_disk)
    out = []
    for x in _batches(paths, load, batch_size, num_workers):
        out.append(extractor(x.to(dev)).float().cpu().numpy())
        _advance(bar, x.shape[0])
    return np.concatenate(out)


@torch.no_grad()
def classifier_probs(paths: Sequence[str], model: torch.nn.Module, load: Callable[[str], torch.Tensor], *,
                     upsample_to_299: bool, batch_size: int = 32, num_workers: int = 0, device=None,
                     bar=None) -> np.ndarray:
    """Softmax class probabilities float64 [N, K] of image files (the Inception Score's p(y|x))."""
    dev = _device(device)
    out = []
    for x in _batches(paths, load, batch_size, num_workers):
        x = x.to(dev)
        if upsample_to_299:
            x = upsample_for_inception(x)
        logits = model(x)
        logits = logits.logits if hasattr(logits, "logits") else logits  # InceptionOutputs in train mode
        out.append(torch.softmax(logits.float(), dim=-1).double().cpu().numpy())
        _advance(bar, x.shape[0])
    return np.concatenate(out)


def _fid_is(pairs, *, fid_model, is_model, is_load, is_upsample: bool, generated_bgr: bool, splits: int,
            original_cache: dict, batch_size: int, num_workers: int, device, fid_method: str,
            is_shuffle_seed: int | None = None, bar=None) -> dict:
    gen_paths = [p.generated for p in pairs]
    todo = [p.original for p in pairs if p.original not in original_cache]
    if todo:
        feats = cleanfid_features(todo, fid_model, bgr_on_disk=False, batch_size=batch_size,
                                  num_workers=num_workers, device=device, bar=bar)
        original_cache.update(zip(todo, feats))
    orig_feats = np.stack([original_cache[p.original] for p in pairs])
    gen_feats = cleanfid_features(gen_paths, fid_model, bgr_on_disk=generated_bgr, batch_size=batch_size,
                                  num_workers=num_workers, device=device, bar=bar)
    probs = classifier_probs(gen_paths, is_model, is_load, upsample_to_299=is_upsample, batch_size=batch_size,
                             num_workers=num_workers, device=device, bar=bar)
    is_mean, is_std = inception_score_from_probs(probs, splits=splits, shuffle_seed=is_shuffle_seed)
    return {"fid": fid_from_features(orig_feats, gen_feats, method=fid_method), "is_mean": is_mean,
            "is_std": is_std, "n": len(pairs)}


def run_eval(dst: str, task: str, data_root: str, *, cleanfid_weights: str | None = None,
             inception_weights: str | None = None, csv_dir: str = ".", device=None, batch_size: int = 32,
             num_workers: int = 0, splits: int = 10, generated_bgr: bool = True, fid_method: str = "auto",
             modes: Sequence[tuple[str, int]] | None = None, allow_pickle: bool = False,
             name_pattern: str = "ILSVRC2012_*.JPEG", progress: bool = False,
             on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """FID and IS of a MAGE generation folder, one ``fid_is_eval_{task}.csv`` row per (mode, ratio).

    dst: the ``<ckpt>-<task>/`` folder with ``retain/`` and ``forget/``; data_root: the ImageNet ``val/``
    folder with the uncropped originals (``<data_root>/<wnid>/<name>``; the ImageNet root works too, see
    :func:`originals_root`). FID compares the generated images
    (BGR on disk unless ``generated_bgr=False``) with the originals, clean-fid style; IS is the torchvision
    Inception-v3 score of the generated images. Weights come from local files (see feature_extractors).
    ``allow_pickle`` lets the Inception state dict be unpickled in full (trusted files only).
    ``name_pattern``: the original file names to evaluate (the reference glob; other data: e.g. ``"*"``).
    Every (mode, ratio) folder is listed and checked (originals present, at least ``splits`` images, no
    empty files; flags in range) before any image is featurised. Rows are appended to
    ``<csv_dir>/fid_is_eval_{task}.csv`` after each (mode, ratio), and then passed to ``on_row``. ``progress``: a
    bar of the images featurised. The folder of an unfinished generate (``<output>.partial``) is refused.
    Returns the rows as dicts {"name", "retain": {"fid", "is_mean", "is_std", "n"}, "forget": {...}}.
    """
    layout.refuse_unfinished(dst)
    _check_run_args(batch_size=batch_size, num_workers=num_workers, splits=splits, fid_method=fid_method)
    modes = list(modes) if modes is not None else layout.eval_modes(task)
    _check_row_names(csv_rows.fid_is_row_name(dst, mode, k) for mode, k in modes)
    _check_csv_target(csv_dir, csv_rows.fid_is_csv_name(task))
    dev = _device(device)
    fid_model = load_cleanfid_inception(cleanfid_weights, device=dev)
    is_model = load_torchvision_inception(inception_weights, device=dev, allow_pickle=allow_pickle)
    plan = _mage_plan(dst, data_root, modes, name_pattern, splits)
    is_load = _BgrLoader(mage_is_input, generated_bgr)
    cache: dict = {}
    results = []
    all_pairs = [p for per_split in plan.values() for pairs in per_split.values() for p in pairs]
    total = 2 * len(all_pairs) + len({p.original for p in all_pairs})  # FID + IS of each image, originals once
    with _images_bar(total, progress, f"eval {task}") as bar:
        for mode, k in modes:
            row = {"name": csv_rows.fid_is_row_name(dst, mode, k)}
            for split in layout.SPLITS:
                row[split] = _fid_is(plan[(mode, k)][split], fid_model=fid_model, is_model=is_model, is_load=is_load,
                                     is_upsample=True, generated_bgr=generated_bgr, splits=splits,
                                     original_cache=cache, batch_size=batch_size, num_workers=num_workers, device=dev,
                                     fid_method=fid_method, bar=bar)
            r, f = row["retain"], row["forget"]
            csv_rows.append_rows_atomic(os.path.join(csv_dir, csv_rows.fid_is_csv_name(task)), [csv_rows.fid_is_row(
                row["name"], r["fid"], (r["is_mean"], r["is_std"]), f["fid"], (f["is_mean"], f["is_std"]))])
            results.append(row)
            if on_row is not None:
                on_row(row)
    return results


def run_clip_eval(img_folder: str, task: str, data_root: str, *, clip_weights: str | None = None,
                  csv_dir: str = ".", device=None, batch_size: int = 64, generated_bgr: bool = True,
                  embeddings_format: str = "npy", modes: Sequence[tuple[str, int]] | None = None,
                  name_pattern: str = "ILSVRC2012_*.JPEG", progress: bool = False,
                  on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """CLIP cosine of a MAGE generation folder, one ``clip_cosine_{task}.csv`` row per (mode, k in {4, 8}).

    data_root: the ImageNet ``val/`` folder, or the ImageNet root as clip_embed.py takes it (``<root>/val/``).

    Embeddings are written for the T-SNE: ``<img_folder>/<mode>_<k>_{retain,forget}_clip_norm_5k.<fmt>``
    and the originals' ``<img_folder>/original_{retain,forget}_clip_norm_5k.<fmt>`` (fmt ``npy`` or ``txt``).
    ``progress`` and ``on_row`` as in :func:`run_eval`. Returns rows {"name", "retain": cosine, "forget": cosine}.
    """
    layout.refuse_unfinished(img_folder)
    if embeddings_format not in ("npy", "txt"):
        raise ValueError(f"embeddings_format must be 'npy' or 'txt', got {embeddings_format!r}")
    _check_run_args(batch_size=batch_size)
    modes = list(modes) if modes is not None else layout.clip_modes(task)
    _check_row_names(csv_rows.clip_row_name(img_folder, mode, k) for mode, k in modes)
    _check_csv_target(csv_dir, csv_rows.clip_cosine_csv_name(task))
    _check_embedding_dir(img_folder, [os.path.join(img_folder, f"{stem}_{split}_clip_norm_5k.{embeddings_format}")
                                      for stem in [f"{m}_{k}" for m, k in modes] + ["original"]
                                      for split in layout.SPLITS])
    dev = _device(device)
    model, preprocess = load_clip_visual(clip_weights, device=dev)
    plan = _mage_plan(img_folder, data_root, modes, name_pattern, None)
    cache: dict[str, np.ndarray] = {}  # original path -> embedding
    results = []
    all_pairs = [p for per_split in plan.values() for pairs in per_split.values() for p in pairs]
    with _images_bar(len(all_pairs) + len({p.original for p in all_pairs}), progress, f"eval --clip {task}") as bar:
        for mode, k in modes:
            row = {"name": csv_rows.clip_row_name(img_folder, mode, k)}
            for split in layout.SPLITS:
                pairs = plan[(mode, k)][split]
                todo = [p.original for p in pairs if p.original not in cache]
                if todo:
                    cache.update(zip(todo, embed_images(todo, model, preprocess, bgr_on_disk=False,
                                                        batch_size=batch_size, device=dev, bar=bar)))
                orig = np.stack([cache[p.original] for p in pairs])
                gen = embed_images([p.generated for p in pairs], model, preprocess, bgr_on_disk=generated_bgr,
                                   batch_size=batch_size, device=dev, bar=bar)
                row[split] = paired_cosine_mean(gen, orig, normalize=False)  # unit rows: the raw dot, as the reference
                names = [f"{p.folder}/{p.name}" for p in pairs]
                save_embeddings(os.path.join(img_folder, f"{mode}_{k}_{split}_clip_norm_5k.{embeddings_format}"),
                                gen, names)
                save_embeddings(os.path.join(img_folder, f"original_{split}_clip_norm_5k.{embeddings_format}"),
                                orig, names)
            csv_rows.append_rows_atomic(os.path.join(csv_dir, csv_rows.clip_cosine_csv_name(task)),
                                        [csv_rows.clip_cosine_row(row["name"], row["retain"], row["forget"])])
            results.append(row)
            if on_row is not None:
                on_row(row)
    return results


def run_palette_eval(dst: str, class_list: str, *, mask_ratio: float = 0.5, cleanfid_weights: str | None = None,
                     places365_weights: str | None = None, inception_weights: str | None = None,
                     is_model: str = "places365", csv_dir: str = ".", device=None, batch_size: int = 32,
                     num_workers: int = 0, splits: int = 10, fid_method: str = "auto",
                     allow_pickle: bool = False, progress: bool = False,
                     on_row: Callable[[dict], None] | None = None) -> dict:
    """FID (Out_ vs GT_) and IS of a Palette test folder; appends one row to ``<csv_dir>/fid_is_eval.csv``.

    class_list: the path of ``class.txt`` (lines 0-49 retain, 50-99 forget). ``is_model="places365"`` is the
    reference's ResNet-50 Places365 IS; ``"inception"`` is its fallback (torchvision Inception on the same
    224 crops); the reference fell back silently on any error, here the choice is explicit. The IS splits mix
    the classes as eval365.py's shuffle does, with a fixed seed (its shuffle is unseeded).
    ``allow_pickle`` lets the classifier checkpoint be unpickled in full (trusted files only; the original
    ``resnet50_places365.pth.tar`` may need it if it is in torch's legacy format). ``progress`` and ``on_row`` as
    in :func:`run_eval`.
    """
    layout.refuse_unfinished(dst)
    if is_model not in ("places365", "inception"):
        raise ValueError(f"is_model must be 'places365' or 'inception', got {is_model!r}")
    _check_run_args(batch_size=batch_size, num_workers=num_workers, splits=splits, fid_method=fid_method)
    _check_row_names([dst])
    _check_csv_target(csv_dir, csv_rows.fid_is_csv_name(None))
    split_classes = layout.palette_split_classes(layout.read_class_list(class_list))
    plan = {}
    for split in layout.SPLITS:
        plan[split] = layout.collect_palette_pairs(dst, split_classes[split], mask_ratio=mask_ratio)
        if not plan[split]:
            raise FileNotFoundError(f"no Palette Out_ images of the {split} classes under {dst}")
        _check_counts(len(plan[split]), f"Palette {split} Out_ images under {dst}", splits)
        _check_pair_files(plan[split], f"Palette {split} images under {dst}")
    dev = _device(device)
    fid_model = load_cleanfid_inception(cleanfid_weights, device=dev)
    classifier = (load_places365_resnet50(places365_weights, device=dev, allow_pickle=allow_pickle)
                  if is_model == "places365"
                  else load_torchvision_inception(inception_weights, device=dev, allow_pickle=allow_pickle))
    row = {"name": dst}
    with _images_bar(3 * sum(len(pairs) for pairs in plan.values()), progress, "eval palette") as bar:
        for split in layout.SPLITS:
            row[split] = _fid_is(plan[split], fid_model=fid_model, is_model=classifier, is_load=places365_is_input,
                                 is_upsample=False, generated_bgr=False, splits=splits, original_cache={},
                                 batch_size=batch_size, num_workers=num_workers, device=dev, fid_method=fid_method,
                                 is_shuffle_seed=PALETTE_SHUFFLE_SEED, bar=bar)  # eval365.py shuffles (unseeded)
    r, f = row["retain"], row["forget"]
    csv_rows.append_rows_atomic(os.path.join(csv_dir, csv_rows.fid_is_csv_name(None)), [csv_rows.fid_is_row(
        dst, r["fid"], (r["is_mean"], r["is_std"]), f["fid"], (f["is_mean"], f["is_std"]))])
    if on_row is not None:
        on_row(row)
    return row


def run_palette_clip_eval(dst: str, class_list: str, data_root: str, *, mask_ratio: float = 0.5,
                          clip_weights: str | None = None, csv_dir: str = ".", device=None,
                          batch_size: int = 64, progress: bool = False,
                          on_row: Callable[[dict], None] | None = None) -> dict:
    """CLIP cosine of Palette Out_ images vs the ``<data_root>/val_256`` originals; one ``clip_cosine.csv`` row.
    ``progress`` and ``on_row`` as in :func:`run_eval`."""
    layout.refuse_unfinished(dst)
    _check_run_args(batch_size=batch_size)
    _check_row_names([dst])
    _check_csv_target(csv_dir, csv_rows.clip_cosine_csv_name(None))
    _check_embedding_dir(dst, [os.path.join(dst, f"{split}_clip_norm.npy") for split in layout.SPLITS])
    split_classes = layout.palette_split_classes(layout.read_class_list(class_list))
    plan = {}
    for split in layout.SPLITS:
        plan[split] = layout.collect_palette_pairs(dst, split_classes[split], mask_ratio=mask_ratio,
                                                   original_root=os.path.join(data_root, "val_256"))
        if not plan[split]:
            raise FileNotFoundError(f"no Palette Out_ images of the {split} classes under {dst}")
        _check_pair_files(plan[split], f"Palette {split} images under {dst}")
    dev = _device(device)
    model, preprocess = load_clip_visual(clip_weights, device=dev)
    row = {"name": dst}
    with _images_bar(2 * sum(len(pairs) for pairs in plan.values()), progress, "eval --clip palette") as bar:
        for split in layout.SPLITS:
            pairs = plan[split]
            gen = embed_images([p.generated for p in pairs], model, preprocess, bgr_on_disk=False,
                               batch_size=batch_size, device=dev, bar=bar)
            orig = embed_images([p.original for p in pairs], model, preprocess, bgr_on_disk=False,
                                batch_size=batch_size, device=dev, bar=bar)
            row[split] = paired_cosine_mean(gen, orig, normalize=False)  # unit rows: the raw dot, as the reference
            save_embeddings(os.path.join(dst, f"{split}_clip_norm.npy"), gen, [p.name for p in pairs])
    csv_rows.append_rows_atomic(os.path.join(csv_dir, csv_rows.clip_cosine_csv_name(None)),
                                [csv_rows.clip_cosine_row(dst, row["retain"], row["forget"])])
    if on_row is not None:
        on_row(row)
    return row
