"""The evaluation networks, loaded from local files only (nothing is ever downloaded).

Each file is found by, in order: the explicit ``path`` argument (the CLI flag), the environment variable,
then ``./pretrained/<file name>`` (where the reference scripts keep them). A file that is not there raises
:class:`MissingWeightsError`, naming the file, the flag and variable that point to it, and where to get it.
A Python package that is not installed raises :class:`MissingDependencyError` (a subclass, so one
``except MissingWeightsError`` catches both).

| name            | network                                  | used for                       |
|-----------------|------------------------------------------|--------------------------------|
| inception       | torchvision Inception-v3 (IMAGENET1K_V1) | Inception Score (MAGE)         |
| cleanfid        | clean-fid torchscript Inception-v3       | FID features, 2048-d pool3     |
| clip            | open_clip ViT-H-14 laion2b_s32b_b79k     | CLIP cosine, T-SNE             |
| places365       | ResNet-50 Places365                      | Inception Score (Palette)      |
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "MissingWeightsError", "MissingDependencyError", "WeightSource", "WEIGHT_SOURCES", "resolve_weights",
    "load_torchvision_inception", "load_cleanfid_inception", "CleanFIDInception", "load_clip_visual",
    "load_places365_resnet50",
]


class MissingWeightsError(FileNotFoundError):
    """A weights file the evaluation needs is not on disk (or a package it needs is not installed)."""


class MissingDependencyError(MissingWeightsError):
    """A Python package the evaluation needs is not installed."""


@dataclass(frozen=True)
class WeightSource:
    what: str       # what the file is, in words
    flag: str       # the CLI flag that points to it
    env_var: str    # the environment variable that points to it
    filename: str   # the file's usual name (looked for under ./pretrained/)
    url: str        # where to get it by hand


WEIGHT_SOURCES = {
    "inception": WeightSource(
        "torchvision Inception-v3 IMAGENET1K_V1 state dict (Inception Score)", "--inception_weights",
        "UNLEARN_FAST_INCEPTION", "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"),
    "cleanfid": WeightSource(
        "clean-fid torchscript Inception-v3 (FID features)", "--cleanfid_inception",
        "UNLEARN_FAST_CLEANFID_INCEPTION", "inception-2015-12-05.pt",
        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"),
    "clip": WeightSource(
        "open_clip ViT-H-14 laion2b_s32b_b79k weights (CLIP cosine)", "--clip_weights",
        "UNLEARN_FAST_CLIP_WEIGHTS", "open_clip_vit_h_14_laion2b_s32b_b79k.bin",
        "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (open_clip_pytorch_model.bin)"),
    "places365": WeightSource(
        "ResNet-50 Places365 checkpoint (Palette Inception Score)", "--places365_weights",
        "UNLEARN_FAST_PLACES365", "resnet50_places365.pth.tar",
        "http://places2.csail.mit.edu/models_places365/resnet50_places365.pth.tar"),
}


def resolve_weights(name: str, path: str | os.PathLike | None = None) -> str:
    """The local file for weights ``name`` (a key of WEIGHT_SOURCES): path > env var > ./pretrained/<file>."""
    if name not in WEIGHT_SOURCES:
        raise ValueError(f"unknown weights {name!r}; known: {sorted(WEIGHT_SOURCES)}")
    src = WEIGHT_SOURCES[name]
    if path is not None:
        candidates = [(os.fspath(path), f"given by {src.flag}")]
    elif os.environ.get(src.env_var):
        candidates = [(os.environ[src.env_var], f"given by ${src.env_var}")]
    else:
        candidates = [(os.path.join("pretrained", src.filename), f"default, neither {src.flag} nor ${src.env_var} set")]
    for candidate, _ in candidates:
        if os.path.isfile(candidate):
            return candidate
    tried = "; ".join(f"{c} ({how})" for c, how in candidates)
    raise MissingWeightsError(
        f"missing {src.what}: no file at {tried}. Point {src.flag} or the environment variable {src.env_var} "
        f"at a local copy of {src.filename} (get it from {src.url}); nothing is downloaded at run time.")


def _torch_load_weights(path: str, what: str, allow_pickle: bool = False) -> dict:
    """torch.load, tensors-only unless ``allow_pickle`` (which runs the file's pickle code: trusted files only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # pickle of non-tensor objects, the legacy .tar format, truncated file ...
        hint = "" if allow_pickle else (" If the file is a trusted copy that holds other Python objects or uses "
                                        "the legacy .tar format, load it with allow_pickle=True.")
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]  # torch's own advice runs for lines
        raise ValueError(f"cannot read {what} from {path} as a tensor checkpoint: {type(e).__name__}: {detail}."
                         f"{hint}") from None


