"""run_outputs.check_creatable_dir: a folder that could be created and written, checked without creating it."""
from __future__ import annotations

import os
import stat

import pytest

from unlearn_fast.train.run_outputs import check_creatable_dir


def _tree(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def test_existing_writable_folder_passes(tmp_path):
    (tmp_path / "out").mkdir()
    check_creatable_dir(str(tmp_path / "out"), "--output_dir")
    check_creatable_dir(str(tmp_path / "out") + os.sep, "--output_dir")  # a trailing slash is the same folder
    assert _tree(tmp_path) == ["out"]  # nothing written


def test_missing_nested_folder_under_a_writable_one_passes_and_is_not_created(tmp_path):
    check_creatable_dir(str(tmp_path / "a" / "b" / "c"), "--output_dir")
    assert _tree(tmp_path) == []


def test_relative_path_is_checked_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    check_creatable_dir("new/sub", "--output_dir")
    with pytest.raises(ValueError, match=f"--output_dir {tmp_path / 'f' / 'sub'} is not a folder"):
        check_creatable_dir("f/sub", "--output_dir")


def test_existing_file_is_refused_naming_the_flag_and_path(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError) as e:
        check_creatable_dir(str(f), "--output_dir")
    assert str(e.value) == f"--output_dir {f} is not a folder: it exists and is a file"
    assert f.read_text() == "x"


@pytest.mark.parametrize("below", [["sub"], ["sub", "deeper"]])
def test_path_under_a_file_is_refused_naming_the_file(tmp_path, below):
    f = tmp_path / "a_file"
    f.write_text("x")
    target = f.joinpath(*below)
    with pytest.raises(ValueError) as e:
        check_creatable_dir(str(target), "--csv_dir")
    assert str(e.value) == f"--csv_dir {target} is not a folder and cannot be created: {f} is a file, not a folder"
    assert _tree(tmp_path) == ["a_file"]


def test_dangling_link_is_not_a_folder(tmp_path):
    link = tmp_path / "link"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(ValueError, match=f"{link} is not a folder: it exists and is no folder"):
        check_creatable_dir(str(link), "--output_dir")
    with pytest.raises(ValueError, match="cannot be created"):
        check_creatable_dir(str(link / "sub"), "--output_dir")


def test_link_to_a_folder_passes(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    check_creatable_dir(str(tmp_path / "link" / "new"), "--output_dir")


def _read_only(folder):
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(folder, os.W_OK):  # root (or a file system without permissions) ignores the mode
        folder.chmod(stat.S_IRWXU)
        pytest.skip("chmod does not make a folder read-only here (running as root?)")


@pytest.mark.parametrize("below", [[], ["new"], ["new", "deeper"]])
def test_read_only_ancestor_is_refused(tmp_path, below):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(ro)
    target = ro.joinpath(*below)
    try:
        with pytest.raises(ValueError) as e:
            check_creatable_dir(str(target), "--output_dir")
        assert str(e.value) == f"--output_dir {target} is not writable ({ro} is read-only)"
    finally:
        ro.chmod(stat.S_IRWXU)


def test_read_only_ancestor_is_refused_where_os_access_says_so(tmp_path, monkeypatch):
    """The same check where chmod cannot be used (root): what matters is os.access on the nearest ancestor."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    asked = []

    def access(p, mode, *a, **k):
        asked.append((str(p), mode))
        return False if str(p) == str(ro) else real(p, mode, *a, **k)
    monkeypatch.setattr(os, "access", access)
    with pytest.raises(ValueError, match=r"--output_dir .*ro[/\\]x[/\\]y is not writable \(.*ro is read-only\)"):
        check_creatable_dir(str(ro / "x" / "y"), "--output_dir")
    assert asked == [(str(ro), os.W_OK | os.X_OK)]  # write and enter: both are needed to create a subfolder
    check_creatable_dir(str(tmp_path / "other"), "--output_dir")  # a writable sibling still passes
