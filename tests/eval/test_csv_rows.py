"""CSV rows byte-identical to the reference's print(), and atomic appends."""
import os

import numpy as np
import pytest

from unlearn_fast.eval import csv_rows
from unlearn_fast.atomic_files import OutputWriteError


def reference_print(path, metric):
    """How eval.py / clip_embed.py write a row."""
    with open(path, "a+") as f:
        print("\t".join(str(a) for a in metric), file=f)


def test_fid_is_row_is_byte_identical_to_reference(tmp_path):
    # The reference values are numpy float64 (clean-fid FID, IS from a float64 array).
    fid_r, is_r, fid_f, is_f = np.float64(12.345678901234), (np.float64(31.5), np.float64(0.1 + 0.2)), \
        np.float64(1e-7), (np.float64(2.0), np.float64(123456789.125))
    name = csv_rows.fid_is_row_name("out/checkpoint-5-inpaint/", "center", 4)
    assert name == "out/checkpoint-5-inpaint/center_0.25_"
    assert csv_rows.fid_is_row_name("out/ck-outpaint", "outpaint", 1) == "out/ck-outpaint/outpaint_0.0625_"
    ref = tmp_path / "ref.csv"
    reference_print(ref, [name, fid_r, is_r[0], is_r[1], fid_f, is_f[0], is_f[1]])
    ours = tmp_path / "ours.csv"
    csv_rows.append_rows_atomic(ours, [csv_rows.fid_is_row(name, fid_r, is_r, fid_f, is_f)])
    assert ours.read_bytes() == ref.read_bytes()
    # Python floats print the same digits as numpy float64.
    assert csv_rows.fid_is_row(name, float(fid_r), tuple(map(float, is_r)), float(fid_f),
                               tuple(map(float, is_f))) == ref.read_text()
    assert ref.read_text().count("\t") == 6 and ref.read_text().endswith("\n")


def test_clip_row_uses_integer_ratio_name(tmp_path):
    name = csv_rows.clip_row_name("out/ck-inpaint", "center", 8)
    assert name == "out/ck-inpaint/center_8_"  # clip_embed.py: the embedding file name minus its suffix
    ref = tmp_path / "ref.csv"
    reference_print(ref, [name, np.float64(0.8123456789), np.float64(0.25)])
    assert csv_rows.clip_cosine_row(name, 0.8123456789, np.float64(0.25)) == ref.read_text()


def test_csv_names():
    assert csv_rows.fid_is_csv_name("outpaint") == "fid_is_eval_outpaint.csv"
    assert csv_rows.fid_is_csv_name(None) == "fid_is_eval.csv"
    assert csv_rows.clip_cosine_csv_name("inpaint") == "clip_cosine_inpaint.csv"
    assert csv_rows.clip_cosine_csv_name(None) == "clip_cosine.csv"


def test_float32_is_widened_then_printed_in_full():
    assert csv_rows.format_value(np.float32(0.1)) == str(float(np.float32(0.1)))
    assert csv_rows.format_value(3) == "3.0"  # the reference never writes ints; numbers are floats
    with pytest.raises(TypeError):
        csv_rows.format_value(True)
    with pytest.raises(TypeError):
        csv_rows.format_value(None)
    with pytest.raises(ValueError, match="tab"):
        csv_rows.format_value("a\tb")


def test_append_keeps_old_rows_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "fid_is_eval_inpaint.csv"
    csv_rows.append_rows_atomic(path, [csv_rows.format_row(["a", 1.5])])
    csv_rows.append_rows_atomic(path, [csv_rows.format_row(["b", 2.0]), csv_rows.format_row(["c", 0.25])])
    assert path.read_text() == "a\t1.5\nb\t2.0\nc\t0.25\n"
    assert csv_rows.read_rows(path) == [["a", "1.5"], ["b", "2.0"], ["c", "0.25"]]
    assert sorted(os.listdir(path.parent)) == ["fid_is_eval_inpaint.csv"]


def test_append_preserves_existing_bytes_without_trailing_newline(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"old\t1.0")  # a file the reference left half-written: appended as it is
    csv_rows.append_rows_atomic(path, ["new\t2.0\n"])
    assert path.read_bytes() == b"old\t1.0new\t2.0\n"


def test_failed_replace_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "x.csv"
    path.write_text("keep\t1.0\n")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(csv_rows.os, "replace", boom)
    with pytest.raises(OutputWriteError, match="x.csv: disk full"):  # names the file
        csv_rows.append_rows_atomic(path, ["new\t2.0\n"])
    assert path.read_text() == "keep\t1.0\n"
    assert os.listdir(tmp_path) == ["x.csv"]


def test_rows_must_be_single_lines(tmp_path):
    with pytest.raises(ValueError, match="one line"):
        csv_rows.append_rows_atomic(tmp_path / "x.csv", ["no newline"])
    with pytest.raises(ValueError, match="one line"):
        csv_rows.append_rows_atomic(tmp_path / "x.csv", ["two\nlines\n"])
    assert not (tmp_path / "x.csv").exists()
