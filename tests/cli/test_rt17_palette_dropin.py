"""Drop-in audit of ``palette-unlearn`` against the official Palette ``unlearn.py`` (+ core/praser.py,
core/base_model.py, models/model.py), as a user switching from it would run it, on palette_micro and the fake
Places-365 tree of test_palette_cli:

- abbreviations the official argparse reads as one flag (``--d`` / ``--de`` = --debug, ``--m`` / ``--ma`` /
  ``--max`` = --max_loss) mean that flag, although unlearn_fast's own flags share the prefix;
- a config that does not parse names the line of the FILE (the // stripping must not shift line numbers), and
  one that is not UTF-8 text names the file;
- every Adam argument of ``model.which_model.args.optimizers[0]`` is used (the reference passes them all to
  ``torch.optim.Adam``: betas, eps, amsgrad, ...), and one Adam does not take is one error naming the key;
- a resumed run's train.log says what it loaded, in the reference's lines (``Loading pretrained model from
  [..._Network.pth] ...``, ``Loading training state for [....state] ...``) before ``Begin model train.``;
- ``-gpu`` is written into config.json's ``gpu_ids`` as core/praser.py does;
- a data_root that does not exist names the config key it came from.
"""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from tests.cli.test_palette_cli import _argv, _config, _write, places  # noqa: F401  (places: the data fixture)
from unlearn_fast.cli.palette_command import build_palette_parser, palette_unlearn_main
from unlearn_fast.cli.palette_config import load_palette_config, resolve_palette_job

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _run(out):
    (run,) = glob.glob(os.path.join(str(out), "*"))
    return run


# ---- flags -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, key, value", [
    (["--d"], "debug", True), (["--de"], "debug", True), (["--deb"], "debug", True),
    (["--m", "1"], "max_loss", 1), (["--ma", "1"], "max_loss", 1), (["--max", "1"], "max_loss", 1),
    (["--max_", "1"], "max_loss", 1),
])
def test_prefixes_the_official_parser_reads_as_one_flag(argv, key, value):
    assert getattr(build_palette_parser("x").parse_args(argv), key) == value


@pytest.mark.parametrize("prefix", ["--p", "--c", "--f", "--l", "--learn"])
def test_prefixes_ambiguous_in_the_official_parser_stay_refused(prefix, capsys):
    with pytest.raises(SystemExit):
        build_palette_parser("x").parse_args([prefix, "1"])
    assert "ambiguous option" in capsys.readouterr().err


def test_own_flags_still_take_their_unambiguous_prefixes():
    args = build_palette_parser("x").parse_args(["--max_s", "3", "--max_i", "2", "--dev", "cpu", "--da", "r"])
    assert (args.max_steps_per_epoch, args.max_images, args.device, args.data_root) == (3, 2, "cpu", "r")


# ---- the config file ---------------------------------------------------------------------------------
def test_a_config_that_does_not_parse_names_the_files_line(places, tmp_path):
    lines = json.dumps(_config(places), indent=2).splitlines()
    at = next(i for i, line in enumerate(lines) if '"n_epoch"' in line)
    lines[at] = lines[at] + ","  # a trailing comma, which the reference's json.loads refuses too
    lines.insert(1, '  "seed": -1, // a comment line')  # one line with a comment, the rest without
    lines.insert(1, "// the header comment")
    path = tmp_path / "trailing.json"
    path.write_text("\n".join(lines) + "\n")
    bad_line = at + 3  # 1-based, after the two inserted lines
    assert lines[bad_line - 1].rstrip().endswith(",,")
    with pytest.raises(ValueError) as e:
        load_palette_config(str(path))
    # the error is on the comma's line or the next one (json reports where the next key should start)
    assert any(f"(line {n}," in str(e.value) for n in (bad_line, bad_line + 1)), str(e.value)
    assert str(path) in str(e.value)


