"""The ``unlearn-fast`` command (also ``python -m unlearn_fast``).

    unlearn-fast demo                                   # the embedded default: forget digits 0-4 of MNIST
    unlearn-fast unlearn --model mae_micro --input_size 32 --data_path DIR --forget_classes a --retain_classes b
    unlearn-fast baseline --loss_type encoder_noise ... # the paper's baselines (main_baseline.py flags)
    unlearn-fast list-models
"""
from __future__ import annotations

import codecs
import difflib
import os
import re
import shlex
import sys
import time
from typing import List, Optional

USAGE = """usage: unlearn-fast <command> [flags]

commands:
  demo         the embedded default: pretrain a small MAE on bundled MNIST digits, forget some digits, report
  unlearn      encoder unlearning with the flags of the reference main_unlearn.py
               (--model palette: the same as palette-unlearn)
  baseline     the paper's baselines with the flags of the reference main_baseline.py (--loss_type ...)
  palette-unlearn  Palette (diffusion) unlearning: the reference unlearn.py flags and JSON config (-c)
  palette-test     sample the Palette test set with --ckpt (run.py -p test output layout)
  generate     MAGE inpaint/outpaint generation in the reference layout (testpaint.py)
  eval         FID / IS / CLIP cosine of generated folders (eval.py, clip_embed.py)
  tsne         T-SNE figure of CLIP embeddings (tsne_visual.py)
  report       one self-contained HTML page for a run directory
  audit        forget audit of a run: membership AUC of forget-class images, before vs after unlearning
  list-models  registered model names

'unlearn-fast <command> --help' shows each command's flags; 'unlearn-fast --version' the version.
"""

COMMANDS = re.findall(r"^  ([a-z][a-z-]+)\s", USAGE, flags=re.M)  # for "did you mean" on a misspelt command


class UsageError(ValueError):
    pass


# the spellings argparse reads as --model in the unlearn / baseline parsers (--m is ambiguous there)
_MODEL_FLAGS = ("--mo", "--mod", "--mode", "--model")


def _model_flag_at(argv: List[str], i: int):
    """(value, tokens taken) when ``argv[i]`` gives ``--model`` (or an abbreviation argparse accepts), else None."""
    flag, eq, value = argv[i].partition("=")
    if flag not in _MODEL_FLAGS:
        return None
    if eq:
        return value, 1
    return (argv[i + 1], 2) if i + 1 < len(argv) else None


def _palette_model_flag(argv: List[str]) -> Optional[List[str]]:
    """``argv`` without its ``--model palette`` when it names the Palette family, else None."""
    for i in range(len(argv)):
        found = _model_flag_at(argv, i)
        if found is not None and found[0] == "palette":
            return argv[:i] + argv[i + found[1]:]
    return None


def _model_flag(argv: List[str]) -> Optional[str]:
    """The value of ``--model`` in ``argv`` (the last one, as argparse keeps), or None."""
    value = None
    for i in range(len(argv)):
        found = _model_flag_at(argv, i)
        if found is not None:
            value = found[0]
    return value


def _launcher_rank_after_command(argv: List[str]) -> List[str]:
    """``python -m torch.distributed.launch ... -m unlearn_fast unlearn ...`` (the reference's launcher) passes
    ``--local-rank=N`` before the script's own arguments, i.e. before the command: move it after the command
    (the rank itself is read from LOCAL_RANK, which the launcher also sets)."""
    lead = 0
    while lead < len(argv) and re.fullmatch(r"--local[-_]rank=\d+", argv[lead]):
        lead += 1
    return argv[lead:lead + 1] + argv[:lead] + argv[lead + 1:] if lead else argv


def _run(command: str, argv: List[str]) -> int:
    model = _model_flag(argv)
    if command in ("unlearn", "baseline") and model is not None and model.startswith("palette") and (
            command == "baseline" or model != "palette"):
        raise UsageError(f"--model {model} is a Palette (diffusion) model: use 'unlearn-fast palette-unlearn -c CONFIG "
                         "...' or 'unlearn-fast unlearn --model palette -c CONFIG ...' (the UNet comes from the config; "
                         "the Palette baselines are flags of that command)")
    if command == "unlearn" and _palette_model_flag(argv) is not None:
        # Palette takes the reference unlearn.py flags and its JSON config: the palette-unlearn command
        from .palette_command import palette_unlearn_main
        return palette_unlearn_main(_palette_model_flag(argv))
    if command in ("unlearn", "baseline"):
        from .help_format import short_usage_errors
        from .unlearn_args import build_parser
        from .unlearn_command import run_unlearn
        args = short_usage_errors(build_parser(baseline=command == "baseline", prog=f"unlearn-fast {command}")
                                  ).parse_args(argv)
        started = time.perf_counter()
        run_dir = run_unlearn(args, baseline=command == "baseline")
        _print_run_done(run_dir, time.perf_counter() - started, args)
        return 0
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(argv)
    if command == "list-models":
        import argparse
        from .help_format import short_usage_errors
        short_usage_errors(argparse.ArgumentParser(
            prog="unlearn-fast list-models", description="print the registered model names, one per line (the "
            "values of --model)")).parse_args(argv)  # --help; extras refused
        from ..models import list_models
        print("\n".join(list_models()))
        return 0
    if command in ("palette-unlearn", "palette-test"):
        from .palette_command import palette_test_main, palette_unlearn_main
        return palette_unlearn_main(argv) if command == "palette-unlearn" else palette_test_main(argv)
    if command == "audit":
        from .audit_command import audit_main
        return audit_main(argv)
    if command in ("generate", "eval", "tsne", "report"):
        from . import tools
        return getattr(tools, f"{command}_main")(argv)
    near = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.6)
    raise UsageError(f"unknown command {command!r}" + (f" (did you mean '{near[0]}'?)" if near else "")
                     + "; 'unlearn-fast --help' lists the commands")


