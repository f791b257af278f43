"""The reference trainer's flags (``main_unlearn.py`` / ``main_baseline.py``, REFERENCE.md §1.6, §2) with the
same names, defaults and meanings, plus unlearn_fast's own (grouped at the end, each saying why)."""
from __future__ import annotations

import argparse

from ..eval.periodic_eval import CRITERIA as EVAL_CRITERIA
from ..objective import LOSS_TYPES, WEIGHTINGS
from ..ops import NOISE_KINDS
from ..train.precision import PRECISIONS
from ..train.trainer import STEP_MODES
from .help_format import DefaultsHelpFormatter


def _none_or_float(text: str):
    return None if text in ("None", "none", "") else float(text)


def _int_or_float(text: str):
    """'5' -> 5 (the reference's int type, so opt.yaml and checkpoint args read the same), '0.5' -> 0.5."""
    try:
        return int(text)
    except ValueError:
        return float(text)


class ReferenceAbbrevParser(argparse.ArgumentParser):
    """argparse that reads an abbreviation as the official parser does: a prefix naming exactly one reference flag
    (``--forget 0.2``, ``--st 2``, ``--e 3``) keeps that meaning although one of unlearn_fast's own flags shares
    it (``--forget_classes``, ``--step``, ``--eval_every``); prefixes ambiguous among the reference flags stay
    errors."""

    def _get_option_tuples(self, option_string):
        found = super()._get_option_tuples(option_string)  # [(action, option string, ...)]: 3.11 and 3.12+ forms
        if len(found) > 1:
            reference = [t for t in found if getattr(t[0], "reference_flag", False)]
            if len(reference) == 1:
                return reference
        return found


