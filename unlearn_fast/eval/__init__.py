"""Evaluation of unlearned image-to-image models: FID, IS, CLIP cosine, T-SNE, a forgetting audit, reports.

Reference-compatible (§5 of REFERENCE.md): the generated-folder layout, the BGR convention, the CSV rows.
All network weights come from local files (see :mod:`unlearn_fast.eval.feature_extractors`).

    from unlearn_fast.eval import run_eval, run_clip_eval, run_tsne, write_report
    run_eval("out/checkpoint-5-inpaint/", "inpaint", "../dataset/imagenet1k/val/")
    run_clip_eval("out/checkpoint-5-inpaint/", "inpaint", "../dataset/imagenet1k/val/")
    run_tsne("out/checkpoint-5-inpaint/")
    write_report("out/")

Optional packages: scipy (FID via ``scipy.linalg.sqrtm``, as the reference; otherwise an exact eigen
method), scikit-learn (T-SNE backend; otherwise a built-in one), matplotlib (T-SNE figure), open_clip
(CLIP metric).
"""
from .clip_cosine import clip_cosine_for_pairs, embed_images, paired_cosine_mean
from .csv_rows import append_rows_atomic, clip_cosine_row, fid_is_row
from .feature_extractors import (MissingDependencyError, MissingWeightsError, load_cleanfid_inception,
                                 load_clip_visual, load_places365_resnet50, load_torchvision_inception)
from .forget_audit import auc, forget_audit_summary, membership_auc
from .frechet import feature_statistics, fid_from_features, frechet_distance
from .inception_score import inception_score_from_probs
from .pipeline import run_clip_eval, run_eval, run_palette_clip_eval, run_palette_eval
from .preprocess import clean_resize
from .report import write_report
from .tsne import plot_tsne, run_tsne, tsne_embed

__all__ = [
    "frechet_distance", "feature_statistics", "fid_from_features", "inception_score_from_probs",
    "MissingWeightsError", "MissingDependencyError", "load_torchvision_inception", "load_cleanfid_inception",
    "load_clip_visual", "load_places365_resnet50", "clean_resize", "paired_cosine_mean", "embed_images",
    "clip_cosine_for_pairs", "fid_is_row", "clip_cosine_row", "append_rows_atomic", "auc", "membership_auc",
    "forget_audit_summary", "tsne_embed", "plot_tsne", "run_tsne", "run_eval", "run_clip_eval",
    "run_palette_eval", "run_palette_clip_eval", "write_report",
]