def _print_run_done(run_dir: Optional[str], seconds: float, args) -> None:
    """The last line of a finished ``unlearn`` / ``baseline`` run (rank 0 only): where its files are and the
    commands that read them, ready to copy."""
    from ..train.distributed import env_ranks
    if not run_dir or env_ranks(getattr(args, "dist_on_itp", False))[0] != 0 or not os.path.isdir(run_dir):
        return
    epochs = [int(m.group(1)) for n in os.listdir(run_dir) if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", n))]
    last = f"checkpoint-{max(epochs)}.pth" if epochs else "no checkpoint"
    quoted = shlex.quote(run_dir)
    took = f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"
    print(f"unlearn_fast: done in {took} s; {run_dir} holds log.txt and {last}; next: "
          f"unlearn-fast audit {quoted}; unlearn-fast report {quoted}", flush=True)


def _printable_output() -> None:
    """stdout / stderr print any path and message: a UTF-8 locale (en_US.UTF-8, not C.UTF-8) gives stdout strict
    errors, so printing a file name that is not UTF-8 (Linux names are bytes, os.listdir gives those as
    surrogates) would raise UnicodeEncodeError in the middle of a run; such a name is written back as its own
    bytes (surrogateescape, Python's choice in the C locale). In another encoding (latin-1, ASCII) what it cannot
    hold ('±' in eval's table, a name's surrogates) is escaped. A stream the process started without (closed by
    the launcher: Python sets it to None) goes to /dev/null, or the first progress bar would stop the run."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    for stream in (sys.stdout, sys.stderr):
        if not hasattr(stream, "reconfigure") or not isinstance(getattr(stream, "encoding", None), str):
            continue
        if codecs.lookup(stream.encoding).name == "utf-8":
            if stream.errors == "strict":
                stream.reconfigure(errors="surrogateescape")
        elif stream.errors != "backslashreplace":
            stream.reconfigure(errors="backslashreplace")


def main(argv: Optional[List[str]] = None) -> int:
    from_command_line = argv is None
    _printable_output()
    argv = _launcher_rank_after_command(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)  # no command is a usage error: stderr, exit 2
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__
        print(f"unlearn-fast {__version__}")
        return 0
    try:  # the first import of torch: seconds in which a Ctrl-C is otherwise a traceback from inside it
        from ..train.checkpoint import CheckpointError
        from ..train.step_reference import NonFiniteLossError
    except KeyboardInterrupt:
        print("unlearn-fast: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    try:
        return _run(argv[0], argv[1:])
    except NonFiniteLossError as e:
        print(f"unlearn-fast: error: {e}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # the reader of our stdout left (`unlearn-fast list-models | head -1`): nothing to say
        if from_command_line:  # keep Python's exit-time flush of stdout from raising again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process killed by SIGPIPE
    except (ValueError, CheckpointError, OSError) as e:  # bad input, or a file that cannot be read or written
        print(f"unlearn-fast: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional package a command needs (matplotlib for tsne, ...)
        print(f"unlearn-fast: error: {e}; this command needs it (pip install {e.name or 'it'})", file=sys.stderr)
        return 2
    except MemoryError as e:  # host memory
        print(f"unlearn-fast: error: out of host memory ({e or 'MemoryError'}); lower --batch_size (raise "
              "--accum_iter to keep the effective batch) or --num_workers; checkpoints written so far are intact",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        import torch
        if not isinstance(e, getattr(torch, "OutOfMemoryError", ())):
            raise  # anything else is a bug: its traceback is what a report needs
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        print(f"unlearn-fast: error: {first}; lower --batch_size (raise --accum_iter to keep the effective batch) "
              "or use --precision bf16; checkpoints written so far are intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)  # RunStopped (SIGINT or SIGTERM during a run), else Ctrl-C
        if from_command_line:  # the process exits now: no teardown tracebacks of half-built DataLoader workers
            sys.unraisablehook = lambda unraisable: None
        # unlearn / baseline already said what is left (the checkpoint to --resume, or the run directory removed);
        # palette-unlearn: only a signal during its run (its handlers installed) can follow a checkpoint, and a
        # Ctrl-C before it started has written nothing to speak of
        trained = argv[0] == "palette-unlearn" and hasattr(e, "signum")
        print(f"unlearn-fast: {'terminated' if signum == 15 else 'interrupted'}"
              + ("; checkpoints written so far are intact" if trained else ""), file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
