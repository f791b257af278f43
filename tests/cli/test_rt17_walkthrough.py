"""A first-time user's walk through the CLI (red team, session 17): misspelt commands and flags get one line with
the likely meant spelling, a finished run says where its files are and what reads them, an interrupt that
wrote nothing does not talk about checkpoints, ``audit`` finds the run directory one level down and does not
tell a user to pass the flag they passed, the demo's help has no markup and its output explains grid.png."""
from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained
from unlearn_fast.cli import demo
from unlearn_fast.cli.help_format import closest_flags, short_usage_errors
from unlearn_fast.cli.main import main
from unlearn_fast.cli.unlearn_args import build_parser

pytestmark = pytest.mark.usefixtures("single_thread")


def _usage_error(argv, capsys) -> str:
    """stderr of a usage error of ``main(argv)``, which must exit with code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err


# ---- misspelt commands and flags: one line, the meant spelling --------------------------------------------

def test_a_misspelt_command_is_one_line_with_the_meant_command(capsys):
    assert main(["unlern", "--model", "mae_micro"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # was: the error, then the whole 17-line command list
    assert "unknown command 'unlern'" in err and "did you mean 'unlearn'?" in err and "unlearn-fast --help" in err
    assert main(["zzz"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'zzz'" in err and "did you mean" not in err and err.count("\n") == 1


def test_version_flag_prints_the_package_version(capsys):
    import unlearn_fast
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"unlearn-fast {unlearn_fast.__version__}\n"


@pytest.mark.parametrize("argv, flag, meant", [
    (["unlearn", "--forget_clases", "cat"], "--forget_clases", "--forget_classes"),
    (["baseline", "--loss_type", "encoder_noise", "--retain_clases=bird"], "--retain_clases", "--retain_classes"),
    (["demo", "--outputdir", "/tmp/x"], "--outputdir", "--output_dir"),
    (["audit", "RUN", "--chekpoint", "c.pth"], "--chekpoint", "--checkpoint"),
])
def test_an_unknown_flag_is_one_line_naming_the_meant_flag(capsys, argv, flag, meant):
    err = _usage_error(argv, capsys)
    assert err.count("\n") == 1, err  # was: a usage block of up to 45 lines above the error
    assert f"unrecognized arguments: {flag}" in err and f"did you mean {meant}?" in err
    assert f"'unlearn-fast {argv[0]} --help' lists every flag" in err


def test_other_usage_errors_are_one_line_too(capsys):
    err = _usage_error(["demo", "--unlearn_steps", "abc"], capsys)
    assert err.count("\n") == 1 and "argument --unlearn_steps: invalid int value: 'abc'" in err
    err = _usage_error(["unlearn", "--precision", "fp16"], capsys)
    assert err.count("\n") == 1 and "invalid choice: 'fp16'" in err and "did you mean" not in err
    err = _usage_error(["audit"], capsys)
    assert err.count("\n") == 1 and "required: run_dir" in err
    err = _usage_error(["list-models", "--bogus"], capsys)
    assert err.count("\n") == 1 and "unrecognized arguments: --bogus" in err and "did you mean" not in err


def test_closest_flags_pairs_each_unknown_flag_with_its_nearest_spelling():
    p = build_parser(prog="unlearn-fast unlearn")
    msg = "unrecognized arguments: --epohcs 2 --retain_clases=b --zzzzzz"
    assert closest_flags(p, msg) == [("--epohcs", "--epochs"), ("--retain_clases", "--retain_classes")]
    assert closest_flags(p, "argument --lr: expected one argument") == []
    with pytest.raises(SystemExit):  # several: each named with its own suggestion
        short_usage_errors(p).parse_args(["--epohcs", "2", "--retain_clases=b"])


def test_help_still_exits_0_with_the_full_flag_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--help"])
    assert e.value.code == 0 and "--forget_classes" in capsys.readouterr().out


# ---- a run: where the files went, and an interrupt before any checkpoint ----------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    data = make_class_tree(root / "data", ["cat", "dog", "bird"], 6, seed=0, size=(32, 32))
    pretrained = save_random_pretrained(root / "pre.pth")
    return root, data, pretrained


def test_a_finished_run_names_its_run_dir_last_checkpoint_and_the_next_commands(finished_run, tmp_path, capsys):
    _, data, pretrained = finished_run
    out = tmp_path / "out"
    assert main(micro_unlearn_argv(data, pretrained, out, "--forget_alpha", "0.2", "--epochs", "2",
                                   "--max_steps_per_epoch", "1")) == 0
    run_dir = only_run_dir(out)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("unlearn_fast: done in ") and f"{run_dir} holds log.txt and checkpoint-1.pth" in last
    for command in ("audit", "report"):  # ready to copy: the path shell-quoted
        assert f"unlearn-fast {command} {shlex.quote(run_dir)}" in last
    assert os.path.isfile(os.path.join(run_dir, "checkpoint-1.pth"))


def test_no_done_line_on_other_ranks(finished_run, tmp_path, capsys, monkeypatch):
    from unlearn_fast.cli import main as main_module
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    main_module._print_run_done(str(run_dir), 1.0, build_parser().parse_args([]))
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    main_module._print_run_done(str(run_dir), 1.0, build_parser().parse_args([]))
    assert "holds log.txt and no checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["unlearn", "baseline"])
def test_ctrl_c_before_the_run_started_does_not_promise_checkpoints(monkeypatch, capsys, command):
    import unlearn_fast.cli.unlearn_command as uc

    def stopped(args, baseline=False):
        raise KeyboardInterrupt  # Ctrl-C while the model loads: no run directory, nothing written
    monkeypatch.setattr(uc, "run_unlearn", stopped)
    extra = ["--loss_type", "encoder_noise"] if command == "baseline" else []
    assert main([command, "--model", "mae_micro", *extra]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint" not in err  # was: "checkpoints written so far are intact"


def test_a_signal_before_the_first_checkpoint_is_not_followed_by_intact_checkpoints(finished_run, tmp_path,
                                                                                    capsys, monkeypatch):
    import signal
    from unlearn_fast.train import image_datasets
    _, data, pretrained = finished_run
    real, sent = image_datasets.load_rgb_image, []

    def load(path):  # SIGTERM while the first batch is read: inside the run, before any checkpoint
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path)
    monkeypatch.setattr(image_datasets, "load_rgb_image", load)
    out = tmp_path / "out"
    assert main(micro_unlearn_argv(data, pretrained, out)) == 143
    captured = capsys.readouterr()
    assert "removed" in captured.out and "before its first checkpoint" in captured.out
    assert "terminated" in captured.err and "intact" not in captured.err  # was a contradiction of the line above


# ---- audit: the folder the user passed, the flag the user passed ------------------------------------------

def _fake_run(folder, teacher) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "opt.yaml"), "w") as f:
        json.dump({"model": "mae_micro", "input_size": 32, "data_path": str(folder), "seed": 0,
                   "num_image_per_class": 1, "retainset_ratio": 1.0, "teacher_checkpoint": teacher}, f)
    shutil.copyfile(teacher, os.path.join(folder, "checkpoint-0.pth"))
    return str(folder)


def test_audit_of_the_output_dir_names_the_run_dir_inside(tmp_path, capsys):
    teacher = save_random_pretrained(tmp_path / "t.pth")
    older = _fake_run(tmp_path / "out" / "run_a", teacher)
    newer = _fake_run(tmp_path / "out" / "run_b", teacher)
    os.utime(os.path.join(older, "opt.yaml"), (1e9, 1e9))
    assert main(["audit", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no opt.yaml" in err and "holds 2" in err and f"unlearn-fast audit {newer}" in err
    assert err.count("\n") == 1
    assert main(["audit", str(tmp_path / "out" / "run_a" / "..")]) == 2  # the same folder, spelt otherwise
    (tmp_path / "empty").mkdir()
    assert main(["audit", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "no opt.yaml" in err and "holds" not in err


def test_audit_does_not_ask_for_a_flag_the_user_gave(tmp_path, capsys):
    teacher = save_random_pretrained(tmp_path / "t.pth")
    run = _fake_run(tmp_path / "run", teacher)
    assert main(["audit", run, "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {tmp_path / 'missing.pth'}: checkpoint file not found" in err and "pass --" not in err
    assert main(["audit", run, "--teacher", str(tmp_path / "gone.pth")]) == 2
    assert "--teacher" in capsys.readouterr().err
    os.remove(teacher)  # the teacher recorded by the run moved: say where the path came from and what to pass
    assert main(["audit", run]) == 2
    err = capsys.readouterr().err
    assert f"teacher file not found: {teacher}" in err and "recorded in" in err and "pass --teacher" in err


def test_audit_help_explains_run_dir(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "folder with opt.yaml" in " ".join(capsys.readouterr().out.split())


# ---- demo: help text and what its files are ---------------------------------------------------------------

def test_demo_help_has_no_docstring_markup():
    text = demo.build_parser().format_help()
    assert "``" not in text and "unlearn-fast demo: the embedded default" in " ".join(text.split())


def test_demo_output_names_both_files_and_explains_the_grid(tmp_path):
    metrics, grid = str(tmp_path / "metrics.json"), str(tmp_path / "grid.png")
    text = demo.outputs_message(metrics, grid, 24.6)
    first, second = text.splitlines()
    assert first == f"unlearn_fast demo: wrote {metrics} and {grid} in 25 s"  # was: the bare name grid.png
    for words in ("forget digits first", "original", "masked", "before unlearning", "after"):
        assert words in second
    assert demo.outputs_message(metrics, None, 3.0) == f"unlearn_fast demo: wrote {metrics} in 3 s"  # no Pillow


def test_report_refuses_a_folder_that_is_no_run_and_names_the_runs_inside(tmp_path, capsys):
    """`unlearn-fast report DATA` wrote an empty report.html into the image folder and exited 0; the --output_dir
    of a run is named with its run inside."""
    from unlearn_fast.cli.main import main
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    assert main(["report", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "nothing to report" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "report.html").exists()
    run = tmp_path / "out" / "class_img1k_run"
    run.mkdir(parents=True)
    (run / "opt.yaml").write_text("{}")
    assert main(["report", str(tmp_path / "out")]) == 2
    assert f"e.g. the newest: unlearn-fast report {run}" in capsys.readouterr().err


@pytest.mark.parametrize("below", [False, True])
def test_an_output_dir_that_is_a_file_says_so(tmp_path, below):
    from unlearn_fast.train.run_outputs import check_output_dir, create_run_dir
    (tmp_path / "e1").write_text("x")
    path = str(tmp_path / "e1" / "sub") if below else str(tmp_path / "e1")
    says = "is a file, not a folder" if below else "it exists and is a file"
    for call in (lambda: check_output_dir(path), lambda: create_run_dir(path, lambda: "run")):
        with pytest.raises(ValueError, match=says):
            call()


def test_a_warmup_as_long_as_the_run_is_named(tmp_path, capsys):
    """--epochs 2 with the default --warmup_epochs 5: the lr only ramps up (to ~40 % of its peak); said once."""
    from tests.helpers import make_class_tree, micro_unlearn_argv, save_random_pretrained
    from unlearn_fast.cli.main import main
    data = make_class_tree(tmp_path / "data", ("cat", "dog", "bird"), 2, seed=0)
    pre = save_random_pretrained(tmp_path / "pre.pth")
    argv = micro_unlearn_argv(data, pre, tmp_path / "out", "--max_steps_per_epoch", "1", per_class=2, batch=4,
                              epochs=2, warmup=5)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--warmup_epochs 5 >= --epochs 2: the learning rate only ramps up and ends near 40%") == 1
    assert main(micro_unlearn_argv(data, pre, tmp_path / "out2", "--max_steps_per_epoch", "1", per_class=2, batch=4,
                                   epochs=2, warmup=1)) == 0
    assert "--warmup_epochs" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate", "eval", "tsne", "report", "palette-unlearn", "palette-test"])
def test_every_command_gives_a_misspelt_flag_one_line(command, capsys):
    from unlearn_fast.cli.main import main
    with pytest.raises(SystemExit) as done:
        main([command, "--no_such_flagg", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    # one line (the required flags' error comes first where a command has some), with where to look
    assert done.value.code == 2 and len(err) == 1 and f"unlearn-fast {command}: error: " in err[0], err
    assert f"'unlearn-fast {command} --help' lists every flag" in err[0], err
