"""Held-out images of the forget and retain classes: files of those class folders that training never sees.

Evaluation during training (``--eval_every``) and the forget audit need images of the same classes that are
not in the training list. The reference trains on the first ``num_image_per_class`` files of each class after
its seeded shuffle; the rest of each folder is unseen. This module takes, per set, up to ``per_set`` of those
unseen files, spread round-robin over the set's classes (so a few classes with many spare files do not fill
the set), in an order fixed by the seed: the same on every rank and every run.

    held = select_holdout_files(root, forget, retain, exclude=[p for p, _ in items], per_set=32, seed=0)
    held.forget, held.retain   # lists of paths
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Sequence

from .data_split import FORGET_LABEL, RETAIN_LABEL, Item, list_images, seeded_shuffle


class HoldoutFiles(NamedTuple):
    forget: list[str]
    retain: list[str]

    def items(self) -> list[Item]:
        """forget (-100.0) then retain (+100.0), the training list's labels."""
        return [(p, FORGET_LABEL) for p in self.forget] + [(p, RETAIN_LABEL) for p in self.retain]


def _unseen_per_class(root: str, classes: Sequence[str], exclude: set, seed: int) -> list[list[str]]:
    """Per class, its files whose real file is neither trained on nor already taken (by real path, so a
    symlink to a training image is not "unseen", and two links to one file count once)."""
    out, taken = [], set(exclude)
    for cls in classes:
        files = []
        for f in list_images(os.path.join(root, cls)):
            real = os.path.realpath(f)
            if real not in taken:
                taken.add(real)
                files.append(f)
        out.append(seeded_shuffle(files, seed, "holdout", cls))
    return out


def _round_robin(per_class: list[list[str]], limit: int) -> list[str]:
    picked, depth = [], 0
    while len(picked) < limit and any(depth < len(files) for files in per_class):
        for files in per_class:
            if depth < len(files) and len(picked) < limit:
                picked.append(files[depth])
        depth += 1
    return picked


def select_holdout_files(root: str, forget_classes: Sequence[str], retain_classes: Sequence[str],
                         exclude: Iterable[str], per_set: int, seed: int = 0,
                         need: Sequence[str] = ("forget", "retain")) -> HoldoutFiles:
    """Up to ``per_set`` unseen files of the forget classes and of the retain classes (see the module
    docstring). ``exclude``: the training paths. A set named in ``need`` that has no unseen file at all is a
    ValueError that says how to free some."""
    if isinstance(per_set, bool) or not isinstance(per_set, int) or per_set < 1:
        raise ValueError(f"per_set must be an integer >= 1, got {per_set!r}")
    if not os.path.isdir(str(root)):
        raise ValueError(f"data path {root} does not exist or is not a folder")
    exclude = {os.path.realpath(p) for p in exclude}
    sets = {}
    for name, classes in (("forget", list(forget_classes)), ("retain", list(retain_classes or []))):
        sets[name] = _round_robin(_unseen_per_class(str(root), classes, exclude, seed), per_set)
        if not sets[name] and name in need:
            raise ValueError(f"no held-out {name} images: every image of the {name} classes "
                             f"({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}) is used for "
                             "training; lower --num_image_per_class (or --retainset_ratio) to keep some unseen")
    return HoldoutFiles(sets["forget"], sets["retain"])


__all__ = ["HoldoutFiles", "select_holdout_files"]
