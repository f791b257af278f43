"""The HTML report: well-formed, self-contained, escaped, with the numbers, images and curves in it."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from unlearn_fast.eval.report import format_number, read_log_lines, render_report, svg_line_chart, write_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class BalanceChecker(HTMLParser):
    """Fails on unbalanced or mis-nested tags; collects img sources, text and tag names."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.text, self.tags = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <polyline .../> in SVG
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page):
    checker = BalanceChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    return checker


def png_bytes(color, size=(12, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run<&>"
    d.mkdir()
    metrics = {
        "before": {"retain": {"FID": 12.3456, "IS": 45.6, "CLIP": 0.91234},
                   "forget": {"FID": 11.1111, "IS": 40.0, "CLIP": 0.9}},
        "after": {"retain": {"FID": 13.5, "IS": 44.25, "CLIP": 0.89},
                  "forget": {"FID": 250.75, "IS": 3.5, "CLIP": 0.4321, "<script>alert(1)</script>": 1}},
        "config": {"forget_alpha": 0.1, "model": "mage_vitb", "note": "a < b & c", "lrs": [1, 2]},
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    lines = [json.dumps({"train_loss": 1.0 / (e + 1), "train_retain_l2_loss": 0.5 / (e + 1),
                         "train_forget_l2_loss": 0.25 * e, "train_lr": 1e-4 * (e + 1), "epoch": e,
                         "n_parameters": 86000000}) for e in range(6)]
    lines.insert(3, "not json {")
    (d / "log.txt").write_text("\n".join(lines) + "\n")
    (d / "samples_epoch5.png").write_bytes(png_bytes((255, 0, 0)))
    (d / "tsne.png").write_bytes(png_bytes((0, 0, 255)))
    return d


def test_report_is_balanced_self_contained_and_escaped(run_dir):
    out = write_report(str(run_dir))
    assert out == os.path.join(str(run_dir), "report.html")
    page = open(out, encoding="utf-8").read()
    checker = parse(page)
    text = "".join(checker.text)
    # The numbers, formatted by format_number, in the before/after x retain/forget table.
    for value in (12.3456, 45.6, 0.91234, 11.1111, 13.5, 44.25, 250.75, 3.5, 0.4321):
        assert format_number(value) in text, value
    assert "after / forget" in text and "before / retain" in text
    # Escaped: the hostile metric name shows as text and never becomes a tag.
    assert "<script>alert(1)</script>" in text and "script" not in checker.tags
    assert "a < b & c" in text and "run<&>" in text
    # Images are inline data URIs that decode to the files.
    srcs = sorted(img["src"] for img in checker.imgs)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    decoded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert decoded == {(run_dir / "samples_epoch5.png").read_bytes(), (run_dir / "tsne.png").read_bytes()}
    # No external resources at all.
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    # Loss and lr charts, with every logged loss in the legends.
    assert page.count("<svg") >= 2 and "polyline" in checker.tags
    for key in ("train_loss", "train_retain_l2_loss", "train_forget_l2_loss", "train_lr"):
        assert key in text
    assert "1 unreadable line" in text


def test_log_reader_and_chart(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('{"train_loss": 1.5, "epoch": 0}\n[1, 2]\n\n{"train_loss": NaN, "epoch": 1}\n')
    records, bad = read_log_lines(str(log))
    assert bad == 1 and len(records) == 2
    svg = svg_line_chart({"a<b": [(0, 1.0), (1, float("nan")), (2, 3.0)], "empty": []}, title="T&T", x_label="x")
    parse(svg)
    assert "a&lt;b" in svg and "T&amp;T" in svg and "empty" not in svg
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(points) == 2  # the NaN point is dropped
    assert "no data" in svg_line_chart({}, title="t", x_label="x")
    parse(svg_line_chart({"flat": [(3, 2.0)]}, title="one point", x_label="x"))


def test_minimal_run_dir_and_errors(tmp_path):
    page = render_report(str(tmp_path), title="only a title")
    parse(page)
    assert "only a title" in page and "<svg" not in page
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        render_report(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        render_report(str(tmp_path / "missing"))
    out = tmp_path / "elsewhere" / "r.html"
    (tmp_path / "metrics.json").write_text(json.dumps({"after": {"retain": {"FID": 1}}}))
    assert write_report(str(tmp_path), str(out)) == str(out)
    assert "FID" in out.read_text() and os.listdir(out.parent) == ["r.html"]


def test_format_number():
    assert format_number(12.34567) == "12.3457"
    assert format_number(3) == "3"
    assert format_number(1.5e-5) == "1.5e-05"
    assert format_number(float("nan")) == "nan"
    assert format_number("x") == "x"


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    html_path = write_report(str(run_dir), str(tmp_path / "report.html"))
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", f"file://{html_path}"], check=True, timeout=120,
                   capture_output=True)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.size == (1200, 1600)


def test_axis_ticks_are_round_numbers():
    from unlearn_fast.eval.report import _nice_ticks, _tick_label
    assert _nice_ticks(0, 1122) == [0, 250, 500, 750, 1000]
    ticks = _nice_ticks(1e-4, 6e-4)
    assert [_tick_label(t, ticks) for t in ticks] == ["0.0001", "0.0002", "0.0003", "0.0004", "0.0005", "0.0006"]
    ticks = _nice_ticks(0, 1.25)
    assert [_tick_label(t, ticks) for t in ticks] == ["0", "0.25", "0.5", "0.75", "1", "1.25"]
    assert _nice_ticks(3.0, 3.0) == [3.0]


def test_report_folder_that_cannot_be_created_or_written_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile/deeper is not a folder and cannot be created: .*afile is a file"):
        write_report(str(tmp_path), str(tmp_path / "afile" / "deeper" / "r.html"))
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access  # a read-only folder, also where chmod is ignored (root)
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(ro) else real(p, mode, *a, **k))
    with pytest.raises(ValueError, match=r"report's folder .*ro/sub is not writable \(.*ro is read-only\)"):
        write_report(str(tmp_path), str(ro / "sub" / "r.html"))  # before: mkstemp's PermissionError
    assert os.listdir(ro) == [] and (tmp_path / "afile").read_text() == "x"
