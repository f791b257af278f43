"""Red team 20: the user's environment and file names (the locale, names that are not UTF-8, commas and '#' in
class names, a class-list file given by a relative path, a class folder that is a broken link, a '~' in
$UNLEARN_FAST_CACHE, a closed stderr, evals appending to one CSV at once).

Linux file names are bytes; os.listdir gives those that are not UTF-8 (a tree unpacked from an old zip, a latin-1
machine's copy) as surrogates (PEP 383), which UTF-8 text with strict errors cannot hold. A UTF-8 locale such as
en_US.UTF-8 (not C.UTF-8, whose stdout Python opens with surrogateescape) gives stdout strict errors.
"""
from __future__ import annotations

import io
import os
import sys
import threading

import pytest

from unlearn_fast.cli.main import main
from unlearn_fast.eval.csv_rows import append_rows_atomic, fid_is_row, read_rows
from unlearn_fast.train.data_split import parse_class_list
from unlearn_fast.train.digits import cache_dir, digits_cache_path
from unlearn_fast.train.palette_trainer import PaletteRunLog

from tests.helpers import make_class_tree, micro_unlearn_argv, only_run_dir, save_random_pretrained

LATIN1 = os.fsdecode(b"caf\xe9")  # a name that is not UTF-8: "\udce9" in Python


