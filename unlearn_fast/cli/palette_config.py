"""The reference's Palette JSON configs (``config/inpainting_places2_unlearn[_open|_test].json``), read as
``core/praser.py`` reads them: ``//`` starts a comment on any line (so a ``//`` inside a string is cut too).

Keys read (JSON path: meaning; default when absent). ``<phase>`` is ``train`` or ``test``; ``NET`` is
``model.which_networks[0].args``, ``MODEL`` is ``model.which_model.args``, ``DS`` is
``datasets.<phase>.which_dataset`` and ``DL`` is ``datasets.<phase>.dataloader.args``.

    name                              "inpainting_places2"; the run is named <phase>_<name> (debug_<name> with -d,
                                      finetune_<name> when finetune_norm is true), as core/praser.py
    seed                              an integer, used when --seed is not given and it is >= 0; else 0
    path.base_dir, path.checkpoint    "experiments", "checkpoint" (--output_dir overrides base_dir)
    path.<other keys>                 every path key whose name holds none of "resume", "base", "root" (the
                                      reference's code, tb_logger, results, checkpoint) is a folder made inside
                                      the run directory, as core/praser.py makes them; test results go under
                                      path.results ("results"). Each must be a relative path inside the run folder
    path.resume_state                 train: null; "RUN/checkpoint/3" resumes from 3_Network.pth, 3_Network_ema.pth
                                      and 3.state (--resume_state overrides; see palette_command)
    NET.unet                          REQUIRED: the UNet arguments
    NET.beta_schedule                 REQUIRED: {"train": {...}, "test": {...}} (or one flat dict)
    NET.module_name                   "guided_diffusion" (the only one implemented)
    MODEL.optimizers[0].lr            5e-5
    MODEL.optimizers[0].weight_decay  0
    MODEL.optimizers[0].<other>       betas [0.9, 0.999], eps 1e-8, amsgrad false, maximize false: torch.optim.Adam's
                                      arguments, as the reference passes them all to Adam (foreach / fused /
                                      capturable / differentiable are accepted and ignored: unlearn_fast picks the
                                      implementation, see --step); any other key is an error naming it
    MODEL.ema_scheduler.ema_decay     0.9999; without ema_scheduler (or null): no EMA, no _ema.pth (as the reference)
    MODEL.ema_scheduler.ema_start     1; the EMA is updated after a step when the images seen so far (the
    MODEL.ema_scheduler.ema_iter      1  reference's iter) are > ema_start and a multiple of ema_iter
    MODEL.sample_num                  8 (test)
    DS.name                           train: ForgetInpaintDataset | OpenForgetInpaintDataset;
                                      test: TestForgetInpaintDataset ("name" or ["data.dataset", "name"])
    DS.args.data_root                 REQUIRED unless --data_root
    DS.args.number_img_per_class      5000 / 200 / 100 (the datasets' defaults)
    DS.args.image_size                [unet.image_size, unet.image_size]
    DS.args.mask_config               train {"mask_mode": "hybrid"};
                                      test {"mask_mode": "center", "mask_ratio": 0.5}
    DL.batch_size                     REQUIRED unless -b
    DL.num_workers                    4 (--num_workers overrides)
    train.n_epoch                     REQUIRED for training (exactly this many epochs run)
    train.log_iter                    1e4 (a train/mse_loss line when the images seen so far are a multiple of it)
    train.save_checkpoint_epoch       1
    debug                             in debug mode (-d, or "debug" in that name, as the reference) its keys
                                      replace those of "train", and debug.debug_split (an image count, or a
                                      fraction) keeps only the first images of the list (retain first, as the
                                      reference's split of the first debug_split items)

Read but ignored, as the reference ignores them or because unlearn_fast does them differently: gpu_ids (one
process; --device), finetune_norm (beyond the name), path.code/tb_logger/results, dataloader validation_split and
val_args (no per-epoch validation), shuffle/drop_last/pin_memory (always shuffle and drop_last), data_len,
init_type (weights come from --ckpt), train.n_iter/val_epoch/tensorboard (no tensorboard events are written:
tb_logger/ stays empty), which_losses, which_metrics (palette-test logs test/mae, the reference's metric).
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

from ..train.palette_data import DEFAULT_IMAGES_PER_CLASS

REQUIRED = object()
TRAIN_DATASETS = ("ForgetInpaintDataset", "OpenForgetInpaintDataset")
TEST_DATASETS = ("TestForgetInpaintDataset",)


def load_palette_config(path: Optional[str]) -> dict:
    """The config as a dict (``//`` comments removed line by line, as the reference's parser)."""
    if not path:
        raise ValueError("-c/--config is required (a Palette JSON config, e.g. config/inpainting_places2_unlearn.json)")
    if os.path.isdir(path):
        raise ValueError(f"-c/--config {path} is a folder; give the JSON file (e.g. config/inpainting_places2_unlearn"
                         ".json)")
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    try:  # one output line per file line (the reference adds a second newline to lines without //), so a JSON
        with open(path, encoding="utf-8") as fh:  # error's line number is the file's
            text = "".join(line.split("//")[0].rstrip("\r\n") + "\n" for line in fh)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the config as UTF-8") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON once // comments are removed: {e.msg} "
                         f"(line {e.lineno}, column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(cfg).__name__}")
    return cfg


