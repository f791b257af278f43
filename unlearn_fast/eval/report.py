"""One self-contained HTML page for a run directory: metrics, sample grids, loss curves.

    from unlearn_fast.eval import write_report
    write_report("output_dir/my_run")            # -> output_dir/my_run/report.html

Reads, all optional:
- ``<run_dir>/metrics.json``: {"before": {"retain": {...}, "forget": {...}}, "after": {...}, "config": {...}};
- ``<run_dir>/*.png``: embedded as base64 data URIs (sample grids, the T-SNE figure, ...);
- ``<run_dir>/log.txt``: one JSON object per line (the trainer's log, keys like ``train_loss``,
  ``train_lr``, ``epoch``), drawn as inline SVG line charts made here (no matplotlib).
- ``<run_dir>/eval_log.txt``: the ``--eval_every`` records (held-out errors, their ratios to before, the
  keep-best criterion), as a table;
- ``<run_dir>/forget_audit.json``: ``unlearn-fast audit``'s membership AUCs before/after, as a table, with the
  checkpoints it compared;
- ``<run_dir>/opt.yaml``: the run's flags (the last start's), the ones that define the run as a table;
- a Palette run folder: ``train.log``'s ``train/mse_loss`` lines as a curve, ``config.json``'s run settings.
Every piece of text from those files is HTML-escaped. The page needs no network and no scripts.
A file that cannot be read is named in the page and, through ``warn``, on stderr (``unlearn-fast report``);
a damaged ``metrics.json`` is an error. A huge log is streamed, its curves thinned to ``MAX_CURVE_POINTS``
(per bucket the lowest and highest value, so spikes stay) and its table cut to ``MAX_TABLE_ROWS``. The page is
written atomically, and only over an earlier HTML page: a ``--out`` naming a run's log or flags is refused.
"""
from __future__ import annotations

import base64
import collections
import html
import json
import math
import os
import re
import sys

from ..atomic_files import atomic_write_text
from ..train.run_outputs import check_creatable_dir, opt_yaml_objects

__all__ = ["write_report", "render_report", "svg_line_chart", "read_log_lines", "format_number",
           "read_run_settings"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;padding:0 1.5em;
     max-width:1100px;color:#222}
h1{font-size:1.5em;overflow-wrap:anywhere}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td.k,th.k{text-align:left;font-family:ui-monospace,monospace}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #ddd}.note{color:#777;font-size:.9em}svg{background:#fff}
"""


def format_number(value) -> str:
    """How a metric value is shown: ints as is, floats with 4 decimals (or 4 significant digits if tiny/huge)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.4g}"
        return f"{value:.4f}"
    return str(value)


def _finite(value) -> bool:
    """A plottable number: finite as a float (an integer too large for a float is not)."""
    try:
        return math.isfinite(float(value))
    except (OverflowError, TypeError, ValueError):
        return False


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


MAX_LOG_LINE_CHARS = 1 << 20  # a longer "line" (a binary or corrupted file) is skipped as unreadable, not loaded
MAX_CURVE_POINTS = 2000  # points drawn per curve: a huge log is thinned to min / max per bucket (spikes survive)
MAX_TABLE_ROWS = 200  # rows of a log table shown (the first and the last half of them)
MAX_EMBEDDED_IMAGE_BYTES = 32 << 20  # a larger PNG is named, not embedded (base64 makes it a third larger)


def _iter_log(path: str):
    """Each line of a JSON-lines log as its object, or None for an unreadable line (not JSON, not an object, or
    longer than ``MAX_LOG_LINE_CHARS``); blank lines are skipped. Streamed: a huge log is never held whole."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            line = f.readline(MAX_LOG_LINE_CHARS)
            if not line:
                return
            if len(line) >= MAX_LOG_LINE_CHARS and not line.endswith("\n"):  # too long: skip to its end
                while line and not line.endswith("\n"):
                    line = f.readline(MAX_LOG_LINE_CHARS)
                yield None
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            yield rec if isinstance(rec, dict) else None


def read_log_lines(path: str) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of a JSON-lines log; non-object lines, and lines longer than
    ``MAX_LOG_LINE_CHARS``, count as unreadable."""
    records, bad = [], 0
    for rec in _iter_log(path):
        if rec is None:
            bad += 1
        else:
            records.append(rec)
    return records, bad