def _load_strict(model: nn.Module, state: dict, path: str, what: str) -> None:
    own = model.state_dict()
    # Old checkpoints (torch < 0.4.1) have no BatchNorm `num_batches_tracked`; load_state_dict fills it in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path} is not a {what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{path} does not fit a {what}: {e}") from e


def load_torchvision_inception(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                               transform_input: bool = False, allow_pickle: bool = False) -> nn.Module:
    """torchvision Inception-v3 (1000-way logits) in eval mode, from a local state dict.

    ``transform_input=False`` as the reference IS (`metric.inception_score` passes it explicitly).
    ``allow_pickle=True`` lets torch.load unpickle arbitrary objects (only for files you trust).
    """
    from torchvision.models import inception_v3

    file = resolve_weights("inception", path)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=transform_input)
    state = _torch_load_weights(file, "an Inception-v3 state dict", allow_pickle)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    _load_strict(model, state, file, "torchvision Inception-v3 state dict")
    return model.eval().to(device)


class CleanFIDInception(nn.Module):
    """clean-fid's Inception feature extractor: x in [0, 255], [N, 3, 299, 299] -> pool3 features [N, D].

    Normalises to (x - 128) / 128 and runs the torchscript model's ``layers`` (clean mode: the image is
    resized outside the network by :func:`unlearn_fast.eval.preprocess.clean_resize`).
    """

    def __init__(self, scripted: torch.nn.Module):
        super().__init__()
        if not hasattr(scripted, "layers"):
            raise ValueError("the torchscript model has no `layers` submodule; is it inception-2015-12-05.pt?")
        self.base = scripted
        self.layers = scripted.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise ValueError(f"expected images [N, 3, 299, 299] in [0, 255], got shape {tuple(x.shape)}")
        return self.layers((x - 128) / 128).reshape(x.shape[0], -1)


def load_cleanfid_inception(path: str | os.PathLike | None = None, *,
                            device: str | torch.device = "cpu") -> CleanFIDInception:
    """The clean-fid torchscript Inception (``inception-2015-12-05.pt``) wrapped as :class:`CleanFIDInception`."""
    file = resolve_weights("cleanfid", path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the file is torchscript
        try:
            scripted = torch.jit.load(file, map_location=device)
        except Exception as e:
            raise ValueError(f"cannot load {file} as a torchscript model: {e}") from e
    return CleanFIDInception(scripted.eval()).eval()


def load_clip_visual(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                     model_name: str = "ViT-H-14") -> tuple[nn.Module, Callable]:
    """open_clip's visual tower (1024-d embeddings for ViT-H-14) and its eval preprocess, from a local file."""
    try:
        import open_clip
    except ImportError as e:
        raise MissingDependencyError(
            "the CLIP metric needs the open_clip package: pip install open-clip-torch "
            "(the reference used open-clip-torch 2.20.0)") from e
    file = resolve_weights("clip", path)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=file)
    return model.visual.eval().to(device), preprocess


def load_places365_resnet50(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                            allow_pickle: bool = False) -> nn.Module:
    """ResNet-50 with 365 classes from ``resnet50_places365.pth.tar`` ({'state_dict': {'module.<k>': ...}}).

    ``allow_pickle=True`` lets torch.load unpickle arbitrary objects (only for files you trust).
    """
    from torchvision.models import resnet50

    file = resolve_weights("places365", path)
    ckpt = _torch_load_weights(file, "a ResNet-50 Places365 checkpoint", allow_pickle)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds no state dict (got {type(state).__name__})")
    # Saved from a DataParallel model: strip the `module.` prefix.
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    model = resnet50(weights=None, num_classes=365)
    _load_strict(model, state, file, "ResNet-50 Places365 state dict")
    return model.eval().to(device)