def add_reference_flags(p: argparse.ArgumentParser, baseline: bool) -> None:
    g = p.add_argument_group("reference flags (main_unlearn.py / main_baseline.py)")
    g.add_argument("--batch_size", default=16 if baseline else 32, type=int,
                   help="images per GPU (per process) per micro-step; effective batch size is "
                        "batch_size * accum_iter * #gpus (torchrun processes)")
    g.add_argument("--epochs", default=6, type=int, help="unlearning epochs (over the selected forget + retain set)")
    g.add_argument("--accum_iter", default=1, type=int,
                   help="accumulate gradients over this many micro-steps before an optimizer step")
    g.add_argument("--model", default="mage_vit_base_patch16", type=str, metavar="MODEL",
                   help="registered model name (unlearn_fast.list_models()); e.g. mage_vit_base_patch16, "
                        "mae_vit_large_patch16, mae_micro")
    g.add_argument("--input_size", default=256, type=int, help="image size in pixels")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay on >=2-D non-bias params")
    g.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr; default blr * eff_batch / 256")
    g.add_argument("--blr", type=float, default=1e-4, metavar="LR",
                   help="base lr: absolute_lr = base_lr * total_batch_size / 256")
    g.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="lower lr bound of the cosine")
    g.add_argument("--warmup_epochs", type=_int_or_float, default=5, metavar="N",
                   help="epochs of linear warmup from 0 (per iteration), then a half-cosine to min_lr")
    g.add_argument("--forget_alpha", type=float, default=0.0,
                   help="weight of the forget term (reference default 0.0 forgets nothing; the README uses 0.2)")
    g.add_argument("--retain_alpha", type=float, default=1.0,
                   help="weight of the retain term (baselines max_full_model_loss / full_model_noise: unused, as the "
                        "reference)")
    if baseline:
        g.add_argument("--loss_type", type=str, required=True, choices=LOSS_TYPES,
                       help="max_full_model_loss (MAX LOSS), full_model_noise (NOISY LABEL), "
                            "encoder_noise (RANDOM ENCODER), learn_others (RETAIN LABEL)")
        g.add_argument("--forget_num", type=int, default=None, help="parsed, unused (as the reference)")
        g.add_argument("--learn_others", type=int, default=0, help="parsed, unused (as the reference)")
    else:
        g.add_argument("--noise_type", type=str, default="normal",
                       help=f"forget target input: {', '.join(NOISE_KINDS)}")
    g.add_argument("--mask_ratio_min", type=float, default=0.5,
                   help="MAGE: the truncated-normal mask rate's lower bound, and the fraction of tokens dropped")
    g.add_argument("--mask_ratio_max", type=float, default=1.0, help="MAGE: truncated-normal mask rate max")
    g.add_argument("--mask_ratio_mu", type=float, default=0.55, help="MAGE: truncated-normal mask rate mean")
    g.add_argument("--mask_ratio_std", type=float, default=0.25, help="MAGE: truncated-normal mask rate std")
    g.add_argument("--grad_clip", type=float, default=3.0, help="global L2 norm clip after unscaling")
    g.add_argument("--data_path", default="../dataset/imagenet1k/train/", type=str,
                   help="class-folder image tree (ImageNet layout: <data_path>/<wnid>/*.JPEG)")
    g.add_argument("--use_coco", action="store_true",
                   help="take the proxy (see --opendata_to_forget_ratio) from a COCO-style folder (--proxy_path) "
                        "instead of the other class folders of --data_path; the crop scale becomes (0.2, 0.5) for all "
                        "images")
    g.add_argument("--opendata_to_forget_ratio", type=_none_or_float, default=None,
                   help="proxy retain images = ratio x forget images (F forget classes x num_image_per_class): from "
                        "every class folder of --data_path that is neither forget nor retain (ceil(ratio*F*n/P) from "
                        "each of the P folders; on the reference split the other n* folders and P = 800, as the "
                        "reference), or with --use_coco from --proxy_path; None or 0 = no proxy")
    g.add_argument("--num_image_per_class", type=int, default=120, help="forget images per forget class")
    g.add_argument("--retainset_ratio", type=float, default=1.0,
                   help="retain images per retain class = ceil(num_image_per_class * ratio); 0 = proxy only")
    g.add_argument("--output_dir", default="./output_dir", help="the run directory is created inside it")
    g.add_argument("--log_dir", default="./output_dir", help="overwritten with the run directory (as the reference)")
    g.add_argument("--device", default="auto",
                   help="cuda, cpu, cuda:N, or auto: cuda when a GPU is visible, else cpu (the reference's default "
                        "is cuda, which fails without a GPU)")
    g.add_argument("--seed", default=0, type=int, help="seeds the data subsets, masks, noise and dropout")
    g.add_argument("--resume", default="", help="pretrained checkpoint to unlearn, or an unlearning checkpoint "
                                                "(with optimizer+epoch) to continue")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N",
                   help="first epoch (a resumed unlearning checkpoint sets it)")
    g.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes")
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    g.add_argument("--world_size", default=1, type=int,
                   help="number of distributed processes (taken from torchrun's WORLD_SIZE when launched by it)")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="unused: LOCAL_RANK is read instead (torch.distributed.launch passes --local-rank=N)")
    g.add_argument("--dist_on_itp", action="store_true",
                   help="ranks from Open MPI's OMPI_COMM_WORLD_* variables (a job started by mpirun)")
    g.add_argument("--dist_url", default="env://",
                   help="the job's rendezvous: env:// reads MASTER_ADDR / MASTER_PORT (torchrun sets "
                        "them), or tcp://HOST:PORT")
    g.add_argument("--use_sagemaker", default=0, type=int, help="unused (as the reference)")
    for action in g._group_actions:  # the official parser's flags win its abbreviations (ReferenceAbbrevParser)
        action.reference_flag = True
    if not baseline:  # after the loop: --e stays --epochs, as at the reference commit
        g.add_argument("--early_epochs", default=6, type=int,
                       help="unused: parsed by another commit of the official main_unlearn.py (a50ce517) and read "
                            "nowhere there; accepted so that its command lines run")


