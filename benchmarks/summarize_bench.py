"""Print a table of pytest-benchmark JSON files: name, median, speedup vs reference, images/s, GB/s, memory; then
each A/B step variant against its base step (``fast`` or ``fast_bf16``, same configuration, any of the files).
A ``.jsonl`` file holds the step benchmarks' rows as each ended (``step_harness.record_row``): its rows that no
JSON file has (a group cut short by a time cap) are listed too, and count for the A/B lines.

    python benchmarks/summarize_bench.py bench_gpu.json [more.json ...] [bench_rows.jsonl]
"""
import json
import os
import sys


def load(path) -> dict:
    """A pytest-benchmark JSON file, or a ``.jsonl`` of recorded rows in the same form (``benchmarks`` with
    ``name``, ``stats.median``, ``extra_info``; ``unreadable``: how many of its lines were not a whole row, e.g.
    the last one of a run killed while writing it)."""
    with open(path) as fh:
        if not path.endswith(".jsonl"):
            return json.load(fh)
        lines = [line for line in fh if line.strip()]
    rows = []
    for line in lines:
        try:
            r = json.loads(line)
            rows.append({"name": r["name"], "stats": {"median": float(r["median_s"])},
                         "extra_info": r.get("extra_info") or {}})
        except (ValueError, KeyError, TypeError):
            continue
    return {"benchmarks": rows, "unreadable": len(lines) - len(rows)}


def rows(data: dict, skip=frozenset()):
    """(name, median ms, x ref, images/s, GB/s, peak MB, device) of each benchmark of a :func:`load` result."""
    for b in data.get("benchmarks", []):
        if b["name"] in skip:
            continue
        e = b.get("extra_info", {})
        yield (b["name"], b["stats"]["median"] * 1e3, e.get("speedup_vs_reference"), e.get("images_per_s"),
               e.get("fused_GB_per_s"), e.get("peak_memory_mb"), e.get("device", ""))


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def step_medians(paths):
    """{(config, variant): median seconds} of the step benchmarks in ``paths`` (the first file that has it)."""
    out = {}
    for p in sorted(paths, key=lambda p: p.endswith(".jsonl")):  # pytest-benchmark's own files first
        try:
            data = load(p)
        except (OSError, ValueError):
            continue
        for b in data.get("benchmarks", []):
            e = b.get("extra_info", {})
            if "config" in e and "variant" in e:
                out.setdefault((e["config"], e["variant"]), b["stats"]["median"])
    return out


def ab_lines(medians):
    """One line per variant with a base step in the same configuration: base / variant (> 1: the variant wins)."""
    lines = []
    for (config, variant), sec in sorted(medians.items()):
        base = ("fast_bf16" if variant.startswith("fast_bf16_")
                else "fast" if variant.startswith("fast_") and variant != "fast_bf16" else None)
        if base and (config, base) in medians:
            ratio = medians[(config, base)] / sec
            lines.append(f"{config:16s} {variant:28s} {sec * 1e3:9.2f} ms vs {base:9s} "
                         f"{medians[(config, base)] * 1e3:9.2f} ms  x{ratio:.3f} "
                         f"({'variant faster' if ratio > 1 else 'base faster'})")
    return lines


def main(paths):
    print(f"{'benchmark':58s} {'median ms':>10s} {'x ref':>7s} {'img/s':>9s} {'GB/s':>8s} {'peak MB':>9s}  device")
    shown = set()
    for p in sorted(paths, key=lambda p: p.endswith(".jsonl")):
        if p.endswith(".jsonl") and not os.path.exists(p):
            continue  # no step benchmark ran
        try:
            data = load(p)
            listed = list(rows(data, skip=shown if p.endswith(".jsonl") else frozenset()))
        except (OSError, ValueError) as e:  # an empty file: pytest-benchmark opens it first, fills it at the end
            print(f"# {p}: {e or 'empty'}" + (" (empty: its group was cut before it ended?)"
                                               if os.path.exists(p) and not os.path.getsize(p) else ""))
            continue
        if data.get("unreadable"):
            print(f"# {p}: {data['unreadable']} unreadable line(s) skipped (a row cut mid-write?)")
        if p.endswith(".jsonl") and listed:
            print(f"# recorded as they ended, in no JSON file (a group cut short?): {p}")
        for name, ms, sp, ips, gbs, mem, dev in listed:
            shown.add(name)
            print(f"{name:58s} {ms:10.3f} {fmt(sp, '7.2f')} {fmt(ips, '9.1f')} {fmt(gbs, '8.1f')} "
                  f"{fmt(mem, '9.0f')}  {dev}")
    lines = ab_lines(step_medians(paths))
    if lines:
        print("\nA/B variants against their base step (same configuration):")
        print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