def _thin(points: list[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    """At most ~``most`` of the x-sorted ``points``: per bucket of consecutive points its lowest and highest,
    in x order, so that a spike or a dip stays visible."""
    if len(points) <= most:
        return points
    buckets = most // 2
    out = []
    for b in range(buckets):
        chunk = points[b * len(points) // buckets:(b + 1) * len(points) // buckets]
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out += sorted({lo, hi})
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) inside [lo, hi], about n of them."""
    if hi <= lo:
        return [lo]
    mag = 10.0 ** math.floor(math.log10((hi - lo) / (n - 1)))

    def ticks(step):
        return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    candidates = [ticks(m * mag) for m in (0.5, 1, 2, 2.5, 5, 10)]
    return min(candidates, key=lambda t: (abs(len(t) - n), -len(t) if len(t) < n else len(t)))


def _tick_label(t: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if t != 0 and (abs(t) < 1e-3 or abs(t) >= 1e6):
        return f"{t:.4g}"
    decimals = max(0, -math.floor(math.log10(step)) + 1)
    return f"{t + 0.0:.{decimals}f}".rstrip("0").rstrip(".") if decimals else f"{t:.0f}"


def svg_line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str,
                   width: int = 640, height: int = 300) -> str:
    """An inline ``<svg>`` with one polyline per named series of (x, y) points; non-finite points are dropped."""
    clean = {name: [(float(x), float(y)) for x, y in pts if _finite(x) and _finite(y)] for name, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    left, right, top, bottom = 70, 160, 30, 45
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
             f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14">{_esc(title)}</text>']
    if not clean:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        pad = abs(y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    y_ticks, x_ticks = _nice_ticks(y0, y1), _nice_ticks(x0, x1)
    for t in y_ticks:
        parts.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">'
                     f'{_esc(_tick_label(t, y_ticks))}</text>')
    for t in x_ticks:
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">'
                     f'{_esc(_tick_label(t, x_ticks))}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="12">'
                 f'{_esc(x_label)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in _thin(sorted(pts), MAX_CURVE_POINTS))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 28}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="3"/><text x="{left + pw + 32}" y="{ly}" font-size="11">'
                     f'{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _metrics_section(metrics: dict) -> str:
    phases = [p for p in ("before", "after") if isinstance(metrics.get(p), dict)]
    cols = [(p, s) for p in phases for s in ("retain", "forget") if isinstance(metrics[p].get(s), dict)]
    out = ["<h2>Metrics</h2>"]
    if cols:
        names: list[str] = []
        for p, s in cols:
            names += [k for k in metrics[p][s] if k not in names]
        head = "".join(f"<th>{_esc(p)} / {_esc(s)}</th>" for p, s in cols)
        out.append(f'<table><thead><tr><th class="k">metric</th>{head}</tr></thead><tbody>')
        for name in names:
            cells = "".join(f"<td>{_esc(format_number(metrics[p][s].get(name, '—')))}</td>" for p, s in cols)
            out.append(f'<tr><td class="k">{_esc(name)}</td>{cells}</tr>')
        out.append("</tbody></table>")
    else:
        out.append('<p class="note">metrics.json has no before/after retain/forget tables.</p>')
    config = metrics.get("config")
    if isinstance(config, dict) and config:
        out.append('<h2>Config</h2><table><tbody>')
        for k, v in config.items():
            shown = format_number(v) if isinstance(v, (int, float)) else json.dumps(v) if not isinstance(v, str) else v
            out.append(f'<tr><td class="k">{_esc(k)}</td><td class="k">{_esc(shown)}</td></tr>')
        out.append("</tbody></table>")
    return "".join(out)


def _curves_section(records, bad: int = 0) -> str:
    """``records``: log objects, or an iterator of them where None stands for an unreadable line (counted)."""
    numeric, i, every_epoch = {}, 0, True
    for rec in records:
        if rec is None:
            bad += 1
            continue
        x = rec.get("epoch", i)
        every_epoch = every_epoch and "epoch" in rec
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            x = i
        i += 1
        for k, v in rec.items():
            if k == "epoch" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            numeric.setdefault(k, []).append((x, v))
    x_label = "epoch" if i and every_epoch else "log line"
    groups = {"Losses": {k: v for k, v in numeric.items() if "loss" in k},
              "Learning rate": {k: v for k, v in numeric.items() if k.endswith("lr") or "_lr" in k}}
    used = set(groups["Losses"]) | set(groups["Learning rate"])
    groups["Other logged values"] = {k: v for k, v in numeric.items() if k not in used}
    out = ["<h2>Training curves</h2>"]
    for title, series in groups.items():
        if series:
            out.append(f"<div>{svg_line_chart(series, title=title, x_label=x_label)}</div>")
    if bad:
        out.append(f'<p class="note">{bad} unreadable line(s) in log.txt were skipped.</p>')
    return "".join(out)


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(format_number(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _eval_section(records, bad: int = 0) -> str:
    """``records``: as :func:`_curves_section`'s; a huge log shows its first and last ``MAX_TABLE_ROWS // 2``."""
    keys = ["epoch", "retain_mse", "forget_mse", "retain_ratio", "forget_ratio", "forget_gap", "best"]
    first, last, seen = [], collections.deque(maxlen=MAX_TABLE_ROWS // 2), 0
    for rec in records:
        if rec is None:
            bad += 1
            continue
        seen += 1
        (first if len(first) < MAX_TABLE_ROWS // 2 else last).append(rec)
    left_out = max(0, seen - MAX_TABLE_ROWS)
    records = first + list(last)
    rows = [[("before" if r.get("phase") == "before" else r.get(k, "—")) if k == "epoch" else r.get(k, "—")
             for k in keys] for r in records]
    out = ["<h2>Held-out evaluation (--eval_every)</h2>", _table(keys, rows)]
    if left_out:
        out.append(f'<p class="note">{left_out} rows left out (between row {MAX_TABLE_ROWS // 2} and the last '
                   f'{MAX_TABLE_ROWS // 2}); eval_log.txt holds them all.</p>')
    if bad:
        out.append(f'<p class="note">{bad} unreadable line(s) in eval_log.txt were skipped.</p>')
    return "".join(out)


def _audit_section(path: str, warn) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            audit = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        warn(f"{path} is unreadable ({e}): the page says so in its place; rerun unlearn-fast audit to rewrite it")
        return f'<h2>Forget audit</h2><p class="note">{_esc(path)} is unreadable: {_esc(e)}</p>'
    rows = []
    for key, label in (("forget", "forget classes"), ("retain_control", "retain classes (control)")):
        part = audit.get(key) if isinstance(audit, dict) else None
        if isinstance(part, dict) and isinstance(part.get("before"), dict) and isinstance(part.get("after"), dict):
            b, a = part["before"], part["after"]
            rows.append([label, b.get("auc", "—"), a.get("auc", "—"), b.get("n_forget_train", "—"),
                         b.get("n_unseen", "—")])
    if not rows:  # valid JSON of another shape: an empty table would read as an audit with no result
        warn(f"{path} holds no audit numbers: rerun unlearn-fast audit to rewrite it")
        return f'<h2>Forget audit</h2><p class="note">{_esc(path)} holds no audit numbers.</p>'
    note = ('<p class="note">AUC = P(a training image has a lower task error than an unseen image of the same '
            'classes); 0.5 means the model no longer tells them apart.</p>')
    config = audit.get("config") if isinstance(audit, dict) else None
    if isinstance(config, dict) and (config.get("checkpoint") or config.get("teacher")):
        # the file holds the latest audit only: say which checkpoints it compared
        note += (f'<p class="note">after = {_esc(config.get("checkpoint", "?"))}; before = '
                 f'{_esc(config.get("teacher", "?"))}</p>')
    skipped = audit.get("retain_control_skipped") if isinstance(audit, dict) else None
    if skipped:
        note += f'<p class="note">No retain-class control: {_esc(skipped)}.</p>'
    return "<h2>Forget audit</h2>" + _table(["set", "AUC before", "AUC after", "n train", "n unseen"], rows) + note


# the flags that say what a run did, in this order (the rest of opt.yaml is in the file)
_SETTING_KEYS = ("model", "input_size", "data_path", "forget_classes", "retain_classes", "num_image_per_class",
                 "retainset_ratio", "opendata_to_forget_ratio", "use_coco", "loss_type", "forget_alpha",
                 "retain_alpha", "noise_type", "epochs", "batch_size", "accum_iter", "eff_batch_size", "lr_resolved",
                 "warmup_epochs", "precision", "step_mode", "seed", "world_size", "teacher_checkpoint", "resume")


def read_run_settings(path: str) -> dict | None:
    """The last JSON object of ``opt.yaml`` (appended once per start of a run), or None if there is none."""
    return _run_settings(path)[0]


def _run_settings(path: str) -> tuple:
    """(settings or None, why there are none: None when the file is missing or all is well)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        return None, str(e)
    objects, error = opt_yaml_objects(text)  # a torn last start: keep the last complete one
    found = next((o for o in reversed(objects) if isinstance(o, dict)), None)
    return found, (None if found is not None else str(error or "no JSON object in it"))


_PALETTE_VALUE_LINE = re.compile(r" - INFO: (train/[\w/]+): (\S+)\s*$")


def read_palette_train_log(path: str) -> list[dict]:
    """``{"train/mse_loss": value}`` per metric line of a Palette ``train.log`` (the reference's logging format),
    in order; other lines are skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _PALETTE_VALUE_LINE.search(line)
            if m:
                try:
                    records.append({m.group(1): float(m.group(2))})
                except ValueError:
                    continue
    return records


def _palette_settings(path: str, warn=None) -> dict | None:
    """The run settings unlearn_fast records in a Palette ``config.json`` (its ``unlearn_fast`` entry);
    ``warn(why)`` when the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        if warn is not None:
            warn(str(e))
        return None
    extra = config.get("unlearn_fast") if isinstance(config, dict) else None
    if not isinstance(extra, dict):
        return None
    return {"name": config.get("name"), **{k: v for k, v in extra.items() if not isinstance(v, (dict, list))}}


def _settings_section(settings: dict, keys=None) -> str:
    def shown(v):  # flags as typed: 0.2, not 0.2000
        return f"{v:g}" if isinstance(v, float) else str(v)
    rows = "".join(f'<tr><td class="k">{_esc(k)}</td><td class="k">{_esc(shown(settings[k]))}</td></tr>'
                   for k in (keys or _SETTING_KEYS) if k in settings and settings[k] is not None and settings[k] != "")
    source = "opt.yaml" if keys is None else "config.json"
    return f"<h2>Run settings ({source})</h2><table><tbody>{rows}</tbody></table>" if rows else ""


def _images_section(pngs: list[str], warn) -> str:
    out = ["<h2>Images</h2>"]
    for path in pngs:
        name = os.path.basename(path)
        try:
            size = os.path.getsize(path)
            if size > MAX_EMBEDDED_IMAGE_BYTES:  # a page of hundreds of MB would not open: name it instead
                warn(f"{path} ({size / 2**20:.0f} MB) is too large to embed: the page names it only")
                out.append(f'<p class="note">{_esc(name)} ({size / 2**20:.0f} MB) is too large to embed; open it '
                           "beside this page.</p>")
                continue
            with open(path, "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
        except FileNotFoundError:  # removed since the listing (a run being cleaned up): nothing to show
            continue
        out.append(f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{_esc(name)}</figcaption></figure>")
    return "".join(out)


def _ignore(message: str) -> None:
    pass


def _print_warning(message: str) -> None:
    print(f"unlearn-fast report: warning: {message}", file=sys.stderr, flush=True)


def render_report(run_dir: str, *, title: str | None = None, warn=None) -> str:
    """The report page of ``run_dir`` as an HTML string (see module docstring). ``warn(message)`` is called once
    for each file that is left out of the page because it cannot be read (the page says so too)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    warn = warn or _ignore
    title = title or f"unlearn_fast run: {os.path.basename(os.path.abspath(run_dir))}"  # abspath: "." has a name
    body = [f"<h1>{_esc(title)}</h1>", f'<p class="note">{_esc(os.path.abspath(run_dir))}</p>']
    opt_path = os.path.join(run_dir, "opt.yaml")
    settings, unreadable = _run_settings(opt_path)
    if settings:
        body.append(_settings_section(settings))
    elif unreadable:
        warn(f"{opt_path} is unreadable ({unreadable}): the run settings are left out of the page")
        body.append(f'<h2>Run settings</h2><p class="note">{_esc(opt_path)} is unreadable: {_esc(unreadable)}</p>')
    elif os.path.isfile(os.path.join(run_dir, "config.json")):  # a Palette run folder
        config_path, problems = os.path.join(run_dir, "config.json"), []
        palette = _palette_settings(config_path, problems.append)
        if palette:
            body.append(_settings_section(palette, keys=list(palette)))
        elif problems:
            warn(f"{config_path} is unreadable ({problems[0]}): the run settings are left out of the page")
            body.append(f'<h2>Run settings</h2><p class="note">{_esc(config_path)} is unreadable: '
                        f"{_esc(problems[0])}</p>")
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        try:
            with open(metrics_path, encoding="utf-8") as f:
                metrics = json.load(f)
        except ValueError as e:  # json.JSONDecodeError or UnicodeDecodeError
            raise ValueError(f"{metrics_path} is not valid JSON: {e}; repair it, or move it aside to report the "
                             "rest of the run") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"{metrics_path} must hold a JSON object; repair it, or move it aside to report the "
                             "rest of the run")
        body.append(_metrics_section(metrics))
    log_path = os.path.join(run_dir, "log.txt")
    if os.path.isfile(log_path):
        body.append(_curves_section(_iter_log(log_path)))
    elif os.path.isfile(os.path.join(run_dir, "train.log")):  # Palette: the reference's text log
        records = read_palette_train_log(os.path.join(run_dir, "train.log"))
        if records:
            body.append(_curves_section(records, 0))
    eval_path = os.path.join(run_dir, "eval_log.txt")
    if os.path.isfile(eval_path):
        body.append(_eval_section(_iter_log(eval_path)))
    audit_path = os.path.join(run_dir, "forget_audit.json")
    if os.path.isfile(audit_path):
        body.append(_audit_section(audit_path, warn))
    pngs = sorted(os.path.join(run_dir, f) for f in os.listdir(run_dir)  # not hidden: a temporary file is half one
                  if f.lower().endswith(".png") and not f.startswith(".") and os.path.isfile(os.path.join(run_dir, f)))
    if pngs:
        body.append(_images_section(pngs, warn))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>\n")


def _is_html_page(path: str) -> bool:
    """Whether the existing file ``path`` may be replaced by a report: empty, or an HTML page (an earlier report)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return not head or head.startswith((b"<!doctype html", b"<html"))


def write_report(run_dir: str, out_html: str | None = None, *, title: str | None = None,
                 warn=_print_warning) -> str:
    """Write the report of ``run_dir`` to ``out_html`` (default ``<run_dir>/report.html``) atomically; returns the
    path. An existing file there is replaced only if it is an HTML page (a run's log or flags are never
    overwritten). ``warn``: see :func:`render_report` (default: a line on stderr each)."""
    out_html = out_html or os.path.join(run_dir, "report.html")
    if os.path.isdir(out_html):
        raise ValueError(f"the report path is a folder, not an .html file: {out_html}")
    if os.path.isfile(out_html) and not _is_html_page(out_html):
        raise ValueError(f"{out_html} exists and is not an HTML page (a file of the run?): it is not overwritten; "
                         "choose another --out")
    page = render_report(run_dir, title=title, warn=warn)
    folder = os.path.dirname(os.path.abspath(out_html))
    check_creatable_dir(folder, "the report's folder")  # one clear error, not FileExistsError from makedirs
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(out_html, page)
    return out_html
