"""``palette-unlearn --resume_state`` (and the config's ``path.resume_state``) end to end on palette_micro and the
fake Places-365 tree of test_palette_cli: 3 epochs vs 1 epoch + resume to 3 give bit-identical files, the
teacher is the original model, and each bad input is one error (exit code 2 from ``unlearn-fast``) naming the
file, with no run directory created."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from tests.cli.test_palette_cli import _config, _write, places  # noqa: F401  (places: the data fixture)
from unlearn_fast.cli.main import main
from unlearn_fast.cli.palette_command import palette_unlearn_main

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SUFFIXES = ("_Network.pth", "_Network_ema.pth", ".state")


def _argv(places, cfg_path, out, *extra, ckpt=True):
    return (["-c", cfg_path, "--class_list", places["class_list"], "--output_dir", str(out), "--device", "cpu",
             "--no_progress", "--fix_decoder", "1", "--max_steps_per_epoch", "2", "--readback_every", "1"]
            + (["--ckpt", places["ckpt"]] if ckpt else []) + list(extra))


def _run_dir(out):
    (run,) = glob.glob(os.path.join(str(out), "*"))
    return run


def _load(run, epoch):
    ck = os.path.join(run, "checkpoint")
    return [torch.load(os.path.join(ck, f"{epoch}{s}"), weights_only=True) for s in SUFFIXES]


@pytest.fixture(scope="module")
def first_epoch(places, tmp_path_factory):
    """A run of 'Ours' that stops after epoch 1, and the config of its 3-epoch continuation."""
    base = tmp_path_factory.mktemp("palette_resume_cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests run single-threaded: the same CPU reduction order
    try:
        assert palette_unlearn_main(_argv(places, _write(base, _config(places, **{"train.n_epoch": 1}), "one.json"),
                                          base / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    return dict(base=base, prefix=os.path.join(_run_dir(base / "one"), "checkpoint", "1"),
                cfg3=_write(base, _config(places, **{"train.n_epoch": 3}), "three.json"))


def test_resume_to_three_epochs_equals_an_uninterrupted_run(places, first_epoch, tmp_path, capsys):
    assert palette_unlearn_main(_argv(places, first_epoch["cfg3"], tmp_path / "full")) == 0
    capsys.readouterr()
    # no --ckpt: the weights and the teacher come from the resume state
    assert palette_unlearn_main(_argv(places, first_epoch["cfg3"], tmp_path / "resumed", "--resume_state",
                                      first_epoch["prefix"], ckpt=False)) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at epoch 2 (8 images seen)" in out and "warning" not in out
    full, resumed = _run_dir(tmp_path / "full"), _run_dir(tmp_path / "resumed")
    assert sorted(os.listdir(os.path.join(resumed, "checkpoint"))) == sorted(f"{e}{s}" for e in (2, 3)
                                                                             for s in SUFFIXES)
    info = json.load(open(os.path.join(resumed, "config.json")))["unlearn_fast"]
    assert info["resume_state"] == os.path.abspath(first_epoch["prefix"]) and info["start_epoch"] == 2
    assert info["ckpt"] is None
    (w_net, w_ema, w_state), (g_net, g_ema, g_state) = _load(full, 3), _load(resumed, 3)
    assert list(g_net) == list(w_net)
    for k in w_net:
        assert torch.equal(g_net[k], w_net[k]), k
    assert g_ema.keys() == w_ema.keys() and all(torch.equal(g_ema[k], w_ema[k]) for k in w_ema)
    assert (g_state["epoch"], g_state["iter"]) == (w_state["epoch"], w_state["iter"]) == (3, 24)
    w_opt, g_opt = w_state["optimizers"][0], g_state["optimizers"][0]
    assert g_opt["param_groups"] == w_opt["param_groups"] and g_opt["state"].keys() == w_opt["state"].keys()
    for pid, st in w_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(g_opt["state"][pid][k], v), (pid, k)
    # the teacher is the original model (16_Network.pth), not the student that was resumed
    pre = torch.load(places["ckpt"], weights_only=True)
    one = torch.load(first_epoch["prefix"] + "_Network.pth", weights_only=True)
    teacher = {k[len("teacher_"):]: v for k, v in g_net.items() if k.startswith("teacher_denoise_fn.")}
    assert teacher.keys() == {k for k in pre if k.startswith("denoise_fn.")}
    assert all(torch.equal(v, pre[k]) for k, v in teacher.items())
    assert any(not torch.equal(teacher[k], one[k]) for k in teacher if "input_blocks" in k)
    # the train.log of the resumed run has the uninterrupted run's lines for epochs 2 and 3
    def lines(run):  # the lines after the opening ones (which name the run folder), without the time stamp
        text = open(os.path.join(run, "train.log")).read().split(" - INFO: Begin model train.\n", 1)[1]
        return [x.split(" - ", 1)[1] for x in text.splitlines()]
    assert lines(resumed) == lines(full)[-len(lines(resumed)):]


def test_the_config_key_and_the_flag(places, first_epoch, tmp_path, capsys):
    # path.resume_state from the config, with --ckpt given: it must be (and is) the original model
    cfg = _config(places, **{"train.n_epoch": 2, "path.resume_state": first_epoch["prefix"]})
    assert palette_unlearn_main(_argv(places, _write(tmp_path, cfg), tmp_path / "a")) == 0
    assert "resuming" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(_run_dir(tmp_path / "a"), "checkpoint")))[0] == "2.state"
    # the flag wins over a stale config key; 'none' ignores the key (a fresh run from --ckpt)
    stale = _write(tmp_path, _config(places, **{"train.n_epoch": 2, "path.resume_state": str(tmp_path / "gone/7")}),
                   "stale.json")
    assert palette_unlearn_main(_argv(places, stale, tmp_path / "b", "--resume_state", first_epoch["prefix"])) == 0
    assert palette_unlearn_main(_argv(places, stale, tmp_path / "c", "--resume_state", "none")) == 0
    assert sorted(os.listdir(os.path.join(_run_dir(tmp_path / "c"), "checkpoint")))[0] == "1.state"
    rc = main(["palette-unlearn"] + _argv(places, stale, tmp_path / "d", ckpt=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "gone/7_Network.pth" in err[0] and not (tmp_path / "d").exists()


def _copy(prefix, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for s in SUFFIXES:
        shutil.copyfile(prefix + s, dst + s)
    return dst


def _fails(places, cfg, out, prefix, *extra, ckpt=False, capsys=None) -> str:
    rc = main(["palette-unlearn"] + _argv(places, cfg, out, "--resume_state", prefix, *extra, ckpt=ckpt))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("unlearn-fast: error: "), err
    assert not os.path.exists(out)  # nothing half-written
    return err[0]


def test_bad_resume_inputs_exit_2_naming_the_file(places, first_epoch, tmp_path, capsys):
    cfg3, prefix = first_epoch["cfg3"], first_epoch["prefix"]
    out = tmp_path / "never"
    for i, missing in enumerate(SUFFIXES):
        p = _copy(prefix, str(tmp_path / f"m{i}" / "1"))
        os.remove(p + missing)
        assert f"missing {p}{missing}" in _fails(places, cfg3, out, p, capsys=capsys)
    p = _copy(prefix, str(tmp_path / "trunc" / "1"))
    with open(p + ".state", "r+b") as fh:
        fh.truncate(os.path.getsize(p + ".state") // 3)
    assert f"cannot read checkpoint '{p}.state'" in _fails(places, cfg3, out, p, capsys=capsys)
    # saved by 'Ours' (encoder only); resumed as RETAIN LABEL (whole UNet)
    msg = _fails(places, cfg3, out, prefix, "--learn_others", "1", "--fix_decoder", "0", capsys=capsys)
    assert "1.state was saved by a 'ours' run (--fix_decoder 1); this run is 'retain_label'" in msg
    p = _copy(prefix, str(tmp_path / "official" / "1"))  # without the unlearn_fast key: the Adam moments tell
    state = torch.load(p + ".state", weights_only=True)
    torch.save({k: state[k] for k in ("epoch", "iter", "schedulers", "optimizers")}, p + ".state")
    msg = _fails(places, cfg3, out, p, "--learn_others", "1", "--fix_decoder", "0", capsys=capsys)
    assert f"the optimizer state in {p}.state does not match the parameters this run trains" in msg
    # nothing left to do: epoch 1 of n_epoch 1
    one = _write(tmp_path, _config(places, **{"train.n_epoch": 1}), "one.json")
    assert "1.state already finished epoch 1 of train.n_epoch 1: nothing to do" in _fails(places, one, out, prefix,
                                                                                         capsys=capsys)
    # --ckpt that is not the original model
    other = tmp_path / "other.pth"
    net = torch.load(places["ckpt"], weights_only=True)
    net["denoise_fn.input_blocks.0.0.weight"] += 1
    torch.save(net, other)
    msg = _fails(places, cfg3, out, prefix, "--ckpt", str(other), capsys=capsys)
    assert f"--ckpt {other} is not the teacher stored in {prefix}_Network.pth" in msg