def add_fast_flags(p: argparse.ArgumentParser, baseline: bool) -> None:
    g = p.add_argument_group("unlearn_fast flags")
    g.add_argument("--precision", default="reference", choices=PRECISIONS,
                   help="reference: fp16 autocast student (bf16 on CPU) + fp32 teacher, as the official code; "
                        "bf16: student and teacher in bf16 (faster, opt-in); fp32: no autocast")
    g.add_argument("--step", default="auto", choices=STEP_MODES,
                   help="reference: the official step's semantics, eager; fast: pruned teacher + fused ops; "
                        "graphed: fast + CUDA graph (needs --forget_per_batch and --accum_iter 1); "
                        "auto: graphed on CUDA when possible, else fast")
    g.add_argument("--forget_per_batch", type=int, default=None,
                   help="balanced batches with exactly this many forget rows (static shapes for CUDA graphs); "
                        "default: the reference's random batch composition")
    g.add_argument("--forget_classes", type=str, default=None,
                   help="comma-separated class-folder names to forget, or a text file of names, one per line (for "
                        "names with a comma; '#' after a space starts a comment) (default: the reference ImageNet "
                        "split)")
    g.add_argument("--retain_classes", type=str, default=None,
                   help="comma-separated class-folder names to retain, or a text file of names, one per line")
    g.add_argument("--proxy_path", type=str, default=None,
                   help="with --use_coco: the proxy image folder, searched recursively (default: "
                        "<data_path>/../../coco/train2017, as the reference); refused without --use_coco")
    g.add_argument("--vqgan_ckpt", type=str, default=None,
                   help="MAGE: the VQGAN tokenizer checkpoint (vqgan_jax_strongaug.ckpt)")
    g.add_argument("--teacher", type=str, default=None,
                   help="checkpoint of the model before unlearning (default: --resume when it is a pretrained "
                        "checkpoint; the original pretrained file recorded in an unlearning checkpoint otherwise)")
    g.add_argument("--mask_ratio", type=float, default=0.75, help="MAE: fraction of patches hidden")
    g.add_argument("--readback_every", type=int, default=20, help="read losses back to the host every N steps")
    g.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap steps per epoch (quick checks)")
    g.add_argument("--verify_images", action="store_true", help="open every selected image before training")
    g.add_argument("--save_every_steps", type=int, default=None, metavar="N",
                   help="also keep RUN_DIR/checkpoint-last.pth = the state after every N-th step (a multiple of "
                        "--accum_iter) and after every epoch; --resume it to continue exactly from that step")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--eval_every", type=int, default=None, metavar="N",
                   help="after every N-th epoch (and the last), evaluate on held-out images of the forget and "
                        "retain classes (files of those folders not used for training), log to RUN_DIR/eval_log.txt "
                        "and keep the best encoder in RUN_DIR/best.pth (see --eval_criterion)")
    g.add_argument("--eval_images", type=int, default=32, metavar="K",
                   help="held-out images per set (forget, retain) for --eval_every, spread over the classes")
    g.add_argument("--eval_criterion", default="forget_gap", choices=EVAL_CRITERIA,
                   help="keep-best criterion, higher is better. forget_gap = forget_err/forget_err_before - "
                        "retain_err/retain_err_before, errors under fixed masks (MAE: inpainting MSE of the hidden "
                        "pixels; MAGE: cross-entropy of the hidden tokens), 'before' = the original model")
    if baseline:
        g.add_argument("--baseline_weighting", default="reference", choices=WEIGHTINGS,
                       help="reference: the official (1+s) weighting of encoder_noise / learn_others (forget term "
                            "on retain rows); corrected: forget term on forget rows")