def config_value(cfg: dict, dotted: str, default: Any = REQUIRED, source: str = "config", hint: str = "") -> Any:
    """``cfg`` at ``a.b.0.c`` (integers index lists). A missing key (or null) gives ``default``, or a
    ValueError naming the key when it is required."""
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            node = None
            break
    if node is None:
        if default is REQUIRED:
            raise ValueError(f"{source}: missing key {dotted}{hint}")
        return default
    return node


def _int(value: Any, key: str, minimum: int = 1) -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value).is_integer() and value >= minimum
    if not ok:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(value: Any, key: str, minimum: float = 0.0) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{key} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _mask_ratio(value: Any, where: str) -> float:
    """The test hole's side as a share of the image side: in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{where}.mask_config.mask_ratio must be a number in (0, 1], got {value!r}")
    return float(value)


# the UNet arguments the config may give, by type (unlearn_fast.models.palette_unet.UNet's keyword names)
_UNET_INTS = ("image_size", "in_channel", "inner_channel", "out_channel", "res_blocks", "num_heads",
              "num_head_channels", "num_heads_upsample")
_UNET_INT_LISTS = ("channel_mults", "attn_res")
_UNET_BOOLS = ("conv_resample", "use_checkpoint", "use_fp16", "use_scale_shift_norm", "resblock_updown",
               "use_new_attention_order")
IMAGE_CHANNELS = 3  # Places-365 images are read as RGB


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_unet_args(unet: dict, key: str) -> None:
    """Each known UNet argument has the type the UNet needs (a clear error naming ``key.<arg>``, instead of a
    failure deep inside the model); the input is cond ‖ noisy image, so in_channel = 2·out_channel = 6."""
    for name, value in unet.items():
        where = f"{key}.{name}"
        if name in _UNET_INTS and not (_is_int(value) and (value >= 1 or name.startswith("num_head"))):
            raise ValueError(f"{where} must be an integer{' >= 1' if not name.startswith('num_head') else ''}, "
                             f"got {value!r}")
        if name in _UNET_INT_LISTS and not (isinstance(value, list) and all(_is_int(v) and v >= 1 for v in value)):
            raise ValueError(f"{where} must be a list of integers >= 1, got {value!r}")
        if name in _UNET_BOOLS and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        if name == "dropout" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 <= value < 1):
            raise ValueError(f"{where} must be a number in [0, 1), got {value!r}")
    if not unet.get("channel_mults", [1]):
        raise ValueError(f"{key}.channel_mults must not be empty")
    out_ch = unet.get("out_channel", IMAGE_CHANNELS)
    if out_ch != IMAGE_CHANNELS or unet.get("in_channel", 2 * IMAGE_CHANNELS) != 2 * IMAGE_CHANNELS:
        raise ValueError(f"{key}: in_channel must be {2 * IMAGE_CHANNELS} and out_channel {IMAGE_CHANNELS} (the UNet "
                         f"sees the condition and the noisy RGB image side by side), got in_channel "
                         f"{unet.get('in_channel')!r}, out_channel {out_ch!r}")


def check_beta_schedule(schedule: dict, key: str) -> None:
    """The schedule dicts (``{"train": {...}, "test": {...}}`` or one flat dict) have usable values."""
    phases = {k: v for k, v in schedule.items() if isinstance(v, dict)} or {"": schedule}
    for phase, sched in phases.items():
        where = f"{key}.{phase}." if phase else f"{key}."
        n = sched.get("n_timestep", 2000)
        if not (_is_int(n) or (isinstance(n, float) and n.is_integer())) or n < 2:
            raise ValueError(f"{where}n_timestep must be an integer >= 2, got {n!r}")
        for name in ("linear_start", "linear_end"):
            v = sched.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not 0 <= v < 1):
                raise ValueError(f"{where}{name} must be a number in [0, 1), got {v!r}")
        if not isinstance(sched.get("schedule", "linear"), str):
            raise ValueError(f"{where}schedule must be a string such as \"linear\", got {sched.get('schedule')!r}")


ADAM_OPTIONS = ("betas", "eps", "amsgrad", "maximize")  # the Adam arguments used besides lr and weight_decay
ADAM_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")  # accepted, ignored (--step picks)


def adam_options(opt: Any, source: str) -> dict:
    """``optimizers[0]``'s Adam arguments other than lr / weight_decay, checked (the reference passes the whole
    dict to ``torch.optim.Adam``, so a key Adam does not take fails there; here one error names it)."""
    key = "model.which_model.args.optimizers[0]"
    if not isinstance(opt, dict):
        raise ValueError(f"{source}: {key} must be a JSON object of Adam arguments (lr, weight_decay, ...), "
                         f"got {opt!r}")
    out = {}
    for name, value in opt.items():
        where = f"{source}: {key}.{name}"
        if name in ("lr", "weight_decay") or name in ADAM_IMPLEMENTATION:
            continue
        if name not in ADAM_OPTIONS:
            raise ValueError(f"{where} is not an argument of torch.optim.Adam (used: lr, weight_decay, "
                             f"{', '.join(ADAM_OPTIONS)})")
        if name == "betas":
            ok = isinstance(value, list) and len(value) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
            if not ok:
                raise ValueError(f"{where} must be two numbers in [0, 1), e.g. [0.9, 0.999], got {value!r}")
            value = (float(value[0]), float(value[1]))
        elif name == "eps":
            value = _float(value, where)
            if value <= 0:
                raise ValueError(f"{where} must be a number > 0, got {value!r}")
        elif not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        out[name] = value
    return out


def _object(value: Any, key: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {key} must be a JSON object, got {value!r}")
    return value


def run_folders(cfg: dict, source: str) -> dict:
    """``{path key: folder}`` of the folders core/praser.py makes inside the run directory: every ``path`` key
    whose name holds none of "resume", "base", "root". Each must be a relative path that stays inside the run
    folder (an absolute or ``..`` one would let two runs share their checkpoints)."""
    path = config_value(cfg, "path", {}, source)
    if not isinstance(path, dict):
        raise ValueError(f"{source}: path must be a JSON object (base_dir, checkpoint, ...), got {path!r}")
    base = path.get("base_dir")
    if base is not None and not (isinstance(base, str) and base.strip()):
        raise ValueError(f"{source}: path.base_dir must be a non-empty string, got {base!r}")
    folders = {}
    for key, value in path.items():
        if any(word in key for word in ("resume", "base", "root")):
            continue
        if value is None and key not in ("checkpoint", "results"):
            continue  # the reference would fail on it; nothing to make
        inside = isinstance(value, str) and value.strip() and not os.path.isabs(value) and \
            os.path.normpath(value).split(os.sep)[0] not in (os.curdir, os.pardir)
        if value is not None and not inside:
            raise ValueError(f"{source}: path.{key} must be a folder name inside the run directory (a relative "
                             f"path such as {key!r}), got {value!r}")
        if value is not None:
            folders[key] = value
    folders.setdefault("checkpoint", "checkpoint")
    folders.setdefault("results", "results")
    return folders


def dataset_class_name(cfg: dict, phase: str, source: str) -> str:
    name = config_value(cfg, f"datasets.{phase}.which_dataset.name", source=source)
    if isinstance(name, list) and name:
        name = name[-1]
    if not isinstance(name, str):
        raise ValueError(f"{source}: datasets.{phase}.which_dataset.name must be a string or [module, class]")
    return name


@dataclass
class PaletteJob:
    """Everything a Palette run takes from the config (after command-line overrides)."""
    opt_name: str
    phase: str
    unet: dict
    beta_schedule: dict
    module_name: str
    lr: float
    weight_decay: float
    ema_decay: Optional[float]
    sample_num: int
    dataset: str
    data_root: str
    number_img_per_class: int
    image_size: Tuple[int, int]
    mask_mode: str
    mask_ratio: float
    batch_size: int
    num_workers: int
    n_epoch: int
    log_iter: float
    save_checkpoint_epoch: int
    base_dir: str
    checkpoint_subdir: str
    folders: dict  # path key -> folder made inside the run directory (see run_folders)
    seed: int
    resume_state: Optional[str] = None
    ema_start: float = 1.0  # the EMA updates after a step iff images seen > ema_start and % ema_iter == 0
    ema_iter: int = 1
    debug_split: Union[int, float, None] = None  # debug mode: train (or test) on this many / this share of images
    adam_options: dict = field(default_factory=dict)  # optimizers[0]'s betas / eps / amsgrad / maximize, if given

    def debug_subset_size(self, n_items: int) -> int:
        """How many of ``n_items`` a debug run uses: the first ``debug_split`` (a count, or a share of them)."""
        if self.debug_split is None:
            return n_items
        if isinstance(self.debug_split, float):
            return max(1, int(n_items * self.debug_split))
        return min(n_items, self.debug_split)


def resolve_palette_job(cfg: dict, phase: str, source: str = "config", batch: Optional[int] = None,
                        data_root: Optional[str] = None, num_workers: Optional[int] = None,
                        seed: Optional[int] = None, debug: bool = False) -> PaletteJob:
    """Read and check the keys of the module docstring for ``phase`` ('train' or 'test')."""
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be train or test, got {phase!r}")

    def get(key, default=REQUIRED, hint=""):
        return config_value(cfg, key, default, source, hint)

    net = "model.which_networks.0.args"
    unet = get(f"{net}.unet")
    schedule = get(f"{net}.beta_schedule")
    if not isinstance(unet, dict) or not isinstance(schedule, dict):
        raise ValueError(f"{source}: {net}.unet and {net}.beta_schedule must be JSON objects")
    check_unet_args(unet, f"{source}: {net}.unet")
    check_beta_schedule(schedule, f"{source}: {net}.beta_schedule")
    dataset = dataset_class_name(cfg, phase, source)
    allowed = TRAIN_DATASETS if phase == "train" else TEST_DATASETS
    if dataset not in allowed:
        raise ValueError(f"{source}: datasets.{phase}.which_dataset.name is {dataset!r}; "
                         f"palette-{'unlearn' if phase == 'train' else 'test'} supports {', '.join(allowed)}"
                         + (" (use the _test.json config)" if phase == "test" else ""))
    ds_args = f"datasets.{phase}.which_dataset.args"
    root = data_root or get(f"{ds_args}.data_root", hint=" (or pass --data_root)")
    size = get(f"{ds_args}.image_size", None) or [unet.get("image_size", 256)] * 2
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"{source}: {ds_args}.image_size must be [H, W], got {size!r}")
    mask_cfg = _object(get(f"{ds_args}.mask_config", {}) or {}, f"{ds_args}.mask_config", source)
    mask_mode = mask_cfg.get("mask_mode", "hybrid" if phase == "train" else "center")
    wanted_mode = "hybrid" if phase == "train" else "center"
    if mask_mode != wanted_mode:
        raise ValueError(f"{source}: {ds_args}.mask_config.mask_mode {mask_mode!r} is not supported for "
                         f"{phase}; use {wanted_mode!r} (the reference's Places-365 setting)")
    batch_size = batch if batch is not None else get(f"datasets.{phase}.dataloader.args.batch_size",
                                                     hint=" (or pass -b)")
    workers = num_workers if num_workers is not None else get(f"datasets.{phase}.dataloader.args.num_workers", 4)
    name = get("name", "inpainting_places2")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise ValueError(f"{source}: name must be a non-empty string without path separators, got {name!r}")
    # the reference's opt['name'] (core/praser.py): debug_<name> with -d, else finetune_<name> when finetune_norm
    opt_name = f"debug_{name}" if debug else (f"finetune_{name}" if get("finetune_norm", False) else
                                              f"{phase}_{name}")
    debug = "debug" in opt_name  # the reference switches debug mode on by name, so a config named *debug* does too
    train_cfg = dict(_object(get("train", {}) or {}, "train", source))
    debug_cfg = _object(get("debug", {}) or {}, "debug", source) if debug else {}
    train_cfg.update(debug_cfg)
    if phase == "train" and train_cfg.get("n_epoch") is None:
        raise ValueError(f"{source}: missing key train.n_epoch")
    debug_split = debug_cfg.get("debug_split") if debug else None
    if debug_split is not None and not (_is_int(debug_split) and debug_split >= 1) and not (
            isinstance(debug_split, float) and 0 < debug_split <= 1):
        raise ValueError(f"{source}: debug.debug_split must be an image count >= 1 or a fraction in (0, 1], "
                         f"got {debug_split!r}")
    cfg_seed = get("seed", -1)
    if not _is_int(cfg_seed):
        raise ValueError(f"{source}: seed must be an integer (< 0: unlearn_fast uses 0), got {cfg_seed!r}")
    ema_cfg = get("model.which_model.args.ema_scheduler", None)
    if ema_cfg is not None:
        _object(ema_cfg, "model.which_model.args.ema_scheduler", source)
    ema_decay = get("model.which_model.args.ema_scheduler.ema_decay", None)
    if ema_cfg is not None and ema_decay is None:
        ema_decay = 0.9999
    ema_cfg = ema_cfg or {}
    folders = run_folders(cfg, source)
    optimizer = get("model.which_model.args.optimizers.0", {})
    resume_state = get("path.resume_state", None) if phase == "train" else None
    if resume_state is not None and not (isinstance(resume_state, str) and resume_state.strip()):
        raise ValueError(f"{source}: path.resume_state must be null or a checkpoint prefix such as "
                         f"\"experiments/<run>/checkpoint/3\", got {resume_state!r}")
    return PaletteJob(
        opt_name=opt_name, phase=phase,
        unet=dict(unet), beta_schedule=copy.deepcopy(schedule), module_name=str(get(f"{net}.module_name",
                                                                                    "guided_diffusion")),
        lr=_float(get("model.which_model.args.optimizers.0.lr", 5e-5), "optimizers[0].lr", 1e-12),
        weight_decay=_float(get("model.which_model.args.optimizers.0.weight_decay", 0.0), "optimizers[0].weight_decay"),
        ema_decay=None if ema_decay is None else _float(ema_decay, "ema_scheduler.ema_decay"),
        sample_num=_int(get("model.which_model.args.sample_num", 8), "model.which_model.args.sample_num"),
        dataset=dataset, data_root=str(root),
        number_img_per_class=_int(get(f"{ds_args}.number_img_per_class", DEFAULT_IMAGES_PER_CLASS[dataset]),
                                  "number_img_per_class"),
        image_size=(_int(size[0], "image_size[0]", 8), _int(size[1], "image_size[1]", 8)),
        mask_mode=mask_mode, mask_ratio=_mask_ratio(mask_cfg.get("mask_ratio", 0.5), f"{source}: {ds_args}"),
        batch_size=_int(batch_size, "batch size (-b or dataloader.args.batch_size)"),
        num_workers=_int(workers, "num_workers", 0),
        n_epoch=_int(train_cfg.get("n_epoch", 1), "train.n_epoch"),
        log_iter=_float(train_cfg.get("log_iter", 1e4), "train.log_iter", 1.0),
        save_checkpoint_epoch=_int(train_cfg.get("save_checkpoint_epoch", 1), "train.save_checkpoint_epoch"),
        base_dir=str(get("path.base_dir", "experiments")), checkpoint_subdir=folders["checkpoint"], folders=folders,
        seed=int(seed) if seed is not None else max(int(cfg_seed), 0),
        resume_state=resume_state, debug_split=debug_split, adam_options=adam_options(optimizer, source),
        ema_start=_float(1 if ema_cfg.get("ema_start") is None else ema_cfg["ema_start"], "ema_scheduler.ema_start"),
        ema_iter=_int(1 if ema_cfg.get("ema_iter") is None else ema_cfg["ema_iter"], "ema_scheduler.ema_iter"),
    )


__all__ = ["load_palette_config", "config_value", "resolve_palette_job", "PaletteJob", "dataset_class_name",
           "run_folders", "adam_options", "check_unet_args", "check_beta_schedule", "TRAIN_DATASETS", "TEST_DATASETS"]
