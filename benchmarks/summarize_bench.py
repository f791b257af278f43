"""Print a table of pytest-benchmark JSON files: name, median, speedup vs reference, images/s, GB/s, memory; then
each A/B step variant against its base step (``fast`` or ``fast_bf16``, same configuration, any of the files).

    python benchmarks/summarize_bench.py bench_gpu.json [more.json ...]
"""
import json
import sys


def rows(path):
    with open(path) as fh:
        data = json.load(fh)
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        yield (b["name"], b["stats"]["median"] * 1e3, e.get("speedup_vs_reference"), e.get("images_per_s"),
               e.get("fused_GB_per_s"), e.get("peak_memory_mb"), e.get("device", ""))


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def step_medians(paths):
    """{(config, variant): median seconds} of the step benchmarks in ``paths`` (the first file that has it)."""
    out = {}
    for p in paths:
        try:
            with open(p) as fh:
                data = json.load(fh)
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
    for p in paths:
        try:
            for name, ms, sp, ips, gbs, mem, dev in rows(p):
                print(f"{name:58s} {ms:10.3f} {fmt(sp, '7.2f')} {fmt(ips, '9.1f')} {fmt(gbs, '8.1f')} "
                      f"{fmt(mem, '9.0f')}  {dev}")
        except (OSError, ValueError) as e:
            print(f"# {p}: {e}")
    lines = ab_lines(step_medians(paths))
    if lines:
        print("\nA/B variants against their base step (same configuration):")
        print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