def add_fast_path_switches(p: argparse.ArgumentParser) -> None:
    """The fast step's A/B switches: how it computes, never what (sums may run in another order)."""
    ab = p.add_argument_group("fast-path switches (how the fast step computes, never what; for A/B checks)")
    ab.add_argument("--share_tokenizer", action="store_true",
                    help="MAGE: reuse the student's tokenisation for the teacher even at reference precision "
                         "(fp16 vs fp32 ids can differ on near-ties; the run prints how many differ on its first "
                         "images)")
    ab.add_argument("--serial_teacher", action="store_true",
                    help="fast/graphed steps on a GPU: run the teacher after the student on one CUDA stream instead "
                         "of on a side stream beside it (same results; for profiling and debugging)")
    ab.add_argument("--unfused_tokenizer_norms", action="store_true",
                    help="MAGE, fast/graphed steps on a GPU: run the frozen VQGAN's GroupNorm + swish with torch's "
                         "ops instead of one fused kernel (differs only in fp32 rounding; for A/B checks)")
    ab.add_argument("--explicit_attention", action="store_true",
                    help="MAGE, fast/graphed steps on a GPU: attention written out as the official code (fp32 scores "
                         "and probabilities in memory) instead of one scaled_dot_product_attention kernel (for A/B "
                         "checks)")
    ab.add_argument("--nchw_tokenizer", action="store_true",
                    help="MAGE, fast/graphed steps on a GPU: run the frozen VQGAN encoder in NCHW, as the official "
                         "code, instead of channels_last (NHWC), the layout of cuDNN's half-precision convs (the "
                         "same math summed in another order: a near-tie code id can differ; for A/B checks)")
    ab.add_argument("--unfused_block_norms", action="store_true",
                    help="fast/graphed steps on a GPU: each ViT block's residual add and the next LayerNorm as "
                         "torch's separate ops instead of one kernel that writes the norm in the autocast dtype "
                         "(differs only in fp32 rounding; for A/B checks)")
    # the defaults since the H100 run of 2026-11-27 (run 3); kept so that older command lines still run
    ab.add_argument("--channels_last_tokenizer", action="store_true",
                    help="the default now (see --nchw_tokenizer); accepted for older command lines")
    ab.add_argument("--fused_block_norms", action="store_true",
                    help="the default now (see --unfused_block_norms); accepted for older command lines")
    ab.add_argument("--full_patch_embed", action="store_true",
                    help="MAE, fast/graphed steps: embed every patch with the strided conv and then keep the visible "
                         "ones, as the official code, instead of embedding the visible patches alone (for A/B "
                         "checks)")


def add_fast_path_opt_ins(p: argparse.ArgumentParser) -> None:
    """The fast step's opt-in update forms: the same AdamW update to within a rounding, not yet timed on a GPU."""
    opt = p.add_argument_group("fast-path opt-ins (the same update to within a rounding; not yet the defaults)")
    opt.add_argument("--fold_clip", action="store_true",
                     help="fast/graphed steps on a GPU without loss scaling (--precision bf16 or fp32): the gradient "
                          "clip's scale done inside the fused AdamW step instead of a pass of its own")
    opt.add_argument("--half_student_weights", action="store_true",
                     help="fast/graphed steps with --precision bf16 (on the CPU also reference, whose student runs "
                          "in bf16 there): the student's Linear / conv weights kept as bf16 "
                          "copies that one multi-tensor AdamW kernel writes, so no step casts weights or gradients "
                          "between fp32 and bf16 (the fp32 weights stay the ones saved and resumed; one process)")


def build_parser(baseline: bool = False, prog: str = None) -> argparse.ArgumentParser:
    p = ReferenceAbbrevParser(prog=prog, description=("Unlearning baselines (main_baseline.py flags)" if baseline
                                                      else "Encoder unlearning (main_unlearn.py flags)"),
                              formatter_class=DefaultsHelpFormatter)
    add_reference_flags(p, baseline)
    add_fast_flags(p, baseline)
    add_fast_path_switches(p)
    add_fast_path_opt_ins(p)
    return p