def _tree(root, classes):
    return make_class_tree(root, classes, per_class=3, seed=0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_random_pretrained(tmp_path_factory.mktemp("ckpt") / "pretrained.pth")


def _args(data, out, forget, retain, pretrained, *extra):
    return micro_unlearn_argv(data, pretrained, out, "--max_steps_per_epoch", "1", *extra, forget=forget,
                              retain=retain, per_class=2, batch=2)


_run_dir = only_run_dir


@pytest.mark.parametrize("encoding,errors", [("utf-8", "strict"), ("ascii", "surrogateescape")])
def test_names_print_under_a_utf8_or_ascii_locale(tmp_path, pretrained, monkeypatch, encoding, errors):
    """stdout as en_US.UTF-8 opens it (strict errors): the run printed 'writing to <run dir>' with the name's
    surrogate, and died with "unlearn-fast: error: 'utf-8' codec can't encode character '\\udce9'" (exit 2).
    As LC_ALL=C with PYTHONUTF8=0 opens it (ASCII): the same with an 'ü'."""
    data = _tree(tmp_path / os.fsdecode(b"lat\xe9") / "train", (LATIN1, "dog", "bird"))
    out = tmp_path / (os.fsdecode(b"out\xe9") + "ü")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(_args(data, out, f"{LATIN1},dog", "bird", pretrained)) == 0
    printed = stdout.buffer.getvalue()
    # UTF-8: the folder's own bytes, as `ls` shows them; ASCII: escaped
    shown = os.fsencode(str(out)) if encoding == "utf-8" else str(out).encode("ascii", "backslashreplace")
    assert b"writing to " + shown in printed
    assert main(["audit", _run_dir(out), "--device", "cpu", "--no_progress"]) == 0


def test_report_csv_rows_and_palette_log_keep_names_that_are_not_utf8(tmp_path, pretrained):
    """report.html, a CSV row naming the generated folder and Palette's train.log hold the path: each raised
    UnicodeEncodeError (report: exit 2 'surrogates not allowed') after the work was done."""
    data = _tree(tmp_path / os.fsdecode(b"lat\xe9"), (LATIN1, "bird"))
    out = tmp_path / "out"
    assert main(_args(data, out, LATIN1, "bird", pretrained)) == 0
    assert main(["report", _run_dir(out)]) == 0
    assert b"lat\xe9" in open(os.path.join(_run_dir(out), "report.html"), "rb").read()

    name = os.path.join(str(data), "center_4.0_")
    append_rows_atomic(tmp_path / "fid_is_eval_inpaint.csv", [fid_is_row(name, 1.0, (2.0, 0.1), 3.0, (4.0, 0.2))])
    assert read_rows(tmp_path / "fid_is_eval_inpaint.csv")[0][0] == name

    log = tmp_path / "train.log"
    PaletteRunLog(str(log)).info(f"Create the log file in directory {data}.\n")
    assert b"lat\xe9" in log.read_bytes()


def test_a_comma_in_a_class_name_is_named_and_the_list_file_takes_it(tmp_path, pretrained, capsys):
    data = _tree(tmp_path / "data", ("fi,sh", "bird"))
    rc = main(_args(data, tmp_path / "out", "fi,sh", "bird", pretrained))
    err = capsys.readouterr().err
    assert rc == 2 and "'fi,sh' has a comma in its name" in err and "one per line" in err, err
    listed = tmp_path / "forget.txt"
    listed.write_text("fi,sh\n")
    assert main(_args(data, tmp_path / "out", str(listed), "bird", pretrained)) == 0


def test_class_list_file_keeps_a_hash_inside_a_name(tmp_path):
    """'#' began a comment anywhere, so the folder 'b#ird' was read as 'b' (and a name with both ',' and '#' had
    no spelling at all); a comment starts at the line's start or after a space."""
    listed = tmp_path / "classes.txt"
    listed.write_text("# forget these\nb#ird\nn02423022  # trailing comment\nfi,sh\t# tab\n")
    assert parse_class_list(str(listed)) == ["b#ird", "n02423022", "fi,sh"]


def test_audit_reads_a_relative_class_list_file_from_another_folder(tmp_path, pretrained, monkeypatch):
    """--forget_classes forget.txt (relative) was recorded as given: `unlearn-fast audit RUN` run from another
    folder (the command the run prints) read 'forget.txt' as a class name: 'class folder(s) not found'."""
    data = _tree(tmp_path / "data", ("fi,sh", "bird"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "forget.txt").write_text("fi,sh\n")
    (work / "retain.txt").write_text("bird\n")
    monkeypatch.chdir(work)
    assert main(_args(data, tmp_path / "out", "forget.txt", "retain.txt", pretrained)) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["audit", _run_dir(tmp_path / "out"), "--device", "cpu", "--no_progress"]) == 0


def test_a_tilde_in_the_cache_variable_is_the_home_folder(tmp_path, monkeypatch):
    """UNLEARN_FAST_CACHE="~/c" (quoted in a Dockerfile ENV or a systemd unit: no shell expands it) put the
    digits cache in a folder literally named '~' under the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("UNLEARN_FAST_CACHE", "~/c")
    assert cache_dir() == tmp_path / "c"
    assert digits_cache_path() == tmp_path / "c" / "mnist_5k_v1.npz"


def test_a_run_started_without_stderr_trains(tmp_path, pretrained, monkeypatch):
    """`unlearn-fast unlearn ... 2>&-` (a launcher that closes stderr: Python's sys.stderr is None): the first
    progress bar raised AttributeError ('NoneType' object has no attribute 'write') and the run was removed."""
    data = _tree(tmp_path / "data", ("cat", "bird"))
    monkeypatch.setattr(sys, "stderr", None)
    args = [a for a in _args(data, tmp_path / "out", "cat", "bird", pretrained) if a != "--no_progress"]
    assert main(args) == 0
    assert os.path.isfile(os.path.join(_run_dir(tmp_path / "out"), "checkpoint-0.pth"))


def test_evals_appending_to_one_csv_at_once_keep_every_row(tmp_path):
    """Checkpoints evaluated side by side into one --csv_dir: each append rewrote the old rows plus its own and
    renamed the result over the CSV, so a concurrent append's rows were lost (63 of 200 rows kept here); the
    reference's open('a+') keeps them all."""
    path = tmp_path / "fid_is_eval_inpaint.csv"

    def writer(t):
        for i in range(25):
            append_rows_atomic(path, [fid_is_row(f"w{t}/center_{i}_", 1.0, (2.0, 0.1), 3.0, (4.0, 0.2))])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]  # separate fds: flock applies
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in read_rows(path)) == sorted(f"w{t}/center_{i}_" for t in range(4) for i in range(25))


def test_a_class_folder_that_is_a_broken_link_is_named(tmp_path, pretrained, capsys):
    """A class folder linked to a drive that is not mounted: `ls` shows it, and the error said only 'class
    folder(s) not found: cat; its class folders are: bird'."""
    data = _tree(tmp_path / "data", ("bird",))
    os.symlink(tmp_path / "unmounted" / "cat", os.path.join(data, "cat"))
    rc = main(_args(data, tmp_path / "out", "cat", "bird", pretrained))
    err = capsys.readouterr().err
    assert rc == 2 and "cat is a link to" in err and "does not exist" in err, err
    assert not os.path.exists(tmp_path / "out")
