"""What a caller of ``train_loop`` passes, checked before any step: each ``(images, labels)`` batch of its
``epoch_batches`` and the output folder. Every misuse is one error that says where and what is accepted."""
from __future__ import annotations

import itertools
import math
import os
import re
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch

from .balanced_sampler import forget_mask as labels_forget_mask


def _what(batch) -> str:
    return f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__


def check_batch(batch, where: str, image_range: Optional[Tuple[float, float]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, is_forget)`` of one ``(images, labels)`` batch, or one clear error prefixed by ``where``.

    ``images``: a floating-point tensor [N, C, H, W]; with ``image_range`` its values must lie in that range (a
    quarter of its width of slack): 0..255 pixels or mean/std-normalised images would otherwise train silently,
    against a noise clamped to the range. ``labels``: [N], the reference's -100 (forget) / +100 (retain), int or
    float, or a bool mask with True = forget; a label in [0, 100) or NaN is refused (``labels < 100`` would read
    0/1 flags and +1 signs as forget rows)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"{where}: each batch must be an (images, labels) pair, got {_what(batch)}")
    images, labels = batch
    if not torch.is_tensor(images):
        raise TypeError(f"{where}: images must be a tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{where}: images must be a tensor [N, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{where}: images must be floating point, got {images.dtype} (uint8 pixels: images.float() "
                        "/ 255)")
    n = images.shape[0]
    try:
        labels = labels if torch.is_tensor(labels) else torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: labels must be a tensor [N] of -100.0 (forget) / 100.0 (retain), or a bool "
                        f"mask with True = forget; got {type(labels).__name__}") from None
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: labels must be a tensor [N] with N = {n} (one per image), got "
                         f"{tuple(labels.shape)}")
    try:
        is_forget = labels_forget_mask(labels)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    if image_range is not None:
        lo, hi = image_range
        low, high = (float(v) for v in torch.aminmax(images.detach()))
        if math.isnan(low) or math.isnan(high):
            raise ValueError(f"{where}: images hold NaN")
        slack = 0.25 * (hi - lo)
        if low < lo - slack or high > hi + slack:
            raise ValueError(f"{where}: images hold values in [{low:.3g}, {high:.3g}]; the model takes [{lo}, {hi}] "
                             "(its forget noise is clamped to that range): divide 0..255 pixels by 255, and leave "
                             "out any mean/std normalisation (the model applies its own)")
    return images, is_forget


def checked_batches(epoch_batches: Callable[[int], Iterable], epoch: int, first: int, steps_per_epoch: int,
                    image_range, output_dir: Optional[str]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's ``(images, is_forget)`` batches, each checked (:func:`check_batch`; the range on the epoch's
    first) before a prefetcher or a step touches it. An exception of ``epoch_batches`` itself keeps its type and
    gains a note with the epoch and step where it stopped the run."""
    def note(e: BaseException, k: int) -> None:
        kept = f"; the checkpoints already written to {output_dir} are kept" if output_dir is not None else ""
        e.add_note(f"unlearn_fast: epoch_batches({epoch}) raised this for step {k} of epoch {epoch} (global step "
                   f"{epoch * steps_per_epoch + k}); training stopped there{kept}")

    try:
        source = epoch_batches(epoch)
    except Exception as e:
        note(e, first)
        raise
    try:
        it = iter(source)
    except TypeError:
        raise TypeError(f"epoch_batches({epoch}) returned {type(source).__name__}, not an iterable of (images, "
                        "labels) batches") from None

    def gen():
        for k in itertools.count(first):
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:
                note(e, k)
                raise
            yield check_batch(batch, f"epoch_batches({epoch}), batch of step {k}", image_range if k == first else None)
    return gen()


_RUN_FILE = re.compile(r"checkpoint-(\d+|last)\.(pth|safetensors)")


def check_output_dir_for_run(output_dir, fresh: bool) -> str:
    """``output_dir`` as a str path; a file, or (for a run from its start) a folder that already holds a run's
    log.txt or checkpoints, is refused: the new run would overwrite those checkpoints and mix the log lines."""
    try:
        output_dir = os.fspath(output_dir)
    except TypeError:
        raise TypeError(f"output_dir must be a folder path (str or os.PathLike), got {type(output_dir).__name__}"
                        ) from None
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file, not a folder: pass a folder (made if missing)")
    if fresh and os.path.isdir(output_dir):
        names = os.listdir(output_dir)
        held = (["log.txt"] if "log.txt" in names else []) + sorted(n for n in names if _RUN_FILE.fullmatch(n))
        if held:
            more = f" and {len(held) - 4} more" if len(held) > 4 else ""
            raise ValueError(f"output_dir {output_dir!r} already holds a run ({', '.join(held[:4])}{more}): a new run "
                             "would overwrite its checkpoints and mix its log lines; pass a new folder, or continue "
                             "that run with start_epoch= / start_step_in_epoch= (from its checkpoint's position)")
    return output_dir


__all__ = ["check_batch", "checked_batches", "check_output_dir_for_run"]