def test_a_config_that_is_not_utf8_names_the_file(places, tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(json.dumps(_config(places)).replace('"experiments"', '"exp\u00e9"').encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}.*UTF-8"):
        load_palette_config(str(path))


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_palette_config(str(tmp_path))


# ---- the optimizer -----------------------------------------------------------------------------------
def test_every_adam_argument_of_the_config_is_used(places, tmp_path):
    opt = [{"lr": 2e-3, "weight_decay": 0.01, "betas": [0.5, 0.9], "eps": 1e-6, "amsgrad": True}]
    cfg = _config(places, **{"model.which_model.args.optimizers": opt, "train.n_epoch": 1})
    out = tmp_path / "out"
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "2")) == 0
    state = torch.load(os.path.join(_run(out), "checkpoint", "1.state"), weights_only=True)
    group = state["optimizers"][0]["param_groups"][0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"], group["amsgrad"]) == \
        (2e-3, 0.01, (0.5, 0.9), 1e-6, True)
    moments = next(iter(state["optimizers"][0]["state"].values()))
    assert "max_exp_avg_sq" in moments  # amsgrad really ran


@pytest.mark.parametrize("extra, match", [
    ({"momentum": 0.9}, r"optimizers\[0\]\.momentum"),
    ({"betas": [0.9]}, r"optimizers\[0\]\.betas"),
    ({"eps": -1}, r"optimizers\[0\]\.eps"),
    ({"amsgrad": "yes"}, r"optimizers\[0\]\.amsgrad"),
])
def test_an_adam_argument_adam_does_not_take_names_the_key(places, tmp_path, extra, match):
    opt = [dict({"lr": 5e-5, "weight_decay": 0}, **extra)]
    cfg = _config(places, **{"model.which_model.args.optimizers": opt})
    with pytest.raises(ValueError, match=match):
        resolve_palette_job(cfg, "train")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1"))
    assert not os.path.exists(out)


def test_the_default_optimizer_is_the_references_adam(places):
    job = resolve_palette_job(_config(places, **{"model.which_model.args.optimizers": None}), "train")
    assert (job.lr, job.weight_decay, job.adam_options) == (5e-5, 0.0, {})


# ---- outputs -----------------------------------------------------------------------------------------
def test_resumed_run_log_says_what_it_loaded_and_config_json_has_gpu_ids(places, tmp_path):
    cfg1 = _write(tmp_path, _config(places, **{"train.n_epoch": 1}), "one.json")
    assert palette_unlearn_main(_argv(places, cfg1, tmp_path / "one", "--fix_decoder", "1",
                                      "--max_steps_per_epoch", "1")) == 0
    prefix = os.path.join(_run(tmp_path / "one"), "checkpoint", "1")
    cfg2 = _write(tmp_path, _config(places, **{"train.n_epoch": 2}), "two.json")
    assert palette_unlearn_main(_argv(places, cfg2, tmp_path / "two", "--fix_decoder", "1", "--max_steps_per_epoch",
                                      "1", "--resume_state", prefix, "-gpu", "0")) == 0
    run = _run(tmp_path / "two")
    lines = [line.split(" - INFO: ", 1)[1] for line in open(os.path.join(run, "train.log")).read().splitlines()
             if " - INFO: " in line]
    wanted = ["Beign loading pretrained model [Network] ...",
              f"Loading pretrained model from [{prefix}_Network.pth] ...",
              "Beign loading pretrained model [Network_ema] ...",
              f"Loading pretrained model from [{prefix}_Network_ema.pth] ...",
              "Beign loading training states",
              f"Loading training state for [{prefix}.state] ..."]
    at = lines.index(wanted[0])
    assert lines[at:at + len(wanted)] == wanted
    assert lines.index("Begin model train.") == at + len(wanted)
    assert json.load(open(os.path.join(run, "config.json")))["gpu_ids"] == [0]  # as core/praser.py writes it
    # a run that does not resume logs none of them
    first = open(os.path.join(_run(tmp_path / "one"), "train.log")).read()
    assert "Loading" not in first and "Beign" not in first


def test_a_data_root_that_does_not_exist_names_the_key(places, tmp_path):
    cfg = _config(places, **{"datasets.train.which_dataset.args.data_root": str(tmp_path / "nowhere")})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"datasets\.train\.which_dataset\.args\.data_root.*nowhere.*does not exist"):
        palette_unlearn_main(_argv(places, _write(tmp_path, cfg), out, "--fix_decoder", "1"))
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match=r"--data_root.*nowhere2"):
        palette_unlearn_main(_argv(places, _write(tmp_path, _config(places)), out, "--fix_decoder", "1",
                                   "--data_root", str(tmp_path / "nowhere2")))
